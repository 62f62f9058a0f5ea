"""Liveness and readiness of the service as a whole (the V2 health routes live in `v2.py`)."""

from __future__ import annotations

from fastapi import APIRouter

from serving.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(services: ServicesDep) -> dict[str, object]:
    card = services.runtime.card
    return {
        "status": "ok",
        "model": {"name": card.name, "version": card.version, "variant": services.runtime.variant},
        "queue_cells": services.batcher.pending_cells,
    }
