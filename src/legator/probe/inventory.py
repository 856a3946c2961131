"""What the probe reports about its host: heartbeat metrics and a fuller inventory."""

from __future__ import annotations

import os
import platform
import pwd
import shutil
import socket
import subprocess
import time

import psutil

from legator.fleet.protocol import Heartbeat


def heartbeat(running: int = 0) -> Heartbeat:
    load1, load5, load15 = os.getloadavg()
    return Heartbeat(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=psutil.virtual_memory().percent,
        disk_percent=psutil.disk_usage("/").percent,
        load1=load1,
        load5=load5,
        load15=load15,
        uptime_s=time.time() - psutil.boot_time(),
        running=running,
    )


def _run(argv: list[str], limit: int = 5000) -> list[str]:
    if shutil.which(argv[0]) is None:
        return []
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return done.stdout.splitlines()[:limit]


def packages() -> list[dict[str, str]]:
    rows = _run(["dpkg-query", "-W", "-f=${Package}\t${Version}\n"])
    if not rows:
        rows = _run(["rpm", "-qa", "--qf", "%{NAME}\t%{VERSION}-%{RELEASE}\n"])
    return [
        {"name": name, "version": version}
        for name, _, version in (row.partition("\t") for row in rows)
        if name
    ]


def services() -> list[dict[str, str]]:
    rows = _run(
        [
            "systemctl",
            "list-units",
            "--type=service",
            "--all",
            "--no-legend",
            "--plain",
            "--no-pager",
        ]
    )
    out = []
    for row in rows:
        parts = row.split(None, 4)
        if len(parts) >= 4:
            out.append({"name": parts[0], "load": parts[1], "active": parts[2], "sub": parts[3]})
    return out


def collect() -> dict[str, object]:
    uname = platform.uname()
    memory = psutil.virtual_memory()
    disks = []
    for part in psutil.disk_partitions(all=False):
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue
        disks.append(
            {
                "device": part.device,
                "mountpoint": part.mountpoint,
                "fstype": part.fstype,
                "total": usage.total,
                "used": usage.used,
                "percent": usage.percent,
            }
        )
    interfaces = {
        name: [addr.address for addr in addrs if addr.family in (socket.AF_INET, socket.AF_INET6)]
        for name, addrs in psutil.net_if_addrs().items()
    }
    users = [
        {"name": entry.pw_name, "uid": entry.pw_uid, "shell": entry.pw_shell}
        for entry in pwd.getpwall()
        if entry.pw_uid == 0 or entry.pw_uid >= 1000
    ]
    os_release = {}
    try:
        with open("/etc/os-release") as handle:
            for line in handle:
                key, _, value = line.strip().partition("=")
                if key:
                    os_release[key] = value.strip('"')
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "os": {"system": uname.system, "release": os_release.get("PRETTY_NAME", "")},
        "kernel": uname.release,
        "arch": uname.machine,
        "cpus": {"logical": psutil.cpu_count(), "physical": psutil.cpu_count(logical=False)},
        "memory": {"total": memory.total, "available": memory.available},
        "disks": disks,
        "interfaces": interfaces,
        "packages": packages(),
        "services": services(),
        "users": users,
        "python": platform.python_version(),
    }
