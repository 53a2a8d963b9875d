"""``flask robe ...``: the command line, through the app's configured backend.

``init_app`` adds the group to ``app.cli``::

    flask --app myapp robe publish room:lobby message '{"text": "hi"}'
    flask --app myapp robe workers
    flask --app myapp robe disconnect --identity alice

A command runs in a process of its own, so it can only reach what the
serving workers share: with the in-memory backend every command exits 2.
"""
from __future__ import annotations

import json
import time
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from . import control, protocol
from .errors import BackendUnavailable

#: Why nothing works without a shared backend, and the fix.
NEEDS_SHARED_BACKEND = (
    "the in-memory backend keeps channels and workers in the server's own memory, in another"
    " process than this command: flask robe needs a shared backend. Set ROBE_SOCKETS_REDIS_URL"
    " (Redis) in the app's config, for the server and for this command alike."
)

robe = AppGroup(
    "robe", help="Publish to channels, list the workers and close connections, through the app's backend."
)


class _UsageExit(click.ClickException):
    """A command that cannot work as the app is set up: exit status 2."""

    exit_code = 2


def _server() -> Any:
    server = current_app.extensions.get("robe_sockets")
    if server is None:
        raise _UsageExit("this app has no RobeSockets: call sockets.init_app(app) in the app factory")
    if server.heartbeat is not None:
        # This process only runs a command: it is no worker to list, even
        # when the app is imported under gevent's patching.
        server.heartbeat.stop()
    if not server.backend.shared:
        raise _UsageExit(NEEDS_SHARED_BACKEND)
    return server


def _json_value(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return protocol.loads(text)
    except ValueError as exc:
        raise click.BadParameter(
            f"not strict JSON ({exc}); quote it for the shell, e.g. '{{\"text\": \"hi\"}}' or '\"hi\"'",
            param_hint="JSON",
        ) from None


@robe.command("publish")
@click.argument("channel")
@click.argument("event")
@click.argument("data", metavar="[JSON]", required=False)
def publish(channel: str, event: str, data: str | None) -> None:
    """Broadcast EVENT to every subscriber of CHANNEL, on every worker,
    with JSON as its data (none: null); prints the broadcast's seq."""
    value = _json_value(data)
    if not protocol.is_valid_channel(channel):
        raise click.BadParameter("1 to 128 characters from A-Z a-z 0-9 _ - . : /", param_hint="CHANNEL")
    if not protocol.is_valid_event(event):
        raise click.BadParameter("1 to 64 characters, not starting with '@'", param_hint="EVENT")
    server = _server()
    try:
        seq = server.channel(channel).send(event, value)
    except BackendUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        server.backend.close()
    click.echo(seq)


@robe.command("disconnect")
@click.option("--identity", metavar="ID", help="Every connection whose ticket named this identity (a string).")
@click.option("--connection", "connection_id", metavar="ID", help="The one connection with this id.")
@click.option("--reconnect", is_flag=True, help="Close with 4001, reconnect now (e.g. permissions changed),"
              " instead of 4500, do not reconnect (signed out, banned).")
@click.option("--reason", default="", metavar="TEXT", help="The close frame's reason, at most 123 UTF-8 bytes.")
def disconnect(identity: str | None, connection_id: str | None, reconnect: bool, reason: str) -> None:
    """Close the connections of one identity (or one connection) on every
    worker: with 4500, or 4001 with --reconnect."""
    if (identity is None) == (connection_id is None):
        raise click.UsageError("give exactly one of --identity ID or --connection ID")
    code = control.CLOSE_RECONNECT if reconnect else control.CLOSE_DISCONNECTED
    try:
        if identity is not None:
            command = control.disconnect(identity=identity, code=code, reason=reason)
        else:
            command = control.disconnect(connection_id=connection_id, code=code, reason=reason)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--reason") from None
    server = _server()
    try:
        server.control(command)
    except BackendUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        server.backend.close()
    click.echo(f"sent to every worker: {command.describe()}")


@robe.command("workers")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
def workers(as_json: bool) -> None:
    """List the live workers sharing the backend: their connections and
    channels, and how long ago each last reported."""
    server = _server()
    try:
        found = server.backend.workers()
    except BackendUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        server.backend.close()
    if as_json:
        click.echo(json.dumps(found))
        return
    if not found:
        click.echo("no live workers: none has reported within ROBE_SOCKETS_WORKER_TTL")
        return
    rows = [("WORKER", "PID", "CONNECTIONS", "CHANNELS", "UP", "LAST REPORT")]
    now = time.time()
    for worker in found:
        rows.append((
            worker["id"],
            str(worker.get("pid", "")),
            str(worker.get("connections", "")),
            str(worker.get("channels", "")),
            _duration(now - worker["started"]) if "started" in worker else "",
            f"{worker['age']:.1f}s ago",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    total = sum(worker.get("connections", 0) for worker in found)
    click.echo(f"{len(found)} workers, {total} connections")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
