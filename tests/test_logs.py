"""The library's log records carry time and level by default, the Flask way:
a handler on the ``flask_robe_sockets`` logger when the app configured none,
never on the root logger. Each case runs in a fresh interpreter, since
pytest configures logging of its own."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

APP = """
import logging
from flask import Flask
from flask_robe_sockets import RobeSockets
from flask_robe_sockets.extension import default_handler

app = Flask(__name__)
app.secret_key = "k"
sockets = RobeSockets(app)
logger = logging.getLogger("flask_robe_sockets")
"""

#: "[2026-01-02 03:04:05,678] WARNING in flask_robe_sockets: ..."
STAMPED = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] (\w+) in ([\w.]+): (.*)$")


def run(script: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


def test_without_logging_configured_records_have_time_and_level():
    """No logging configuration: a warning reaches stderr stamped with its
    time, level and logger; the root logger is left alone."""
    done = run(APP + """
assert logger.handlers == [default_handler]
assert logging.getLogger().handlers == []
logger.warning("the queue is %s", "down")
logging.getLogger("flask_robe_sockets.client").error("a child's record")
""")
    lines = done.stderr.splitlines()
    assert [STAMPED.match(line).groups() for line in lines] == [
        ("WARNING", "flask_robe_sockets", "the queue is down"),
        ("ERROR", "flask_robe_sockets.client", "a child's record"),
    ]


def test_an_app_with_its_own_logging_gets_no_second_handler():
    """Logging configured first (basicConfig, dictConfig): no handler is added,
    and each record is written once, in the app's format."""
    done = run("""
import logging
logging.basicConfig(format="app: %(levelname)s %(message)s")
""" + APP + """
assert logger.handlers == []
logger.warning("once")
""")
    assert done.stderr.splitlines() == ["app: WARNING once"]


def test_init_app_twice_adds_one_handler():
    """A second app (or init_app) on the same process does not add it again."""
    done = run(APP + """
other = Flask("other")
other.secret_key = "k"
RobeSockets(other)
assert logger.handlers == [default_handler]
logger.info("not shown: below WARNING")
logger.warning("shown")
""")
    assert len(done.stderr.splitlines()) == 1
    assert STAMPED.match(done.stderr.splitlines()[0]).group(3) == "shown"
