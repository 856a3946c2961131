"""Single sign-on over OIDC: ``/api/v1/auth/oidc/login`` sends the browser to the provider,
``/api/v1/auth/oidc/callback`` brings it back signed in. Both are browser navigations, so a
failed sign-in lands on the login page with a message (``/login?sso_error=<reason>``)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from legator.core.auth.oidc_provider import OidcError
from legator.core.auth.oidc_service import PENDING_TTL, Callback, OidcLogins
from legator.core.auth.permissions import Permission
from legator.core.auth.router import set_session_cookie
from legator.core.errors import BadRequest, NotFound
from legator.core.http.deps import core_of, require
from legator.core.http.net import client_ip, is_https, is_local_path

router = APIRouter(prefix="/api/v1/auth/oidc", tags=["identity"])
LOGIN_COOKIE = "legator_oidc"
COOKIE_PATH = "/api/v1/auth/oidc"


def _logins(request: Request) -> OidcLogins:
    logins = core_of(request).oidc
    if logins is None:
        raise NotFound(
            "single sign-on is not configured: set LEGATOR_OIDC_ISSUER, LEGATOR_OIDC_CLIENT_ID "
            "and LEGATOR_OIDC_REDIRECT_URL"
        )
    return logins


def _to_login_page(reason: str, next_path: str = "/") -> Response:
    query = {"sso_error": reason}
    if next_path != "/":
        query["next"] = next_path
    response = RedirectResponse("/login?" + urlencode(query), status_code=303)
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH, httponly=True, samesite="lax")
    return response


@router.get("/login", dependencies=[require(Permission.PUBLIC)])
async def oidc_login(
    request: Request, next: Annotated[str, Query(max_length=2000)] = "/"
) -> Response:
    """Start single sign-on: a redirect to the identity provider. ``next`` is a path on this
    server to land on afterwards. 404 when single sign-on is not configured."""
    logins = _logins(request)
    if not is_local_path(next):
        raise BadRequest("'next' must be a path on this server, such as /fleet")
    try:
        started = await logins.start(next, client_ip=client_ip(request))
    except OidcError as exc:
        return _to_login_page(exc.reason, next)
    response = RedirectResponse(started.redirect_url, status_code=303)
    response.set_cookie(
        LOGIN_COOKIE,
        started.browser_token,
        max_age=int(PENDING_TTL.total_seconds()),
        httponly=True,
        samesite="lax",
        secure=is_https(request),
        path=COOKIE_PATH,
    )
    return response


@router.get("/callback", dependencies=[require(Permission.PUBLIC)])
async def oidc_callback(
    request: Request,
    state: Annotated[str, Query(max_length=512)] = "",
    code: Annotated[str, Query(max_length=4096)] = "",
    error: Annotated[str, Query(max_length=256)] = "",
) -> Response:
    """Where the provider sends the browser back: on success the session cookie is set (as
    by a password sign-in) and the browser goes on to ``next``; on failure, to the login
    page with ``sso_error``."""
    logins = _logins(request)
    callback = Callback(
        state=state,
        code=code,
        error=error,
        browser_token=request.cookies.get(LOGIN_COOKIE),
        user_agent=request.headers.get("user-agent", ""),
        client_ip=client_ip(request),
    )
    try:
        signed_in = await logins.finish(callback)
    except OidcError as exc:
        return _to_login_page(exc.reason)
    response = RedirectResponse(signed_in.next_path, status_code=303)
    set_session_cookie(request, response, signed_in.session_token)
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH, httponly=True, samesite="lax")
    return response
