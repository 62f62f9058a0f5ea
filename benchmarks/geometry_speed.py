"""Speed of locate + rectify + cut on one core (issue 4's budget: a 6 MP 6x10 frame under 150 ms).

Owns: the measurement only. A synthetic 6x10 frame of about 6 megapixels (tilted, perspective,
noise) is cut `--repeat` times with OpenCV limited to one thread; prints one JSON line with the
median, p95 and max milliseconds and peak RSS.

    python -m benchmarks.geometry_speed
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import cv2
import numpy as np

from datasets.elpv import load_elpv
from datasets.synthetic import FrameSpec, render_frame
from model.geometry import cut_module


def six_megapixel_frame(rows: int, cols: int, megapixels: float, seed: int) -> np.ndarray:
    """A frame of about `megapixels`: render once small, scale the cell size, render again."""
    cells = load_elpv(indices=np.arange(rows * cols))
    spec = FrameSpec(
        rows=rows,
        cols=cols,
        cell_px=100.0,
        rotation_deg=4.0,
        perspective=0.02,
        noise_sigma=3.0,
        vignetting=0.1,
    )
    probe = render_frame(cells, spec, np.random.default_rng(seed), np.arange(rows * cols))
    scale = math.sqrt(megapixels * 1e6 / probe.image.size)
    spec = FrameSpec(**{**spec.__dict__, "cell_px": spec.cell_px * scale})
    return render_frame(cells, spec, np.random.default_rng(seed), np.arange(rows * cols)).image


def main(args: argparse.Namespace) -> dict[str, object]:
    cv2.setNumThreads(args.threads)
    frame = six_megapixel_frame(args.rows, args.cols, args.megapixels, args.seed)
    geometry = cut_module(frame, args.rows, args.cols, args.cell_size)  # warm-up, and a sanity check
    timings = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        cut_module(frame, args.rows, args.cols, args.cell_size)
        timings.append(1000 * (time.perf_counter() - start))
    return {
        "benchmark": "geometry_speed",
        "frame": f"{frame.shape[1]}x{frame.shape[0]}",
        "megapixels": round(frame.size / 1e6, 2),
        "grid": f"{args.rows}x{args.cols}",
        "cell_size": args.cell_size,
        "opencv_threads": args.threads,
        "ok": geometry.ok,
        "confidence": round(geometry.confidence, 3),
        "repeat": args.repeat,
        "ms_median": round(float(np.median(timings)), 1),
        "ms_p95": round(float(np.percentile(timings, 95)), 1),
        "ms_max": round(float(np.max(timings)), 1),
        "budget_ms": 150,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--cols", type=int, default=10)
    parser.add_argument("--megapixels", type=float, default=6.0)
    parser.add_argument("--cell-size", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(main(parse_args())))
