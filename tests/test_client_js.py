"""The browser client's own logic (backoff, frames, queue, ping), unit-tested
with node's test runner and a fake WebSocket: see tests/js/."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from .servers import ROOT

NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_client_js_unit_tests_pass():
    """Every node unit test of static/client.js passes."""
    result = subprocess.run(
        [NODE, "--test", "tests/js/client.test.mjs"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout
