"""The sign-in form and the landing page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from legator.core.auth.permissions import Permission
from legator.core.auth.principal import Principal
from legator.core.auth.router import set_session_cookie
from legator.core.errors import AppError
from legator.core.http.deps import SESSION_COOKIE, authenticate, core_of, require
from legator.core.http.net import client_ip
from legator.core.version import build_info

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


def _safe_next(target: str) -> str:
    # Only same-site relative paths: never an open redirect.
    return target if target.startswith("/") and not target.startswith("//") else "/"


async def _optional_principal(request: Request) -> Principal | None:
    try:
        return await authenticate(request)
    except AppError:
        return None


@router.get("/", response_class=HTMLResponse, dependencies=[require(Permission.PUBLIC)])
async def home(request: Request) -> Response:
    principal = await _optional_principal(request)
    if principal is None:
        return RedirectResponse("/login", status_code=303)
    return templates.TemplateResponse(
        request, "home.html", {"user": principal, "version": build_info()}
    )


@router.get("/login", response_class=HTMLResponse, dependencies=[require(Permission.PUBLIC)])
async def login_form(request: Request, next: str = "/") -> Response:
    return templates.TemplateResponse(
        request, "login.html", {"user": None, "error": None, "username": "", "next": next}
    )


@router.post("/login", dependencies=[require(Permission.PUBLIC)])
async def login_submit(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form()] = "/",
) -> Response:
    result = await core_of(request).auth.login(
        username,
        password,
        user_agent=request.headers.get("user-agent", ""),
        client_ip=client_ip(request),
    )
    if result is None:
        return templates.TemplateResponse(
            request,
            "login.html",
            {
                "user": None,
                "error": "Wrong username or password.",
                "username": username,
                "next": next,
            },
            status_code=401,
        )
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session_cookie(request, response, result[0])
    return response


@router.post("/logout")
async def logout(
    request: Request, principal: Principal = require(Permission.AUTHENTICATED)
) -> Response:
    await core_of(request).auth.logout(principal)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
