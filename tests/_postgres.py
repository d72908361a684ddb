"""A throwaway PostgreSQL server on loopback, from the Debian/Ubuntu package's binaries, for the team set-up tests.

``initdb`` into a fresh temporary directory, ``pg_ctl start`` on a free 127.0.0.1 port with its socket in that
directory and trust authentication for the test user, one database per name asked for; stopped and deleted at the
end. ``initdb`` refuses to run as root, so as root the server runs as the package's ``postgres`` user
(``runuser``). Anything missing or failing raises :class:`Unavailable` with the reason; the fixture turns that into
a skip, or a failure under ``CI=true`` (CI installs the package, so a skip there would hide a broken set-up).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _helpers import free_port

USER = "rrm"


class Unavailable(RuntimeError):
    """PostgreSQL cannot be started here; the message says why and how to fix it."""


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str
    root: Path
    pg_ctl: tuple[str, ...] = ()  # the command that controls it: runuser prefix, pg_ctl, -D data

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def stop(self) -> None:
        """Stop it at once, as a crash would (``-m immediate``: no clean shutdown of open connections)."""
        _run([*self.pg_ctl, "-m", "immediate", "-w", "-t", "60", "stop"], "pg_ctl stop")

    def start(self) -> None:
        """Start it again on the same port, with the same data."""
        options = f"-c listen_addresses={self.host} -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        _run(
            [*self.pg_ctl, "-o", options, "-l", str(self.root / "server.log"), "-w", "-t", "60", "start"],
            "pg_ctl start",
        )

    def create_database(self, name: str) -> str:
        """A new empty database on it; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True, connect_timeout=10
        ) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def find_binaries() -> Path:
    """The newest ``/usr/lib/postgresql/N/bin`` (Debian's layout), else the directory of ``pg_ctl`` on PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.parent.name)] or [0],
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    raise Unavailable(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl and no pg_ctl on PATH); "
        "install Debian's package: apt-get install -y postgresql"
    )


def _as_server_user() -> tuple[list[str], str | None]:
    """The command prefix that runs the server's programs, and the account that owns its files."""
    if os.geteuid() != 0:
        return [], None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise Unavailable(
            "running as root, and initdb refuses root, but there is no 'postgres' user to run it as; "
            "install Debian's postgresql package (it creates one) or run the tests as another user"
        ) from None
    runuser = shutil.which("runuser")
    if runuser is None:
        raise Unavailable("running as root and runuser is missing, so the server cannot run as 'postgres'")
    return [runuser, "-u", "postgres", "--"], "postgres"


def _run(command: list[str], what: str, timeout: float = 120) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{what} failed: {exc}") from None
    if done.returncode:
        raise Unavailable(f"{what} failed ({done.returncode}): {' '.join((done.stderr or done.stdout).split())[-800:]}")


@contextlib.contextmanager
def running(databases: tuple[str, ...]) -> Iterator[Server]:
    """Start a server with ``databases`` created; stop it and delete its files on exit."""
    binaries = find_binaries()
    try:
        import psycopg
    except ImportError:
        raise Unavailable("the PostgreSQL driver psycopg is not installed; pip install 'psycopg[binary]'") from None
    prefix, owner = _as_server_user()
    # Not under pytest's tmp dirs: those are private to the test user, and the server may run as 'postgres'.
    root = Path(tempfile.mkdtemp(prefix="rrm-postgres-"))
    data = root / "data"
    started = False
    try:
        if owner:
            shutil.chown(root, owner)
        port = free_port()
        _run(
            [*prefix, str(binaries / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"],
            "initdb",
        )
        server = Server(
            host="127.0.0.1",
            port=port,
            user=USER,
            root=root,
            pg_ctl=(*prefix, str(binaries / "pg_ctl"), "-D", str(data)),
        )
        server.start()
        started = True
        try:
            for name in databases:
                server.create_database(name)
        except psycopg.Error as exc:
            raise Unavailable(f"the server started but does not accept connections: {exc}") from None
        yield server
    finally:
        if started:
            subprocess.run(
                [*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(root, ignore_errors=True)
