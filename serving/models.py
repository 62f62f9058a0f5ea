"""Hot swap: the service follows the model registry's active (and shadow) version while it runs.

Owns: `ModelFollower`, which polls `registry.json` every `registry_poll_seconds` (and on demand, from
the admin route `POST /models/reload`), builds a new runtime off the event loop when the active
version changed, and switches `services.runtime` in one assignment on the event loop. A request
reads `services.runtime` once when it starts and hands that runtime to the micro-batcher, which
never mixes runtimes in one batch: requests in flight finish on the model they started with, and
each inspection records the version that judged it. Replicas sharing the registry folder each poll
it, so all of them pick up a promotion or a rollback within one poll period.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import anyio

from model.registry import Registry, RegistryError
from serving.app import Services
from serving.inference import ModelRuntime, load_runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wanted:
    active: Path | None  # version folder the registry names active (None: no registry or none active)
    shadow: Path | None


def wanted_models(registry: Registry) -> Wanted:
    """The folders of the registry's active and shadow versions (blocking: reads the file)."""
    state = registry.state()
    active = registry.folder(state["active"]) if state["active"] else None
    shadow = registry.folder(state["shadow"]) if state["shadow"] else None
    return Wanted(active, shadow)


def folder_fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of a version folder's files (blocking).

    A version that failed to load is tried again once this changes: a file that was still being
    copied onto a shared volume, or a fixed one, must not stay refused until a restart.
    """
    try:
        stats = [(path.name, path.stat()) for path in folder.iterdir() if path.is_file()]
    except OSError:
        return ()
    return tuple(sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats))


def same_folder(runtime: ModelRuntime | None, folder: Path | None) -> bool:
    if runtime is None or folder is None:
        return runtime is None and folder is None
    return runtime.path.parent.resolve() == folder.resolve()


class ModelFollower:
    """Keeps `services.runtime` (and `services.shadow`) on the registry's active (and shadow) version."""

    def __init__(self, services: Services, registry: Registry) -> None:
        self.services = services
        self.registry = registry
        self._lock = asyncio.Lock()
        # folder -> (its files when it failed, why): not retried each poll, only when its files change
        self._failed: dict[Path, tuple[tuple[tuple[str, int, int], ...], str]] = {}
        self.swaps = 0

    @property
    def failures(self) -> dict[str, str]:
        """Versions the registry names that could not be loaded, and why (for `GET /models`)."""
        return {str(folder): why for folder, (_, why) in self._failed.items()}

    async def check(self, retry_failed: bool = False) -> bool:
        """Load and switch to what the registry names, if it changed; True when something was swapped.

        `retry_failed` (an explicit reload) tries versions that failed before even if their files
        look unchanged.
        """
        async with self._lock:
            if retry_failed:
                self._failed.clear()
            try:
                wanted = await anyio.to_thread.run_sync(wanted_models, self.registry)
            except (RegistryError, OSError) as exc:
                log.error("cannot read the model registry %s: %s", self.registry.path, exc)
                return False
            # failures of versions the registry no longer names are history, not news
            for folder in set(self._failed) - {wanted.active, wanted.shadow}:
                del self._failed[folder]
            swapped = False
            if wanted.active is not None and not same_folder(self.services.runtime, wanted.active):
                runtime = await self._load(wanted.active)
                if runtime is not None:
                    old = self.services.runtime
                    self.services.runtime = runtime  # one assignment: new requests take the new model
                    self.services.batcher.runtime = runtime
                    self.swaps += 1
                    swapped = True
                    log.info(
                        "hot swap: now serving %s %s (was %s)",
                        runtime.card.name,
                        runtime.card.version,
                        old.card.version,
                    )
            if not same_folder(self.services.shadow, wanted.shadow):
                shadow = await self._load(wanted.shadow) if wanted.shadow is not None else None
                if shadow is not None or wanted.shadow is None:
                    self.services.shadow = shadow
                    swapped = True
                    log.info("shadow model: %s", shadow.card.version if shadow else "none")
            return swapped

    async def _load(self, folder: Path) -> ModelRuntime | None:
        files = await anyio.to_thread.run_sync(folder_fingerprint, folder)
        if folder in self._failed and self._failed[folder][0] == files:
            return None
        settings = self.services.settings
        try:
            runtime = await anyio.to_thread.run_sync(
                load_runtime, folder, settings.model_variant, settings.session_threads
            )
        except Exception as exc:  # a broken version never stops the service: it keeps the old model
            self._failed[folder] = (files, str(exc))
            log.error("cannot load model %s, keeping the current one: %s", folder, exc)
            return None
        self._failed.pop(folder, None)
        return runtime

    async def run(self) -> None:
        """Poll every period; the service's startup made the first check (serving.app's lifespan)."""
        period = self.services.settings.registry_poll_seconds
        while True:
            await asyncio.sleep(period)
            try:
                await self.check()
            except Exception:  # the follower must outlive any one bad poll
                log.exception("model registry poll failed")
