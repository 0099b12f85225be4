"""A throwaway PostgreSQL server for tests: Debian's binaries, 127.0.0.1 only, a free port, every
file in a fresh temporary folder that is removed afterwards.

``initdb`` and ``postgres`` refuse to run as root ("cannot be run as root"), and CI runs as
root: then the server runs as the ``postgres`` user (``runuser -u postgres --``) in a folder
made for it under the system's temporary folder (pytest's own ``tmp_path`` sits in a folder
only root may enter). Local connections (the Unix socket, in that folder) are trusted, for
setting up roles and databases; TCP connections need a password (SCRAM), so a client on
``127.0.0.1`` proves that the password reached it through libpq's environment (``PGPASSWORD``
or ``PGPASSFILE``), never through a URL.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import free_port


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (the newest), else wherever ``initdb`` is."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """``start()`` a server, ``create(role, password, *databases)``, ``stop()`` (removes every file)."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise FileNotFoundError("no PostgreSQL server binaries (make setup installs them: the postgres target)")
        self.port = free_port()
        self.host = "127.0.0.1"
        self.root = Path(tempfile.mkdtemp(prefix="normlab-pg-"))
        self.data = self.root / "data"
        self.as_postgres = os.geteuid() == 0
        self.log = self.root / "server.log"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        command = ["runuser", "-u", "postgres", "--", *args] if self.as_postgres else list(args)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{log}")
        return proc

    def start(self) -> PostgresServer:
        if self.as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
            "-E",
            "UTF8",
        )
        options = f"-h {self.host} -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        return self

    def superuser(self):  # noqa: ANN201  (a psycopg2 connection, autocommit, over the trusted socket)
        import psycopg2

        deadline = time.time() + 30
        while True:
            try:
                conn = psycopg2.connect(host=str(self.root), port=self.port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        conn.autocommit = True
        return conn

    def create(self, role: str, password: str, *databases: str) -> None:
        """A login role with ``password`` (SCRAM) that owns each of ``databases``."""
        from psycopg2 import sql

        conn = self.superuser()
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(role)), (password,))
                for database in databases:
                    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(*map(sql.Identifier, (database, role))))
        finally:
            conn.close()

    def url(self, user: str, database: str) -> str:
        """``postgresql://USER@127.0.0.1:PORT/DATABASE``: no password, libpq's environment gives it."""
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
