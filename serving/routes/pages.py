"""The web pages and the browser's session: screen, review, sign-in and sign-out, who am I, and the
OpenAPI schema behind a key.

A page asked for without a key redirects to `/signin?next=...`; a key of too low a role gets a 403
page saying which role is needed. Signing in checks the key and keeps it in an HttpOnly, SameSite
cookie (scripts cannot read it; other sites' forms cannot send it), which every route accepts.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, Field

from serving.auth import COOKIE, LineRole, Principal, Role, authenticate
from serving.deps import ServicesDep
from serving.errors import ApiError

router = APIRouter(tags=["pages"])

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
COOKIE_SECONDS = 30 * 24 * 3600  # a shop-floor screen stays signed in for a month
# everything from this origin: no inline script, no CDN (a factory network may reach nothing else)
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


class SignIn(BaseModel):
    key: str = Field(min_length=1, max_length=200)


async def _page(request: Request, role: Role, name: str) -> Response:
    try:
        principal = await authenticate(request)
    except ApiError as exc:
        if exc.status != 401:
            raise
        return RedirectResponse(f"/signin?next={quote(request.url.path)}", status_code=303)
    if not principal.role.at_least(role):
        return _forbidden(principal, role)
    return HTMLResponse((WEB_DIR / name).read_text(encoding="utf-8"), headers=PAGE_HEADERS)


def _forbidden(principal: Principal, role: Role) -> HTMLResponse:
    body = (WEB_DIR / "forbidden.html").read_text(encoding="utf-8")
    body = body.replace("{{name}}", html.escape(principal.name)).replace("{{role}}", principal.role.value)
    return HTMLResponse(body.replace("{{needed}}", role.value), status_code=403, headers=PAGE_HEADERS)


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/screen", status_code=303)


@router.get("/screen", include_in_schema=False)
async def screen_page(request: Request) -> Response:
    return await _page(request, Role.LINE, "screen.html")


@router.get("/review", include_in_schema=False)
async def review_page(request: Request) -> Response:
    return await _page(request, Role.ENGINEER, "review.html")


@router.get("/signin", include_in_schema=False)
async def signin_page() -> HTMLResponse:
    return HTMLResponse((WEB_DIR / "signin.html").read_text(encoding="utf-8"), headers=PAGE_HEADERS)


@router.post("/signin", status_code=204)
async def sign_in(services: ServicesDep, body: SignIn, request: Request) -> Response:
    """Check the key and keep it in the session cookie."""
    principal = await services.keys.check(body.key.strip())
    if principal is None:
        raise ApiError(401, "the API key is unknown or revoked")
    response = Response(status_code=204)
    response.set_cookie(
        COOKIE,
        body.key.strip(),
        max_age=COOKIE_SECONDS,
        httponly=True,
        samesite="strict",
        secure=services.settings.cookie_secure or request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/signout", status_code=204)
async def sign_out() -> Response:
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/whoami")
async def whoami(principal: LineRole) -> dict[str, Any]:
    return {"name": principal.name, "role": principal.role.value, "line_id": principal.line_id}


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, _principal: LineRole) -> dict[str, Any]:
    schema: dict[str, Any] = request.app.openapi()
    return schema
