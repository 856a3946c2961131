"""Envelope signing and verification: the exact material, tampering, staleness and replay."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from legator.core.canonical import canonical_json
from legator.fleet.protocol import (
    Envelope,
    VerificationError,
    Verifier,
    derive_probe_key,
    new_envelope,
    new_key_salt,
    sign,
    signed,
)

MASTER = bytes(range(32))


def test_probe_key_is_hmac_of_master_and_probe_id() -> None:
    """The empty salt (probes enrolled before salts) derives the key such probes were given."""
    expected = hmac.new(MASTER, b"legator-probe-signing|prb-0011aabb", hashlib.sha256).hexdigest()
    assert derive_probe_key(MASTER, "prb-0011aabb") == expected
    assert derive_probe_key(MASTER, "prb-0011aabb", "") == expected
    assert derive_probe_key(MASTER, "prb-0011aabc") != expected


def test_each_enrolment_salt_gives_another_key() -> None:
    salt = new_key_salt()
    assert len(salt) == 32 and salt != new_key_salt()
    material = f"legator-probe-signing|prb-0011aabb|{salt}".encode()
    salted = derive_probe_key(MASTER, "prb-0011aabb", salt)
    assert salted == hmac.new(MASTER, material, hashlib.sha256).hexdigest()
    assert salted not in (
        derive_probe_key(MASTER, "prb-0011aabb"),
        derive_probe_key(MASTER, "prb-0011aabb", new_key_salt()),
        derive_probe_key(MASTER, "prb-0011aabc", salt),
    )
    for salt_, probe_id in (("not hex", "prb-1"), ("AB", "prb-1"), ("", "prb|1")):
        with pytest.raises(ValueError, match="salt"):
            derive_probe_key(MASTER, probe_id, salt_)


def test_signature_covers_id_type_ts_and_canonical_payload() -> None:
    key = derive_probe_key(MASTER, "prb-1")
    env = signed("command", {"b": 1, "a": [1, "x"]}, key)
    material = f"{env.id}|{env.type}|{env.ts}|{canonical_json(env.payload)}".encode()
    assert env.sig == hmac.new(bytes.fromhex(key), material, hashlib.sha256).hexdigest()
    assert canonical_json(env.payload) == '{"a":[1,"x"],"b":1}'


def _refusal(verifier: Verifier, env: Envelope, **kw: float) -> str:
    with pytest.raises(VerificationError) as info:
        verifier.verify(env, **kw)
    return info.value.reason


def test_verifier_refuses_unsigned_tampered_stale_and_replayed() -> None:
    key = derive_probe_key(MASTER, "prb-1")
    verifier = Verifier(key)
    good = signed("command", {"command": "ls"}, key)
    verifier.verify(good)
    assert _refusal(verifier, good) == "replayed"
    assert _refusal(verifier, new_envelope("command", {"command": "ls"})) == "unsigned"
    tampered = signed("command", {"command": "ls"}, key)
    tampered = tampered.model_copy(update={"payload": {"command": "rm -rf /"}})
    assert _refusal(verifier, tampered) == "bad_signature"
    retyped = signed("ping", {}, key).model_copy(update={"type": "command"})
    assert _refusal(verifier, retyped) == "bad_signature"
    other_key = signed("command", {}, derive_probe_key(MASTER, "prb-2"))
    assert _refusal(verifier, other_key) == "bad_signature"
    stale = sign(new_envelope("command", {}).model_copy(update={"ts": "2020-01-01T00:00:00Z"}), key)
    assert _refusal(verifier, stale) == "stale"
    future = signed("command", {}, key)
    assert _refusal(verifier, future, now=time.time() - 301) == "stale"
    assert (
        _refusal(verifier, sign(good.model_copy(update={"ts": "yesterday"}), key))
        == "bad_timestamp"
    )


def test_replay_memory_is_bounded() -> None:
    key = derive_probe_key(MASTER, "prb-1")
    verifier = Verifier(key, capacity=10)
    for _ in range(50):
        verifier.verify(signed("ping", {}, key))
    assert len(verifier._seen) == 10
