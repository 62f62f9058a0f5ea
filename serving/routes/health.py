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
        # 200 either way: a broker outage must not restart every replica (the k8s probes use
        # /v2/health/*); the screens' stream is reported so monitoring can alarm on it
        "live": services.live.health()
        if services.live is not None
        else {"status": "down", "reason": "live events not started"},
    }
