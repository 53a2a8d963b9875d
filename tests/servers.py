"""Real servers for the end-to-end tests: gunicorn (gevent) and redis-server.

Each runs as a child process on a random 127.0.0.1 port and is stopped by
its PID.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Poll ``predicate`` until it returns a true value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class Process:
    """A child process with its output in a log file."""

    def __init__(self, args: list[str], env: dict | None = None, name: str = "process") -> None:
        self.args = args
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL to the whole process group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self.log.close()


class Gunicorn(Process):
    """``gunicorn -k gevent`` serving ``tests.app:create_app()`` (by default)."""

    def __init__(
        self,
        config: dict | None = None,
        app: str = "tests.app:create_app()",
        workers: int = 1,
        port: int | None = None,
        extra: list[str] | None = None,
        env: dict | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ops"
        args = [
            str(BIN / "gunicorn"), "-k", "gevent", "-w", str(workers),
            "-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "10",
            "--worker-connections", "2000",
            # Each master would otherwise open the one $HOME/.gunicorn/gunicorn.ctl.
            "--no-control-socket", *(extra or []), app,
        ]
        super().__init__(
            args, env={"ROBE_TEST_CONFIG": json.dumps(config or {}), **(env or {})}, name="gunicorn"
        )
        self.workers = workers
        try:
            self.wait_ready()
        except Exception:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.output()}")
            booted = len(re.findall(r"Booting worker", self.output()))
            if booted < self.workers:
                return False
            try:
                return requests.get(self.url + "/stats", timeout=1).ok
            except requests.RequestException:
                return False

        wait_until(ready, timeout, 0.05, "gunicorn to serve")

    def ticket(self, http: requests.Session | None = None) -> str:
        response = (http or requests).post(self.url + "/ops/ticket", timeout=5)
        response.raise_for_status()
        return response.json()["ticket"]

    def stats(self) -> dict:
        return requests.get(self.url + "/stats", timeout=5).json()


@contextlib.contextmanager
def gunicorn_pair(config: dict, count: int = 2):
    """``count`` gunicorn servers (one gevent worker each) with one config,
    e.g. sharing one Redis; all stopped at the end, also when one fails to start."""
    servers = []
    try:
        for _ in range(count):
            servers.append(Gunicorn(config))
        yield servers
    finally:
        for srv in servers:
            srv.stop()


class FlaskRun(Process):
    """``flask run`` (Werkzeug's threaded development server, no gevent) with
    the test app, on a random port; ``extra`` goes before ``-p``."""

    def __init__(self, config: dict | None = None, extra: list[str] | None = None, timeout: float = 30.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [str(BIN / "flask"), "--app", "tests.app:create_app()", "run", *(extra or []), "-p", str(self.port)],
            env={"ROBE_TEST_CONFIG": json.dumps(config or {})},
            name="flask-run",
        )

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"flask run exited:\n{self.output()}")
            try:
                return requests.get(self.url + "/stats", timeout=1).ok
            except requests.RequestException:
                return False

        try:
            wait_until(ready, timeout, 0.05, "flask run to serve")
        except Exception:
            self.stop()
            raise


class RedisServer(Process):
    """A scratch ``redis-server`` on a random port, no persistence."""

    def __init__(self, port: int | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        super().__init__(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            name="redis",
        )
        wait_until(self._ping, 10, 0.05, "redis-server to answer")

    def database(self, number: int) -> str:
        """The URL of database ``number`` on this server: a test module's scratch space."""
        return f"redis://127.0.0.1:{self.port}/{number}"

    @contextlib.contextmanager
    def flushed(self, number: int):
        """Database ``number``'s URL, the database emptied before and after use."""
        import redis

        url = self.database(number)
        client = redis.Redis.from_url(url)
        client.flushdb()
        try:
            yield url
        finally:
            client.flushdb()
            client.close()

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False
