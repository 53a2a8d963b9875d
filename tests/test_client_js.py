"""The browser client's own logic (backoff, frames, queue, ping) and the
shared client cases (tests/client_cases.json), unit-tested with node's test
runner and a fake WebSocket: see tests/js/."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from .servers import ROOT

NODE = shutil.which("node")
JS_TESTS = sorted((ROOT / "tests" / "js").glob("*.test.mjs"))


def test_js_tests_include_the_shared_cases():
    """The shared client cases are among the node tests, so both clients run them."""
    assert ROOT / "tests" / "js" / "cases.test.mjs" in JS_TESTS


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.parametrize("path", JS_TESTS, ids=lambda path: path.name)
def test_client_js_unit_tests_pass(path):
    """Every node test of static/client.js in this file passes."""
    result = subprocess.run(
        [NODE, "--test", str(path.relative_to(ROOT))],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout
