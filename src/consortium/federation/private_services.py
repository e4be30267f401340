"""Throw-away PostgreSQL and Mosquitto servers for fault tests and benchmarks.

Fault scenarios stop and restart the database or the broker; they must never
touch the machine's shared services. :class:`PrivatePostgres` runs ``initdb``
and ``pg_ctl`` from the installed PostgreSQL binaries in a temporary folder on a
free loopback port; :class:`PrivateMosquitto` runs ``mosquitto`` with a
generated configuration on a free loopback port. Both stop (and delete their
folder) on ``close()`` or when used as context managers.

PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` system user (``runuser``), in a folder owned by it.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from consortium.errors import ConsortiumError

logger = logging.getLogger(__name__)


class ServiceError(ConsortiumError):
    """A private test service could not be started or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_port(host: str, port: int, *, timeout: float, up: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                if up:
                    return True
        except OSError:
            if not up:
                return True
        time.sleep(0.1)
    return False


class PrivatePostgres:
    """A PostgreSQL server of our own: ``initdb`` in a temp folder, ``pg_ctl`` start/stop.

    Parameters
    ----------
    bin_dir : str or Path or None
        Folder with ``initdb``/``pg_ctl``; default: found on PATH.
    """

    def __init__(self, *, bin_dir: str | Path | None = None) -> None:
        initdb = shutil.which("initdb", path=str(bin_dir) if bin_dir else None)
        pg_ctl = shutil.which("pg_ctl", path=str(bin_dir) if bin_dir else None)
        if initdb is None or pg_ctl is None:
            raise ServiceError("PostgreSQL's initdb/pg_ctl were not found on PATH; install PostgreSQL.")
        self._initdb, self._pg_ctl = initdb, pg_ctl
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="consortium-pg-"))
        self.data_dir = self.root / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._run([self._initdb, "-D", str(self.data_dir), "-A", "trust", "-U", "root", "--no-sync"], "initdb")
        self.start()

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the server's ``postgres`` database."""
        return f"postgresql+psycopg://root@127.0.0.1:{self.port}/postgres"

    def _run(self, command: list[str], what: str, timeout: float = 60.0) -> None:
        done = subprocess.run(self._as_user + command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise ServiceError(f"PostgreSQL {what} failed (exit {done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> None:
        """Start (or restart) the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run([self._pg_ctl, "-D", str(self.data_dir), "-l", str(self.root / "server.log"), "-o", options,
                   "-w", "start"], "start")
        if not _wait_port("127.0.0.1", self.port, timeout=30):
            raise ServiceError(f"PostgreSQL did not listen on port {self.port}; see {self.root / 'server.log'}")
        logger.info("Private PostgreSQL up on 127.0.0.1:%d", self.port)

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server (``fast``: abort client transactions; ``immediate``: like a crash)."""
        self._run([self._pg_ctl, "-D", str(self.data_dir), "-m", mode, "-w", "stop"], "stop")
        logger.info("Private PostgreSQL on port %d stopped (%s)", self.port, mode)

    def close(self) -> None:
        """Stop the server if running and delete its folder."""
        if self.data_dir.exists():
            subprocess.run(self._as_user + [self._pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "stop"],
                           capture_output=True, check=False, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class PrivateMosquitto:
    """A Mosquitto broker of our own on a free loopback port (anonymous, no persistence)."""

    def __init__(self, *, executable: str = "mosquitto") -> None:
        exe = shutil.which(executable) or shutil.which(executable, path="/usr/sbin:/usr/local/sbin")
        if exe is None:
            raise ServiceError("The mosquitto executable was not found; install Mosquitto.")
        self._exe = exe
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="consortium-mqtt-"))
        self.config = self.root / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\nmax_inflight_messages 1000\n"
        )
        if os.geteuid() == 0:
            os.chmod(self.root, 0o755)
        self._proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the broker and wait until it listens."""
        log = (self.root / "mosquitto.log").open("ab")
        self._proc = subprocess.Popen([self._exe, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        log.close()
        if not _wait_port("127.0.0.1", self.port, timeout=15):
            self.stop()
            raise ServiceError(f"Mosquitto did not listen on port {self.port}; see {self.root / 'mosquitto.log'}")

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def close(self) -> None:
        """Stop the broker and delete its folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivateMosquitto:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
