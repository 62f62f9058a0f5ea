"""The served model and the registry it follows: what serves now, and a reload on demand. Role: admin.

`GET /models` says which version judges new inspections (and which one shadows it); `POST
/models/reload` reads the registry at once instead of waiting for the next poll, so a promotion
script can wait for the swap (every replica also polls by itself); it also tries again a version that
failed to load, which a poll only does once the version's files change.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from serving.app import Services
from serving.auth import Role, require
from serving.deps import ServicesDep
from serving.errors import ApiError

router = APIRouter(prefix="/models", tags=["admin"], dependencies=[Depends(require(Role.ADMIN))])


def served(services: Services) -> dict[str, Any]:
    runtime, shadow, follower = services.runtime, services.shadow, services.follower
    return {
        "active": {
            "name": runtime.card.name,
            "version": runtime.card.version,
            "folder": str(runtime.path.parent),
        },
        "shadow": None if shadow is None else {"name": shadow.card.name, "version": shadow.card.version},
        "registry": str(services.settings.model_registry) if services.settings.model_registry else None,
        "swaps": follower.swaps if follower is not None else 0,
        # versions the registry names that this replica could not load (it keeps serving the old one)
        "load_failures": follower.failures if follower is not None else {},
    }


@router.get("")
async def current(services: ServicesDep) -> dict[str, Any]:
    return served(services)


@router.post("/reload")
async def reload(services: ServicesDep) -> dict[str, Any]:
    if services.follower is None:
        raise ApiError(409, "no model registry is configured (PVQC_MODEL_REGISTRY): nothing to follow")
    swapped = await services.follower.check(retry_failed=True)  # asked for: try failed versions again
    return {"swapped": swapped, **served(services)}
