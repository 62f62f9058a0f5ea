"""Dependencies the routes declare: `Annotated` aliases for the services and for request pieces.

Owns: reaching the lifespan's objects (never module globals), resolving a line id from the
settings (unknown -> 404; another line than a line key's own -> 403), reading a request body
within the size limit, and the idempotency headers of the ingestion routes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Request

from serving.app import Services
from serving.auth import Principal, authenticate
from serving.errors import ApiError
from serving.settings import LineConfig

SERIAL_HEADER = "X-Module-Serial"
FRAME_HEADER = "X-Frame-Id"


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_line(
    request: Request, services: ServicesDep, line_id: Annotated[str, Path(max_length=64)]
) -> LineConfig:
    principal = await authenticate(request)  # 401 before anything about lines is revealed
    line = services.settings.lines.get(line_id)
    if line is None:
        known = ", ".join(sorted(k for k in services.settings.lines if principal.may_see_line(k)))
        raise ApiError(404, f"unknown line {line_id!r}; configured lines: {known}")
    principal.check_line(line_id)
    return line


LineDep = Annotated[LineConfig, Depends(get_line)]
PrincipalDep = Annotated[Principal, Depends(authenticate)]


COUNT_DIGITS = 30  # a byte count or an event id has far fewer; int() refuses past about 4300


def header_count(value: str | None) -> int | None:
    """A header's non-negative integer, or None where the value is none.

    Header values come from clients: '²'.isdigit() is True yet int('²') raises, and int() refuses
    numbers past Python's digit limit, leading zeros included. So the digits are checked as ASCII and
    counted, without their leading zeros, before int() sees them.
    """
    digits = (value or "").strip()
    if not (digits.isascii() and digits.isdigit()):
        return None
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= COUNT_DIGITS else None


async def read_body(request: Request, services: ServicesDep) -> bytes:
    """The raw body, refused with 413 as soon as it passes `max_body_bytes` (never buffered past it)."""
    limit = services.settings.max_body_bytes
    declared = header_count(request.headers.get("content-length"))  # None: the server judges it
    if declared is not None and declared > limit:
        raise ApiError(413, f"body of {declared} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


BodyDep = Annotated[bytes, Depends(read_body)]


def frame_identity(
    serial: Annotated[str | None, Header(alias=SERIAL_HEADER)] = None,
    frame_id: Annotated[str | None, Header(alias=FRAME_HEADER)] = None,
) -> tuple[str, str]:
    for name, value in ((SERIAL_HEADER, serial), (FRAME_HEADER, frame_id)):
        if not value or not value.strip():
            raise ApiError(400, f"expected a {name} header naming the module and frame")
        if len(value) > 128:
            raise ApiError(400, f"{name} is {len(value)} characters; at most 128 are accepted")
    assert serial is not None and frame_id is not None
    return serial.strip(), frame_id.strip()


FrameIdentityDep = Annotated[tuple[str, str], Depends(frame_identity)]
