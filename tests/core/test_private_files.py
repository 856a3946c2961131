"""Private files (keys, tokens, state): written whole, 0600, by any number of writers at once."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from legator.core.security import write_private_file


def test_concurrent_writers_each_replace_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    contents = [f'{{"writer": {i}, "pad": "{"x" * 4096}"}}' for i in range(8)]

    def write(content: str) -> None:
        for _ in range(40):
            write_private_file(path, content)

    with ThreadPoolExecutor(8) as pool:
        for done in [pool.submit(write, c) for c in contents]:
            done.result()  # before: FileNotFoundError, writers sharing one temporary name
    assert path.read_text() in contents
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left


def test_a_file_planted_where_the_temporary_would_go_is_not_written(tmp_path: Path) -> None:
    """In a shared folder someone may create ``<name>.tmp`` first, readable by them: the
    secret must not be written into their file."""
    planted = tmp_path / "cache.json.tmp"
    planted.write_text("")
    planted.chmod(0o666)
    write_private_file(tmp_path / "cache.json", "secret")
    assert planted.read_text() == ""
    assert (tmp_path / "cache.json").read_text() == "secret"
