"""Single sign-on over OIDC: ``/api/v1/auth/oidc/login`` sends the browser to the provider,
``/api/v1/auth/oidc/callback`` brings it back signed in; ``/api/v1/auth/oidc/link`` sends a
signed-in user there to link their identity to their account. All are browser navigations,
so a failed sign-in lands on the login page with a message (``/login?sso_error=<reason>``),
and a failed link on the home page (``/?sso_error=<reason>``)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from legator.core.auth.oidc_provider import OidcError
from legator.core.auth.oidc_service import (
    PENDING_TTL,
    Callback,
    Linked,
    LinkRefused,
    OidcLogins,
    SignInStart,
)
from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.auth.router import set_session_cookie
from legator.core.errors import BadRequest, Forbidden, NotFound
from legator.core.http.deps import SESSION_COOKIE, core_of, require
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


def _check_next(next_path: str) -> None:
    if not is_local_path(next_path):
        raise BadRequest("'next' must be a path on this server, such as /fleet")


def _redirect(url: str) -> Response:
    """A redirect that drops the browser's sign-in cookie: that sign-in is over either way."""
    response = RedirectResponse(url, status_code=303)
    response.delete_cookie(LOGIN_COOKIE, path=COOKIE_PATH, httponly=True, samesite="lax")
    return response


def _to_login_page(reason: str, next_path: str = "/") -> Response:
    query = {"sso_error": reason}
    if next_path != "/":
        query["next"] = next_path
    return _redirect("/login?" + urlencode(query))


def _to_home_page(reason: str) -> Response:
    """Where a refused link lands: the user is still signed in, so the home page, which
    offers the link, says what went wrong."""
    return _redirect("/?" + urlencode({"sso_error": reason}))


def _to_provider(request: Request, started: SignInStart) -> Response:
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


async def _session_user_id(request: Request) -> str | None:
    """Whom this browser's session cookie signs in, if anyone. The cookie only: an API key
    never stands for a browser in this flow."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    principal = await core_of(request).auth.authenticate_session(token)
    return principal.user_id if principal is not None else None


@router.get("/login", dependencies=[require(Permission.PUBLIC)])
async def oidc_login(
    request: Request, next: Annotated[str, Query(max_length=2000)] = "/"
) -> Response:
    """Start single sign-on: a redirect to the identity provider. ``next`` is a path on this
    server to land on afterwards. 404 when single sign-on is not configured."""
    logins = _logins(request)
    _check_next(next)
    try:
        started = await logins.start(next, client_ip=client_ip(request))
    except OidcError as exc:
        return _to_login_page(exc.reason, next)
    return _to_provider(request, started)


@router.get("/link")
async def oidc_link(
    request: Request,
    next: Annotated[str, Query(max_length=2000)] = "/",
    principal: Principal = require(Permission.AUTHENTICATED),
) -> Response:
    """Link your identity at the provider to your own account: a redirect to the identity
    provider, and back through the callback, which attaches the identity to you and goes on
    to ``next``. Needs a browser session (the sign-in form), not an API key: an API key,
    perhaps scoped to a few permissions, must not be able to mint a full sign-in for its
    owner. 404 when single sign-on is not configured."""
    logins = _logins(request)
    if principal.method != "session" or principal.user_id is None:
        raise Forbidden(
            "linking single sign-on needs a browser session: sign in at /login with your "
            "password, not with an API key"
        )
    _check_next(next)
    try:
        started = await logins.start(
            next, client_ip=client_ip(request), link_user_id=principal.user_id
        )
    except OidcError as exc:
        return _to_home_page(exc.reason)
    return _to_provider(request, started)


@router.get("/callback", dependencies=[require(Permission.PUBLIC)])
async def oidc_callback(
    request: Request,
    state: Annotated[str, Query(max_length=512)] = "",
    code: Annotated[str, Query(max_length=4096)] = "",
    error: Annotated[str, Query(max_length=256)] = "",
) -> Response:
    """Where the provider sends the browser back: on success the session cookie is set (as
    by a password sign-in), or for a link the identity is attached to the signed-in user,
    and the browser goes on to ``next``; on failure, to the login page with ``sso_error``
    (the home page, for a refused link while still signed in)."""
    logins = _logins(request)
    session_user_id = await _session_user_id(request)
    callback = Callback(
        state=state,
        code=code,
        error=error,
        browser_token=request.cookies.get(LOGIN_COOKIE),
        user_agent=request.headers.get("user-agent", ""),
        client_ip=client_ip(request),
        session_user_id=session_user_id,
    )
    try:
        result = await logins.finish(callback)
    except LinkRefused as exc:
        return _to_home_page(exc.reason) if session_user_id else _to_login_page(exc.reason)
    except OidcError as exc:
        return _to_login_page(exc.reason)
    response = _redirect(result.next_path)
    if not isinstance(result, Linked):
        set_session_cookie(request, response, result.session_token)
    return response
