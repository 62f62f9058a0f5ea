"""Who may do what: API keys with roles, checked on every route but the probes.

Owns: the Role enum (line < engineer < admin: each role may do what the ones below it may), key
making and hashing (random 256-bit keys, so a plain SHA-256 is the right hash: there is nothing to
brute-force, unlike a password), the first-start admin key, reading a key from
`Authorization: Bearer`, `X-API-Key` or the sign-in cookie, and the `require(role)` dependencies
the routers declare. Missing or wrong keys get 401, a known key of too low a role 403. A `line`
key is bound to one line: it posts to and reads only that line.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import Depends, Request
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from serving.db import ApiKey, utcnow
from serving.errors import ApiError

log = logging.getLogger(__name__)

COOKIE = "pvqc_key"
KEY_PREFIX = "pvqc_"
SHOWN_PREFIX = 12  # characters of a key kept in clear to recognise it in lists and logs
BOOTSTRAP_NAME = "admin"


class Role(enum.StrEnum):
    LINE = "line"  # a production line: posts frames, reads its own line's results
    ENGINEER = "engineer"  # a process engineer: reads every line, reviews
    ADMIN = "admin"  # manages keys (and, through settings, lines and models)

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def at_least(self, other: Role) -> bool:
        return self.rank >= other.rank


@dataclass(frozen=True)
class Principal:
    """The caller behind a checked key."""

    key_id: int
    name: str
    role: Role
    line_id: str | None  # set for line keys: the only line they may touch

    def may_see_line(self, line_id: str) -> bool:
        return self.role is not Role.LINE or self.line_id == line_id

    def check_line(self, line_id: str) -> None:
        if not self.may_see_line(line_id):
            raise ApiError(403, f"key {self.name!r} belongs to line {self.line_id!r}, not {line_id!r}")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def store_key(
    sessions: sessionmaker[Session],
    name: str,
    role: Role,
    key: str,
    line_id: str | None = None,
    created_by: str | None = None,
) -> ApiKey:
    """Insert a key (hash and prefix only); a duplicate name raises IntegrityError."""
    row = ApiKey(
        name=name,
        role=role.value,
        line_id=line_id,
        prefix=key[:SHOWN_PREFIX],
        key_sha256=hash_key(key),
        created_at=utcnow(),
        created_by=created_by,
    )
    with sessions() as session:
        session.add(row)
        session.commit()
        session.refresh(row)
        return row


def ensure_admin_key(sessions: sessionmaker[Session], configured: str | None) -> None:
    """On first start (no key at all) create the admin key; a random one is logged exactly once."""
    with sessions() as session:
        if session.scalar(select(func.count(ApiKey.id))):
            return
    key = configured or new_key()
    try:
        store_key(sessions, BOOTSTRAP_NAME, Role.ADMIN, key, created_by="first start")
    except IntegrityError:
        return  # another replica starting at the same moment made it first
    if configured is None:
        # the only time this key is ever shown: only its hash is kept
        log.warning(
            "created the first admin key %r (shown once, store it now): %s  "
            "use it as 'Authorization: Bearer <key>' or sign in at /signin",
            BOOTSTRAP_NAME,
            key,
        )
    else:
        log.info("created the first admin key %r from PVQC_BOOTSTRAP_ADMIN_KEY", BOOTSTRAP_NAME)


def lookup_key(sessions: sessionmaker[Session], key: str) -> Principal | None:
    with sessions() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.key_sha256 == hash_key(key))).first()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(row.id, row.name, Role(row.role), row.line_id)


class KeyChecker:
    """Checks keys against the database, trusting a checked key for `ttl` seconds.

    The cache keeps a hot route (a line posting every second) off the database; it holds hashes,
    never keys, and a revoked key stops working within `ttl` on every replica.
    """

    def __init__(self, sessions: sessionmaker[Session], ttl: float) -> None:
        self.sessions = sessions
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._generation = 0  # bumped by forget(): a lookup begun before it must not refill the cache

    async def check(self, key: str) -> Principal | None:
        digest = hash_key(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        generation = self._generation
        principal = await anyio.to_thread.run_sync(lookup_key, self.sessions, key)
        if generation != self._generation:
            # a key was revoked while this lookup read the database: its answer may predate the
            # revocation, so it is used once but not trusted for another `ttl`
            return principal
        if len(self._cache) > 10_000:  # bounded: wrong keys from a scanner must not grow memory
            self._cache.clear()
        self._cache[digest] = (now, principal)
        return principal

    def forget(self) -> None:
        self._generation += 1
        self._cache.clear()


def presented_key(request: Request) -> str | None:
    """The key from `Authorization: Bearer`, `X-API-Key`, or the sign-in cookie, in that order."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key") or request.cookies.get(COOKIE) or None


async def authenticate(request: Request) -> Principal:
    """The caller, or 401 when no valid key came with the request."""
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    key = presented_key(request)
    if key is None:
        raise ApiError(
            401,
            "expected an API key: 'Authorization: Bearer <key>', 'X-API-Key: <key>', or sign in at /signin",
            {"WWW-Authenticate": "Bearer"},
        )
    checker: KeyChecker = request.app.state.services.keys
    principal = await checker.check(key)
    if principal is None:
        raise ApiError(401, "the API key is unknown or revoked", {"WWW-Authenticate": "Bearer"})
    request.state.principal = principal
    return principal


def require(role: Role) -> Callable[[Request], Coroutine[Any, Any, Principal]]:
    """A dependency admitting `role` and the roles above it; its `min_role` tells tests what it needs."""

    async def dependency(request: Request) -> Principal:
        principal = await authenticate(request)
        if not principal.role.at_least(role):
            raise ApiError(
                403,
                f"this needs the {role.value} role or higher; "
                f"key {principal.name!r} has the {principal.role.value} role",
            )
        return principal

    dependency.min_role = role  # type: ignore[attr-defined]
    return dependency


LineRole = Annotated[Principal, Depends(require(Role.LINE))]
EngineerRole = Annotated[Principal, Depends(require(Role.ENGINEER))]
AdminRole = Annotated[Principal, Depends(require(Role.ADMIN))]
