"""Security: while a search runs on the embedded defaults (local Ray, sqlite MLflow), no process it
started listens on anything but the loopback interface."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _address(hex_addr: str) -> str:
    """The text form of an address as /proc/net/tcp{,6} writes it (little-endian 32-bit words)."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return ".".join(str(b) for b in words)
    if words[:12] == b"\0" * 10 + b"\xff\xff":
        return "::ffff:" + ".".join(str(b) for b in words[12:])
    import ipaddress

    return str(ipaddress.IPv6Address(words))


def listening_sockets() -> dict[int, str]:
    """socket inode -> 'address:port' of every TCP socket in LISTEN state on this machine."""
    out = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A":  # TCP_LISTEN
                addr, port = f[1].split(":")
                out[int(f[9])] = f"{_address(addr)}:{int(port, 16)}"
    return out


def process_tree(root: int) -> set[int]:
    """``root`` and every process descended from it."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def sockets_of(pids: set[int], listening: dict[int, str]) -> dict[str, str]:
    """'address:port' -> process name, for the listening sockets the processes ``pids`` hold."""
    found = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in listening:
                    found[listening[inode]] = comm
    return found


def test_proc_net_addresses_read_as_the_kernel_writes_them():
    assert _address("0100007F") == "127.0.0.1" and _address("00000000") == "0.0.0.0"
    assert _address("0000000000000000FFFF00000100007F") == "::ffff:127.0.0.1"
    assert _address("00000000000000000000000001000000") == "::1"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_a_default_search_listens_on_loopback_only(tmp_path, data_dir):
    cmd = [sys.executable, "-m", "matfusion.cli", "search", str(REPO / "configs" / "smoke.yaml")]
    cmd += ["--data-dir", str(data_dir), "--set", "data.limit=60", "--set", "search.num_samples=2"]
    cmd += ["--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}"]
    cmd += ["--set", f"mlflow.artifact_location={tmp_path / 'artifacts'}"]
    cmd += ["--set", f"search.storage_path={tmp_path / 'ray'}"]
    log = open(tmp_path / "search.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # as a user's shell
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[str, str] = {}
    try:
        while proc.poll() is None:  # sample the search's sockets for as long as it runs
            seen.update(sockets_of(process_tree(proc.pid), listening_sockets()))
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    assert proc.returncode == 0, (tmp_path / "search.log").read_text()[-3000:]
    # Ray's GCS and raylet listen (so the sampling saw the search running), each on loopback
    assert {"gcs_server", "raylet"} <= set(seen.values()), seen
    off_loopback = {a: p for a, p in seen.items() if a.rsplit(":", 1)[0] not in LOOPBACK}
    assert not off_loopback, off_loopback
    print(f"listening sockets of the search: {seen}")
