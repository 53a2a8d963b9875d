"""A multi-room chat on flask-robe-sockets.

Run it with ``./scripts/serve-example`` (gunicorn with the gevent worker on
http://127.0.0.1:9292), or ``flask --app example_app run`` while
developing. Without ``REDIS_URL`` everything stays in that one process;
with it the channels, the room history and the background jobs go through
Redis, and ``rq worker example_app --url $REDIS_URL`` runs the jobs.

Settings come from the environment:

- ``SECRET_KEY`` signs the session cookie, the CSRF tokens and the socket
  tickets. Unset, each start makes a random one (and logs a warning): fine
  for one worker, but every sign-in ends when the server restarts. With
  Redis or several workers it is required, since every process must verify
  what the others signed.
- ``SESSION_COOKIE_SECURE=1`` marks the session cookie ``Secure`` on every
  response. Without it the cookie is ``Secure`` whenever the request came
  over https (as ``request.is_secure`` sees it).
- ``TRUSTED_PROXIES``: how many reverse proxies in front of the app set
  ``X-Forwarded-For/-Proto/-Host`` (default 0: those headers are ignored).
  Behind a proxy set it, so that the client's address (ticket IP binding,
  the loopback-only ``/stats``) and https are the client's, not the proxy's.
"""
from __future__ import annotations

import os
import secrets
from typing import Any, Mapping

from flask import Flask
from flask_wtf.csrf import CSRFProtect
from werkzeug.middleware.proxy_fix import ProxyFix

from . import chat, realtime, views  # noqa: F401 (realtime registers the handlers)
from .extensions import sockets
from .security import SessionInterface, add_security_headers

csrf = CSRFProtect()


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The chat app; ``config`` (tests) goes over what the environment says.

    :raises RuntimeError: when Redis is configured and ``SECRET_KEY`` is not.
    """
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=os.environ.get("SECRET_KEY") or None,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=os.environ.get("SESSION_COOKIE_SECURE", "") in ("1", "true", "yes"),
        TRUSTED_PROXIES=int(os.environ.get("TRUSTED_PROXIES") or 0),
        # The token lives as long as the session: a sign-in form left open
        # for an afternoon still works.
        WTF_CSRF_TIME_LIMIT=None,
        ROBE_SOCKETS_REDIS_URL=chat.REDIS_URL,
        # Each room shows who is in it: @subscribed lists the room's members,
        # then @join and @leave keep every page's list current.
        ROBE_SOCKETS_PRESENCE=["room:*"],
    )
    app.config.update(config or {})
    if not app.config["SECRET_KEY"]:
        if app.config["ROBE_SOCKETS_REDIS_URL"]:
            raise RuntimeError(
                "REDIS_URL is set but SECRET_KEY is not: every web worker and the rq worker"
                " must verify the same session cookies and socket tickets. Set SECRET_KEY"
                " (e.g. to the output of `python -c 'import secrets; print(secrets.token_hex(32))'`)"
                " in the environment of every process."
            )
        app.config["SECRET_KEY"] = secrets.token_hex(32)
        app.logger.warning(
            "SECRET_KEY is not set: using a random key for this process only; sign-ins end"
            " when it restarts, and a second worker could not verify them. Set SECRET_KEY"
            " for anything but a one-worker demo."
        )
    if app.config["TRUSTED_PROXIES"]:
        hops = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]
    app.session_interface = SessionInterface()
    sockets.init_app(app)
    csrf.init_app(app)
    # The ticket endpoint answers the socket clients, not a form: another
    # site could not read the ticket it got (no CORS), and SameSite=Lax
    # keeps the session cookie off cross-site POSTs anyway.
    csrf.exempt(app.view_functions["robe_sockets.ticket"])
    app.register_blueprint(views.bp)
    app.after_request(add_security_headers)
    return app


app = create_app()
