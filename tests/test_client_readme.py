"""The README's Python client example, run as written against the example chat."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .servers import ROOT, Gunicorn


def readme_block(section: str, language: str) -> str:
    """The first ``language`` code block of the README's ``section``."""
    readme = (ROOT / "README.md").read_text()
    text = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(rf"```{language}\n(.*?)```", text, re.S).group(1)


@pytest.fixture(scope="module")
def example_server():
    server = Gunicorn(app="example_app:app")
    yield server
    server.stop()


def test_python_client_example_runs_as_written(example_server):
    """The example logs in, connects, subscribes, sends, asks who is here and closes: its handlers
    print what the README says."""
    code = readme_block("The Python client", "python").replace("127.0.0.1:9292", f"127.0.0.1:{example_server.port}")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Handlers print from the client's thread, the main code from its own: only
    # the order within each is fixed, and their lines may interleave.
    out = result.stdout
    assert re.search(r"online as \S+", out) and "(re)load the room" in out, out  # a first subscribe is never recovered
    assert "{'queued': True}" in out and "offline 1000" in out, out
    assert "refused" not in out and "error:" not in out, out
    # The example's rooms have presence: alice is on the lobby, listed once in the snapshot and the answer.
    assert "online: 1" in out and "people here: 1 ['alice']" in out, out
