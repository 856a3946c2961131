"""The store against a model of setec's versioning rules, over random operation sequences."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from legator.secrets.crypto import Kek, generate_key
from legator.secrets.errors import InvalidRequest, SecretNotFound, VersionClaimed
from legator.secrets.service import validate_name
from legator.secrets.store import SecretStore, SqlStore
from tests.secrets.conftest import Backend

KEK = Kek(generate_key(), "test")
NAMES = ["a", "b/c"]
VALUES = [b"", b"x", b"y", b"\x00\xff"]


@dataclass
class Model:
    values: dict[int, bytes] = field(default_factory=dict)  # live versions
    claimed: set[int] = field(default_factory=set)
    active: int = 0
    latest: int = 0


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(NAMES), st.sampled_from(VALUES)),
        st.tuples(
            st.just("create"), st.sampled_from(NAMES), st.integers(1, 8), st.sampled_from(VALUES)
        ),
        st.tuples(st.just("activate"), st.sampled_from(NAMES), st.integers(1, 8)),
        st.tuples(st.just("delete_version"), st.sampled_from(NAMES), st.integers(1, 8)),
        st.tuples(st.just("delete"), st.sampled_from(NAMES)),
    ),
    max_size=25,
)


def expect(model: dict[str, Model], op: tuple) -> object:  # type: ignore[type-arg]
    """What the model says the operation returns (or raises, as an exception class)."""
    kind, name = op[0], op[1]
    m = model.get(name)
    if kind == "put":
        value = op[2]
        if m is None:
            model[name] = Model({1: value}, {1}, 1, 1)
            return 1
        if m.latest in m.values and m.values[m.latest] == value:
            return m.latest
        m.latest += 1
        m.values[m.latest] = value
        m.claimed.add(m.latest)
        return m.latest
    if kind == "create":
        version, value = op[2], op[3]
        if m is None:
            model[name] = Model({version: value}, {version}, version, version)
            return None
        if version in m.claimed:
            return VersionClaimed
        m.values[version] = value
        m.claimed.add(version)
        m.active, m.latest = version, max(m.latest, version)
        return None
    if kind == "delete":  # a secret that does not exist: a no-op, as in setec
        model.pop(name, None)
        return None
    if m is None:
        return SecretNotFound
    if kind == "activate":
        if op[2] == m.active:
            return None
        if op[2] not in m.values:
            return SecretNotFound
        m.active = op[2]
        return None
    if kind == "delete_version":
        if op[2] == m.active:
            return InvalidRequest
        if op[2] not in m.values:
            return SecretNotFound
        del m.values[op[2]]
        return None
    raise AssertionError(op)


@pytest.fixture
def empty_store(backend: Backend) -> Iterator[Callable[[], SqlStore]]:
    """An empty store for each example: PostgreSQL keeps its store and empties the tables."""
    if backend.name == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            paths = (Path(tmp) / f"s{i}.db" for i in range(10_000))
            yield lambda: SecretStore(next(paths), KEK)
        return
    store = backend.open(KEK)

    def empty() -> SqlStore:
        backend.raw("TRUNCATE secrets, versions", ())
        return store

    yield empty
    store.close()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(sequence=ops)
def test_store_follows_the_model(
    empty_store: Callable[[], SqlStore], sequence: list[tuple]
) -> None:  # type: ignore[type-arg]
    store = empty_store()
    model: dict[str, Model] = {}
    for op in sequence:
        wanted = expect(model, op)
        try:
            got: object = getattr(store, "create_version" if op[0] == "create" else op[0])(*op[1:])
        except (VersionClaimed, SecretNotFound, InvalidRequest) as exc:
            got = type(exc)
        assert got == wanted, (op, got, wanted)
    for name, m in model.items():
        info = store.info(name)
        assert (info.versions, info.active_version) == (sorted(m.values), m.active)
        assert store.get(name) == (m.values[m.active], m.active)
        for version, value in m.values.items():
            assert store.get(name, version) == (value, version)
    assert sorted(i.name for i in store.list()) == sorted(model)
    store.close()


@given(
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=512
    )
)
def test_every_printable_name_is_accepted(name: str) -> None:
    if name.startswith("_internal/"):
        return
    assert validate_name(name) == name
