"""The README's server-side examples, run as written: the test client's
tests under pytest, the several-workers factory, the logging dictConfig."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from flask import Flask

from flask_robe_sockets import RobeSockets
from flask_robe_sockets.backends.redis import RedisBackend

from .servers import ROOT


def readme_blocks(section: str, language: str = "python") -> list[str]:
    """The ``language`` code blocks of the README's ``section`` (a ``## `` heading)."""
    readme = (ROOT / "README.md").read_text()
    text = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_testing_section_runs_under_pytest(tmp_path):
    """The "Testing your app" example is a test module: pytest runs its tests and they pass."""
    (block,) = readme_blocks("Testing your app")
    (tmp_path / "test_readme_example.py").write_text(block)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", "test_readme_example.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^2 passed", done.stdout, re.M), done.stdout


@pytest.mark.redis
def test_several_workers_factory_reads_the_redis_url(redis_server, monkeypatch):
    """The factory of "Deploying with several workers" puts the app on Redis
    from ROBE_SOCKETS_REDIS_URL; REDIS_URL alone leaves it in memory."""
    block = next(b for b in readme_blocks("Deploying with several workers") if "def create_app" in b)
    url = redis_server.database(7)
    monkeypatch.setenv("SECRET_KEY", "k")
    monkeypatch.setenv("ROBE_SOCKETS_REDIS_URL", url)
    namespace = {"__name__": __name__, "os": __import__("os"), "Flask": Flask, "sockets": RobeSockets()}
    exec(block, namespace)
    app = namespace["create_app"]()
    backend = app.extensions["robe_sockets"].backend
    assert isinstance(backend, RedisBackend) and backend.url == url
    backend.close()
    for code in readme_blocks("Deploying with several workers", r"\w*"):
        assert not re.search(r"(?<!ROBE_SOCKETS_)REDIS_URL", code), code


def test_logs_dictconfig_replaces_the_default_handler():
    """The "Logs" dictConfig, run before the app: its handler and format are
    used, INFO included, and the default handler is not added."""
    (block,) = readme_blocks("Logs")
    script = block + (
        "\nimport logging\n"
        "from flask import Flask\n"
        "from flask_robe_sockets import RobeSockets\n"
        "from flask_robe_sockets.extension import default_handler\n"
        "app = Flask(__name__)\n"
        "app.secret_key = 'k'\n"
        "RobeSockets(app)\n"
        "logger = logging.getLogger('flask_robe_sockets')\n"
        "assert default_handler not in logger.handlers and len(logger.handlers) == 1\n"
        "logger.info('connection x opened')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \d+ INFO flask_robe_sockets: connection x opened\n", done.stderr
    ), done.stderr
