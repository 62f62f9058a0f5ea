"""Administration: API keys (list, create: the key is shown once, in the response; revoke) and the
running configuration (lines, model, limits; secrets left out). Role: admin.

Keys are never updated or deleted: a revoked key keeps its row, so the audit trail's reviewer
names always point at a key that existed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import anyio
from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field
from sqlalchemy import make_url, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from serving.auth import AdminRole, Role, new_key, require, store_key
from serving.db import ApiKey, utcnow
from serving.deps import ServicesDep
from serving.errors import ApiError

router = APIRouter(tags=["admin"], dependencies=[Depends(require(Role.ADMIN))])


class KeyIn(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Role
    line_id: str | None = Field(default=None, description="required for line keys: the line it posts for")


class KeyOut(BaseModel):
    id: int
    name: str
    role: Role
    line_id: str | None
    prefix: str
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None


class NewKeyOut(KeyOut):
    key: str  # shown this once; only its hash is stored


def key_out(row: ApiKey) -> KeyOut:
    return KeyOut(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        line_id=row.line_id,
        prefix=row.prefix,
        created_at=row.created_at,
        created_by=row.created_by,
        revoked_at=row.revoked_at,
    )


def _all_keys(sessions: sessionmaker[Session]) -> list[ApiKey]:
    with sessions() as session:
        return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def _revoke(sessions: sessionmaker[Session], key_id: int) -> ApiKey | None:
    with sessions() as session:
        row = session.get(ApiKey, key_id)
        if row is not None and row.revoked_at is None:
            row.revoked_at = utcnow()
            session.commit()
            session.refresh(row)
        return row


@router.get("/keys")
async def list_keys(services: ServicesDep) -> list[KeyOut]:
    return [key_out(r) for r in await anyio.to_thread.run_sync(_all_keys, services.sessions)]


@router.post("/keys", status_code=201)
async def create_key(services: ServicesDep, admin: AdminRole, body: KeyIn) -> NewKeyOut:
    if body.role is Role.LINE:
        if body.line_id not in services.settings.lines:
            known = ", ".join(sorted(services.settings.lines))
            raise ApiError(422, f"a line key needs line_id, one of the configured lines: {known}")
    elif body.line_id is not None:
        raise ApiError(422, f"only line keys are bound to a line; a {body.role.value} key sees every line")
    key = new_key()
    try:
        row = await anyio.to_thread.run_sync(
            lambda: store_key(services.sessions, body.name, body.role, key, body.line_id, admin.name)
        )
    except IntegrityError as exc:
        raise ApiError(409, f"a key named {body.name!r} exists already; names are unique") from exc
    return NewKeyOut(**key_out(row).model_dump(), key=key)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(services: ServicesDep, key_id: Annotated[int, Path(ge=1)]) -> KeyOut:
    row = await anyio.to_thread.run_sync(_revoke, services.sessions, key_id)
    if row is None:
        raise ApiError(404, f"no key {key_id}")
    services.keys.forget()  # this replica stops accepting it at once; others within the cache time
    return key_out(row)


@router.get("/admin/config")
async def running_config(services: ServicesDep) -> dict[str, Any]:
    """The settings this replica runs with: lines (floor, takt, shifts), model, limits, broker.

    Lines and models are configured through settings (`PVQC_LINES`, `PVQC_MODEL_DIR`), the same on
    every replica; this shows what is in force. Secrets and credentials in URLs are left out.
    """
    settings = services.settings
    values = settings.model_dump(mode="json", exclude={"bootstrap_admin_key"})
    values["database_url"] = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    values["broker_url"] = _hide_password(settings.broker_url)
    card = services.runtime.card
    values["model"] = {"name": card.name, "version": card.version, "variant": services.runtime.variant}
    return values


def _hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
