"""What the pages send besides themselves: security headers, the session
cookie's flags, and the check on where a sign-in may send the browser."""
from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, has_request_context, request
from flask.sessions import SecureCookieSessionInterface

#: Scripts, styles and sockets only from this site, nothing inline, and no
#: framing: the pages' only script is ``static/chat.js``.
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    # The favicon is a data: URL.
    "img-src 'self' data:",
    # 'self' covers ws:// and wss:// to this host (CSP level 3).
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))


def add_security_headers(response: Response) -> Response:
    """``after_request``: every answer keeps out of frames and sniffing."""
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, ``Secure`` whenever the request came over
    https (behind a proxy: with ``TRUSTED_PROXIES`` set), or always with
    ``SESSION_COOKIE_SECURE``."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or (has_request_context() and request.is_secure)


class UnsafeRedirect(ValueError):
    """A ``next`` that is not a path of this site."""


def same_site_path(target: str) -> str:
    """Return ``target`` if it is a path on this site, else raise :class:`UnsafeRedirect`.

    Browsers drop tabs and newlines from URLs and read ``\\`` as ``/``, so
    ``/\\t/evil.example`` and ``/\\evil.example`` both lead to another site:
    anything but printable ASCII without a backslash is refused, before the
    URL is split. What is left must have neither scheme nor host, and start
    with exactly one ``/``.
    """
    if not all("!" <= char <= "~" for char in target) or "\\" in target:
        raise UnsafeRedirect("only printable ASCII without spaces or backslashes")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        raise UnsafeRedirect("only a path of this site, starting with a single /")
    return target
