"""The pages: sign in with a name, then one page per room."""
from __future__ import annotations

import ipaddress
import os
from functools import wraps
from typing import Any, Callable

from flask import Blueprint, abort, jsonify, redirect, render_template, request, session, url_for
from flask_wtf.csrf import CSRFError

from . import chat
from .extensions import sockets
from .security import UnsafeRedirect, same_site_path

bp = Blueprint("chat", __name__)


def signed_in(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "name" not in session:
            return redirect(url_for("chat.login", next=request.path))
        return view(*args, **kwargs)

    return wrapper


@bp.get("/")
@signed_in
def index():
    return redirect(url_for("chat.room", room="lobby"))


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Just a name, kept in the Flask session: enough to tell people apart."""
    error = None
    if request.method == "POST":
        try:
            # Only paths of this site: never an open redirect.
            target = same_site_path(request.args["next"]) if "next" in request.args else url_for("chat.index")
        except UnsafeRedirect:
            abort(400, "next must be a path of this site")
        name = request.form.get("name", "").strip()
        if chat.NAME.fullmatch(name):
            # A fresh session (and CSRF token) for whoever signs in.
            session.clear()
            session["name"] = name
            chat.people.add(name)
            return redirect(target)
        error = "Use 1 to 32 letters, digits, dots, dashes or underscores."
    return render_template("login.html", error=error), 400 if error else 200


@bp.app_errorhandler(CSRFError)
def csrf_refused(error: CSRFError):
    """A form posted without this site's token: from another site, or a page
    older than the session. The sign-in form again, with a fresh token."""
    return render_template("login.html", error="The form had expired or came from another page: please try again."), 400


@bp.post("/logout")
def logout():
    """Sign out here and everywhere: the person's sockets, in every tab and on
    every worker, are closed with 4500, and their pages stop reconnecting."""
    name = session.get("name")
    session.clear()
    if name is not None:
        sockets.disconnect(identity=name, reason="signed out")
    return redirect(url_for("chat.login"))


def _room_or_404(room: str) -> str:
    if room not in chat.ROOMS:
        abort(404)
    return room


@bp.get("/rooms/<room>")
@signed_in
def room(room: str):
    _room_or_404(room)
    return render_template(
        "room.html", room=room, rooms=chat.ROOMS, messages=chat.history.recent(room),
        max_text=chat.MAX_TEXT,
    )


@bp.get("/rooms/<room>/messages")
@signed_in
def messages(room: str):
    """The room's recent messages, for a page whose socket could not replay
    what it missed (the server restarted, or it was away too long)."""
    return jsonify(messages=chat.history.recent(_room_or_404(room)))


@bp.get("/stats")
def stats():
    """How many sockets this worker holds: a quick look for operators on the
    machine itself (behind a proxy, set ``TRUSTED_PROXIES``, or everyone the
    proxy forwards looks local)."""
    try:
        local = ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        local = False
    if not local:
        abort(404)
    return jsonify(connections=len(sockets.connections), pid=os.getpid())
