"""Quadlet parsing, per-type validation, conflicts and the real generator's dry run."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legator.deploy.quadlet.check import conflicts_dir, validate_dir
from legator.deploy.quadlet.conflicts import find_conflicts
from legator.deploy.quadlet.generator import dry_run
from legator.deploy.quadlet.keys import KEYS
from legator.deploy.quadlet.parse import ParseError, parse_unit
from legator.deploy.quadlet.validate import parse_publish, validate_unit

WEB = """\
[Unit]
Description=web
Wants=network-online.target
After=network-online.target db.service
Requires=db.service

[Container]
Image=docker.io/library/nginx:1
ContainerName=web
PublishPort=127.0.0.1:18081:80
PublishPort=18082:443/tcp
Volume=web-data.volume:/data
Network=app.network
Exec=sh -c \\
  "sleep 1"

[Install]
WantedBy=default.target
"""


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def checks(findings: list, level: str = "error") -> list[str]:  # type: ignore[type-arg]
    return sorted(f.check for f in findings if f.level == level)


def test_parse_keeps_repeated_keys_and_continuations() -> None:
    unit = parse_unit("web.container", WEB)
    assert unit.values("Container", "PublishPort") == ["127.0.0.1:18081:80", "18082:443/tcp"]
    assert unit.get("Container", "Exec") == 'sh -c  "sleep 1"'
    assert unit.service_name == "web.service"
    assert parse_unit("x.volume", "[Volume]\n").service_name == "x-volume.service"


def test_a_comment_is_never_continued(tmp_path: Path, generator: str) -> None:
    text = "[Container]\nImage=localhost/x:1\n# note \\\nPublishPort=127.0.0.1:8080:80\n"
    unit = parse_unit("web.container", text)
    assert unit.values("Container", "PublishPort") == ["127.0.0.1:8080:80"]
    run = dry_run(write(tmp_path, {"web.container": text}))
    assert "--publish 127.0.0.1:8080:80" in run.units["web.service"]  # the generator agrees


def test_comments_and_blank_lines_inside_a_continuation_are_skipped(
    tmp_path: Path, generator: str
) -> None:
    text = (
        '[Container]\nImage=localhost/x:1\nExec=sh -c \\\n# a\n; b\n\n  "sleep 1"\nPublishPort=81\n'
    )
    unit = parse_unit("web.container", text)
    assert unit.get("Container", "Exec") == 'sh -c  "sleep 1"'
    assert unit.values("Container", "PublishPort") == ["81"]
    run = dry_run(write(tmp_path, {"web.container": text}))
    assert 'localhost/x:1 sh -c "sleep 1"' in run.units["web.service"]
    assert "--publish 81" in run.units["web.service"]


@pytest.mark.parametrize(
    "line",
    [
        "HealthLogDestination=local",
        "HealthMaxLogCount=5",
        "HealthMaxLogSize=500",
        "VolatileTmp=true",
        "RemapUsers=keep-id",
    ],
)
def test_container_keys_of_the_generator_are_valid(
    tmp_path: Path, generator: str, line: str
) -> None:
    directory = write(tmp_path, {"a.container": f"[Container]\nImage=localhost/x:1\n{line}\n"})
    report = validate_dir(directory)
    assert [str(f) for f in report.findings if f.level == "error"] == []


def test_every_container_key_passes_the_generator(tmp_path: Path, generator: str) -> None:
    """No key in leger's [Container] list is one the generator would reject."""
    rejected = []
    for key in sorted(KEYS["Container"]):
        directory = write(
            tmp_path / key, {"a.container": f"[Container]\nImage=localhost/x:1\n{key}=1\n"}
        )
        if any("unsupported key" in f.message for f in dry_run(directory).findings):
            rejected.append(key)
    assert rejected == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Image=x\n", r"before any \[Section\]"),
        ("[Container\nImage=x\n", "malformed section header"),
        ("[Container]\njust words\n", "expected KEY=VALUE"),
    ],
)
def test_parse_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ParseError, match=message) as caught:
        parse_unit("a.container", text)
    assert caught.value.line >= 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_parse_never_fails_other_than_with_parse_error(text: str) -> None:
    with contextlib.suppress(ParseError):
        parse_unit("a.container", text)


@pytest.mark.parametrize(
    ("name", "text", "check"),
    [
        ("a.container", "[Container]\nContainerName=a\n", "required"),  # no Image
        ("a.container", "[Container]\nImage=x\nBogus=1\n", "key"),
        ("a.container", "[Container]\nImage=x\nPublishPort=99999:80\n", "value"),
        ("a.container", "[Container]\nImage=x\nSecret=pw,kind=env\n", "value"),
        ("a.container", "[Volume]\n", "section"),
        ("a.volume", "[Volume]\nImage=x\nFoo=1\n", "key"),
        ("a.network", "[Network]\nSubnet=10.0.0.0/24\nBad=1\n", "key"),
        ("a.pod", "[Pod]\nImage=x\n", "key"),
        ("a.kube", "[Kube]\nNetwork=a.network\n", "required"),  # no Yaml
        ("a.image", "[Image]\nArch=amd64\n", "required"),
        ("a.build", "[Build]\nImageTag=localhost/a\n", "required"),  # no File
    ],
)
def test_validate_per_type(name: str, text: str, check: str) -> None:
    assert check in checks(validate_unit(parse_unit(name, text)))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("a.container", WEB),
        ("a.volume", "[Volume]\nVolumeName=data\n"),
        ("a.network", "[Network]\nSubnet=10.89.0.0/24\n"),
        ("a.pod", "[Pod]\nPublishPort=8080:80\n"),
        ("a.kube", "[Kube]\nYaml=/etc/app.yaml\n"),
        ("a.image", "[Image]\nImage=docker.io/library/redis:7\n"),
        ("a.build", "[Build]\nImageTag=localhost/a\nFile=/src/Containerfile\n"),
    ],
)
def test_valid_units_pass(name: str, text: str) -> None:
    assert validate_unit(parse_unit(name, text)) == []


def test_publish_port_forms() -> None:
    assert [p.host for p in parse_publish("8080:80") or []] == [8080]
    assert parse_publish("80") == []  # container port only
    assert [p.host for p in parse_publish("127.0.0.1:9000-9002:9000-9002/udp") or []] == [
        9000,
        9001,
        9002,
    ]
    assert parse_publish("[::1]:53:53/udp")[0].ip == "::1"  # type: ignore[index]
    assert parse_publish("eighty") is None


def test_conflicts_in_the_set(tmp_path: Path) -> None:
    directory = write(
        tmp_path,
        {
            "a.container": "[Container]\nImage=x\nContainerName=same\nPublishPort=18090:80\n"
            "Volume=shared.volume:/d\nNetwork=missing.network\n",
            "b.container": "[Container]\nImage=x\nContainerName=same\n"
            "PublishPort=0.0.0.0:18090:81\nVolume=shared.volume:/e\n",
            "shared.volume": "[Volume]\n",
            "other.volume": "[Volume]\nVolumeName=systemd-shared\n",
        },
    )
    found = conflicts_dir(directory, check_host_ports=False).findings
    assert checks(found) == ["duplicate-name", "missing", "port", "volume", "volume"]
    messages = " ".join(f.message for f in found)
    assert "missing.network" in messages and "18090/tcp" in messages


def test_systemd_units_are_not_missing_and_udp_does_not_clash_with_tcp(tmp_path: Path) -> None:
    directory = write(
        tmp_path,
        {
            "web.container": WEB,
            "web-data.volume": "[Volume]\n",
            "app.network": "[Network]\n",
            "dns.container": "[Container]\nImage=x\nPublishPort=18081:53/udp\n"
            "[Unit]\nAfter=network-online.target sshd.service\nRequires=local-fs.target\n",
        },
    )
    assert conflicts_dir(directory, check_host_ports=False).findings == []


def test_dependency_cycles(tmp_path: Path) -> None:
    directory = write(
        tmp_path,
        {
            "a.container": "[Unit]\nRequires=b.service\n[Container]\nImage=x\n",
            "b.container": "[Unit]\nAfter=c.service\n[Container]\nImage=x\n",
            "c.container": "[Unit]\nWants=a.service\n[Container]\nImage=x\n",
            "d.container": "[Unit]\nRequires=a.service\n[Container]\nImage=x\n",
        },
    )
    found = conflicts_dir(directory, check_host_ports=False).findings
    assert checks(found) == ["cycle"]
    assert "a.container -> b.container -> c.container -> a.container" in found[0].message


def test_host_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        unit = parse_unit("a.container", f"[Container]\nImage=x\nPublishPort={port}:80\n")
        assert checks(find_conflicts([unit])) == ["port-in-use"]
        assert find_conflicts([unit], own_ports={port}) == []  # the deployment being replaced
        assert find_conflicts([unit], check_host_ports=False) == []


def test_generator_dry_run_renders_and_reports(tmp_path: Path, generator: str) -> None:
    good = write(
        tmp_path / "good",
        {"web.container": WEB, "web-data.volume": "[Volume]\n", "app.network": "[Network]\n"},
    )
    run = dry_run(good)
    assert run.generator == generator
    assert "ExecStart=" in run.units["web.service"]
    assert "--publish 127.0.0.1:18081:80" in run.units["web.service"]
    assert set(run.units) >= {"web.service", "web-data-volume.service", "app-network.service"}
    assert [f for f in run.findings if f.level == "error"] == []


def test_validate_dir_reports_generator_errors(tmp_path: Path, generator: str) -> None:
    directory = write(tmp_path, {"a.container": "[Container]\nImage=docker.io/a/b:1\nBogusKey=1\n"})
    report = validate_dir(directory)
    assert {(f.check, f.level) for f in report.findings} >= {
        ("key", "error"),
        ("generator", "error"),
    }
    assert "BogusKey" in " ".join(f.message for f in report.findings if f.check == "generator")
