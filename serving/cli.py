"""`pvqc serve`: run the inspection service under uvicorn.

Owns: the command-line flags (each overrides the matching `PVQC_` setting) and the uvicorn start.
One process serves everything; scale out with replicas, not uvicorn workers, because each worker
would load its own model and fight the others for the same cores.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pvqc serve", description="run the pvqc inspection service")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-dir", type=Path, help="folder with card.json and the ONNX files")
    parser.add_argument("--variant", help="model file variant from the card, e.g. fp32 or int8")
    parser.add_argument(
        "--registry",
        type=Path,
        help="model registry folder (e.g. models/pvqc-cell): serve and follow its active version",
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL; default: SQLite under ./var/")
    parser.add_argument("--var-dir", type=Path, help="folder for the embedded database and frames")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def serve_cli(argv: list[str]) -> int:
    import uvicorn

    from serving.app import create_app
    from serving.settings import Settings

    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {
        "model_dir": args.model_dir,
        "model_variant": args.variant,
        "model_registry": args.registry,
        "database_url": args.database_url,
        "var_dir": args.var_dir,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    model = f"the registry {settings.model_registry}" if settings.model_registry else settings.model_dir
    log.info("pvqc serve on http://%s:%d with model %s", args.host, args.port, model)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        # open event streams (screens) never end by themselves: close them after 5 s on shutdown
        timeout_graceful_shutdown=5,
    )
    return 0


def wait_until_ready(process: subprocess.Popen[bytes], base: str, timeout: float) -> None:
    """Block until a `pvqc serve` subprocess answers /v2/health/ready; raise if it dies or stays silent.

    For benchmarks and tests that start the service as a separate process.
    """
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"service did not become ready in {timeout:.0f} s")
