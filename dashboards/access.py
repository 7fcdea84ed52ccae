"""Who may open the dashboard: an optional access token, checked by Bokeh's auth hooks.

With a token configured (``[dashboard] token``), every request Bokeh serves (the page, its
session, the websocket) must carry it, as ``?token=TOKEN`` (the page sets an HttpOnly,
SameSite=Strict cookie then, so the websocket and reloads carry it), as the header
``Authorization: Bearer TOKEN`` (a reverse proxy can add it), or as that cookie; anything else
gets HTTP 403 before the websocket is upgraded. Tokens are compared in constant time
(:func:`hmac.compare_digest`). Which pages may open the websocket at all is Bokeh's
``allow_websocket_origin`` (``[dashboard] allowed_origins``). Deployment: deploy/README.md,
"The dashboard".
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from bokeh.server.auth_provider import AuthProvider
from tornado.web import HTTPError, RequestHandler

log = logging.getLogger(__name__)

COOKIE = "beamkin_dashboard_token"


def read_token(value: str) -> str:
    """The token of ``[dashboard] token``: the text itself, or the first line of PATH for
    ``file:PATH`` (so the token is in neither the TOML nor the command line). "" = no token."""
    if not value.startswith("file:"):
        return value
    path = Path(value[len("file:"):])
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"dashboard.token: cannot read the token file {path}: {exc.strerror or exc}") from exc
    if not token:
        raise ValueError(f"dashboard.token: the token file {path} is empty")
    return token


class TokenAuth(AuthProvider):
    """Bokeh auth provider letting in only requests that carry ``token`` (see the module doc)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("TokenAuth needs a non-empty token")
        self.token = token.encode()
        super().__init__()

    @property
    def get_user_async(self):
        return self._user

    @property
    def get_login_url(self):
        return lambda handler: "/"  # never used: a request without the token is refused with 403

    async def _user(self, handler: RequestHandler) -> str:
        query = handler.get_argument("token", default=None)
        header = handler.request.headers.get("Authorization", "")
        bearer = header[len("Bearer "):].strip() if header.startswith("Bearer ") else None
        cookie = handler.get_cookie(COOKIE)
        for supplied in (query, bearer, cookie):
            if supplied and hmac.compare_digest(supplied.encode(), self.token):
                if supplied is query and not handler.request.headers.get("Upgrade"):
                    handler.set_cookie(COOKIE, supplied, httponly=True, samesite="Strict",
                                       secure=handler.request.protocol == "https")
                return "beamkin"
        log.warning("dashboard refused %s %s from %s: no valid access token", handler.request.method,
                    handler.request.path, handler.request.remote_ip)
        raise HTTPError(403, reason="a valid access token is required")


def auth_provider(token: str) -> AuthProvider | None:
    """The Bokeh ``auth_provider`` for ``[dashboard] token`` (None = no token, Bokeh's default)."""
    token = read_token(token)
    return TokenAuth(token) if token else None
