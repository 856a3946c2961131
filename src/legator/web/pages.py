"""The sign-in form and the landing page (where a user links and unlinks single sign-on)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.auth.router import set_session_cookie
from legator.core.errors import AppError, Forbidden, TooManyRequests, Unauthorized
from legator.core.http.deps import SESSION_COOKIE, authenticate, core_of, cross_site, require
from legator.core.http.net import client_ip, is_local_path
from legator.core.version import build_info

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
FAVICON = Path(__file__).parent / "static" / "favicon.svg"


# What the login page says when single sign-on came back refused (the reasons of
# legator.core.auth.oidc_service and oidc_provider); the text never comes from the query.
SSO_MESSAGES = {
    "provider_error": "The identity provider did not sign you in.",
    "bad_state": "That sign-in expired, was already used or was started in another browser. "
    "Please try again.",
    "missing_code": "The identity provider did not sign you in.",
    "token_rejected": "The identity provider refused to complete the sign-in.",
    "invalid_id_token": "The identity provider's answer could not be verified.",
    "provider_unavailable": "The identity provider cannot be reached. Try again later.",
    "disabled": "Your account is disabled.",
    "too_many_attempts": "Too many sign-in attempts from your network. Try again in a few minutes.",
    "not_linked": "No account here is linked to your single sign-on identity. Sign in with your "
    "password and choose “Link single sign-on”, or ask an administrator.",
    "linked_to_another_user": "That single sign-on identity is already linked to another user. "
    "Ask an administrator to unlink it.",
    "already_linked": "Your account is already linked to another identity at this provider. "
    "Ask an administrator to unlink it first.",
    "session_changed": "You signed out, or in as someone else, while linking single sign-on. "
    "Sign in and start again.",
}
SSO_FALLBACK = "Single sign-on failed. Please try again."


def _sso_message(reason: str) -> str | None:
    return SSO_MESSAGES.get(reason, SSO_FALLBACK) if reason else None


def _never_stored(response: Response) -> Response:
    """For a page that shows who is signed in or what was typed into the form: neither the
    browser (Back after signing out on a shared computer) nor a proxy may keep it."""
    response.headers["Cache-Control"] = "no-store"
    return response


def _safe_next(target: str) -> str:
    # Only same-site relative paths: never an open redirect.
    return target if is_local_path(target) else "/"


def _login_page(
    request: Request, *, next: str, error: str | None = None, username: str = "", status: int = 200
) -> Response:
    page = templates.TemplateResponse(
        request,
        "login.html",
        {
            "user": None,
            "error": error,
            "username": username,
            "next": _safe_next(next),
            "sso": core_of(request).settings.oidc_enabled,
        },
        status_code=status,
    )
    return _never_stored(page)


async def _optional_principal(request: Request) -> Principal | None:
    try:
        return await authenticate(request)
    except AppError:
        return None


async def _sso_account(request: Request, principal: Principal) -> dict[str, object] | None:
    """What the home page says about single sign-on: None when it is not configured or the
    caller is no signed-in user (only a browser session can link); else every issuer the
    user is linked to (which the page offers to unlink) and whether one is the configured
    provider (else it offers to link)."""
    core = core_of(request)
    issuer = core.settings.oidc_issuer
    if not core.settings.oidc_enabled or issuer is None:
        return None
    if principal.method != "session" or principal.user_id is None:
        return None
    issuers = await core.auth.identity_issuers(principal.user_id)
    linked = any(linked.rstrip("/") == issuer.rstrip("/") for linked in issuers)
    return {"issuers": issuers, "linked": linked}


@router.get("/", response_class=HTMLResponse, dependencies=[require(Permission.PUBLIC)])
async def home(request: Request, sso_error: str = "") -> Response:
    principal = await _optional_principal(request)
    if principal is None:
        return RedirectResponse("/login", status_code=303)
    page = templates.TemplateResponse(
        request,
        "home.html",
        {
            "user": principal,
            "version": build_info(),
            "sso": await _sso_account(request, principal),
            "error": _sso_message(sso_error),
        },
    )
    return _never_stored(page)


@router.get("/favicon.ico", dependencies=[require(Permission.PUBLIC)])
async def favicon() -> FileResponse:
    """Where a browser looks for an icon on a page that names none (a JSON error, say)."""
    return FileResponse(FAVICON, media_type="image/svg+xml")


@router.get("/login", response_class=HTMLResponse, dependencies=[require(Permission.PUBLIC)])
async def login_form(request: Request, next: str = "/", sso_error: str = "") -> Response:
    return _login_page(request, next=next, error=_sso_message(sso_error))


@router.post("/login", dependencies=[require(Permission.PUBLIC)])
async def login_submit(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form()] = "/",
) -> Response:
    if cross_site(request):
        # Another site's page signing the browser in to an account of its choosing (login
        # CSRF): whatever the victim then does, or links, lands in that account.
        return _login_page(
            request, next="/", error="Sign in from this site's own page.", status=403
        )
    try:
        result = await core_of(request).auth.login(
            username,
            password,
            user_agent=request.headers.get("user-agent", ""),
            client_ip=client_ip(request),
        )
    except TooManyRequests as exc:
        error = exc.message[:1].upper() + exc.message[1:] + "."
        page = _login_page(request, next=next, error=error, username=username, status=429)
        page.headers.update(exc.headers)
        return page
    if result is None:
        return _login_page(
            request, next=next, error="Wrong username or password.", username=username, status=401
        )
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session_cookie(request, response, result[0])
    return response


@router.post("/logout", dependencies=[require(Permission.PUBLIC)])
async def logout(request: Request) -> Response:
    """Ends the session and clears its cookie. A session that already ended (expired, signed
    out in another tab, its user disabled) has only its cookie left to clear: the page's
    button must still lead to the sign-in form, not to a JSON error."""
    if cross_site(request):
        raise Forbidden("cross-site request refused: Origin does not match this server")
    try:
        principal: Principal | None = await authenticate(request)
    except Unauthorized:
        principal = None
    if principal is not None:
        await core_of(request).auth.logout(principal)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
