"""Cells per second of the released ONNX models in onnxruntime on this machine's CPU.

Prints one JSON line: FP32 and INT8 at batch 1 and 32, the INT8/FP32 speed-up, and peak RSS.
Usage: python benchmarks/model_throughput.py [--model models/pvqc-cell/<version>] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

from model.card import SHIPPED_MODEL_DIR, read_card
from model.onnx_export import INPUT_NAME, onnx_session


def cells_per_second(session: object, batch: np.ndarray, seconds: float) -> float:
    """Run the same batch repeatedly for about `seconds` after two warm-up calls."""
    run = session.run  # type: ignore[attr-defined]
    for _ in range(2):
        run(None, {INPUT_NAME: batch})
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(None, {INPUT_NAME: batch})
        done += len(batch)
    return done / (time.perf_counter() - started)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL_DIR)
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per configuration")
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default, all cores)"
    )
    args = parser.parse_args()
    card = read_card(args.model)
    size = card.input.size
    rng = np.random.default_rng(0)
    # EL-like grey levels; speed does not depend on content for a CNN, but keep values in range
    cells = rng.integers(40, 200, size=(32, 1, size, size)).astype(np.float32)
    rates: dict[str, float] = {}
    result: dict[str, object] = {
        "benchmark": "model_throughput",
        "model": f"{card.name} {card.version}",
        "input": f"{size}x{size} grey",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }
    for variant in ("fp32", "int8"):
        session = onnx_session(card.onnx_path(args.model, variant), args.threads)
        for batch_size in (1, 32):
            rates[f"{variant}_batch{batch_size}"] = cells_per_second(
                session, cells[:batch_size], args.seconds
            )
    result.update({f"{key}_cells_per_s": round(rate, 1) for key, rate in rates.items()})
    for batch_size in (1, 32):
        speedup = rates[f"int8_batch{batch_size}"] / rates[f"fp32_batch{batch_size}"]
        result[f"int8_speedup_batch{batch_size}"] = round(speedup, 2)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
