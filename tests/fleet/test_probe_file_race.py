"""File operations against a local user racing the probe: a path component swapped for a
symlink between the probe's check and its open is refused, never followed out of the allowed
paths (the probe runs as root; the user may only write inside an allowed directory)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from legator.fleet.protocol import FileRequest
from legator.probe import fileops

SECRET = "root:$6$not-for-you:19000:0:99999:7:::\n"  # stands for /etc/shadow
OPS = ["read", "readlines", "search", "stat"]


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    allowed = tmp_path / "allowed"
    (allowed / "logs").mkdir(parents=True)
    (allowed / "logs" / "app.log").write_text("harmless\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "app.log").write_text(SECRET)
    return allowed, outside


def _perform(path: Path, allowed: Path, op: str) -> object:
    request = FileRequest(request_id="r1", op=op, path=str(path), pattern="root")  # type: ignore[arg-type]
    return fileops.perform(request, [str(allowed)], allowed / "probe.yaml")


def _swap_after_the_check(monkeypatch: pytest.MonkeyPatch, swap: Callable[[], None]) -> None:
    """The race, made certain: the swap lands right after the probe's last path check."""
    checked = fileops.check_not_secret

    def check_then_swap(*args: object) -> None:
        checked(*args)  # type: ignore[arg-type]
        swap()

    monkeypatch.setattr(fileops, "check_not_secret", check_then_swap)


def _swap_directory(allowed: Path, outside: Path) -> Callable[[], None]:
    def swap() -> None:
        (allowed / "logs").rename(allowed / "logs.old")
        (allowed / "logs").symlink_to(outside)

    return swap


def _swap_file(allowed: Path, outside: Path) -> Callable[[], None]:
    def swap() -> None:
        (allowed / "logs" / "app.log").unlink()
        (allowed / "logs" / "app.log").symlink_to(outside / "app.log")

    return swap


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("swap", [_swap_directory, _swap_file], ids=["directory", "file"])
def test_a_component_swapped_for_a_symlink_after_the_check_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    op: str,
    swap: Callable[[Path, Path], Callable[[], None]],
) -> None:
    allowed, outside = _tree(tmp_path)
    target = allowed / "logs" / "app.log"
    assert _perform(target, allowed, op)  # unswapped: an ordinary allowed file
    _swap_after_the_check(monkeypatch, swap(allowed, outside))
    with pytest.raises(fileops.FileDenied, match="changed while the probe was opening it") as info:
        result = _perform(target, allowed, op)
        pytest.fail(f"the probe followed the swapped-in symlink: {result!r}")
    assert "not-for-you" not in str(info.value)
    assert str(outside) not in str(info.value)


def test_what_was_opened_must_lie_inside_the_allowed_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's name for the opened file is checked too, whatever opened it."""
    allowed, outside = _tree(tmp_path)
    (allowed / "logs" / "app.log").unlink()
    (allowed / "logs" / "app.log").symlink_to(outside / "app.log")
    monkeypatch.setattr(fileops, "resolve_allowed", lambda path, roots: Path(path))
    monkeypatch.setattr(
        fileops, "open_nofollow", lambda path, real, flags: os.open(real, flags & ~os.O_NOFOLLOW)
    )
    with pytest.raises(fileops.FileDenied, match="outside the allowed paths"):
        _perform(allowed / "logs" / "app.log", allowed, "read")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    allowed, _ = _tree(tmp_path)
    os.mkfifo(allowed / "pipe")
    with pytest.raises(fileops.FileDenied, match="not a regular file"):
        _perform(allowed / "pipe", allowed, "read")
    assert _perform(allowed / "pipe", allowed, "stat")["type"] == "file"  # type: ignore[index]


def test_reads_are_unchanged_inside_the_allowed_paths(tmp_path: Path) -> None:
    allowed, _ = _tree(tmp_path)
    (allowed / "logs" / "link.log").symlink_to("app.log")  # a link that stays inside
    target = allowed / "logs" / "app.log"
    assert _perform(target, allowed, "read") == {"content": "harmless\n", "truncated": False}
    assert _perform(allowed / "logs" / "link.log", allowed, "readlines") == {
        "start": 1,
        "lines": ["harmless"],
        "truncated": False,
    }
    assert _perform(target, allowed, "search") == {"matches": [], "truncated": False}
    info = _perform(allowed / "logs", allowed, "stat")
    assert info["type"] == "dir" and info["path"] == str(allowed / "logs")  # type: ignore[index]
    with pytest.raises(fileops.FileDenied, match="not a regular file"):
        _perform(allowed / "logs", allowed, "read")
    for op in OPS:
        with pytest.raises(FileNotFoundError, match=r"missing\.log"):
            _perform(allowed / "logs" / "missing.log", allowed, op)
