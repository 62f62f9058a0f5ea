"""A production line in a box: posts synthetic EL module frames to the service at a steady rate.

Owns: `pvqc simulate-line` (the `cli` below): it renders frames with `datasets.synthetic` and posts
each, as PNG bytes, to the service's module route `POST {url}/lines/{line}/modules?rows=&cols=` with
the headers `X-Module-Serial` and `X-Frame-Id` (and `X-API-Key` when given). It speaks plain HTTP
(httpx) and never imports the service, so it can drive any pvqc deployment, local or remote.

    pvqc simulate-line --url http://127.0.0.1:8000 --line L1 --rate 0.5 --count 20
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import httpx
import numpy as np

from datasets.elpv import DatasetError, ElpvCells, load_elpv
from datasets.synthetic import SyntheticFrame, generate_frames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Post:
    """One frame ready to send: body and headers."""

    serial: str
    frame_id: str
    body: bytes
    defective_cells: int  # ELPV truth, for the log line only


def encode_png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fast over small
    if not ok:
        raise ValueError(f"could not encode a {image.shape} frame as PNG")
    return encoded.tobytes()


def posts(frames: Iterator[SyntheticFrame], line: str, seed: int) -> Iterator[Post]:
    for number, frame in enumerate(frames):
        defective = sum(cell.probability >= 0.5 for cell in frame.cells)
        serial = f"SIM-{line}-{seed}-{number:06d}"
        yield Post(serial, str(uuid.uuid4()), encode_png(frame.image), defective)


def module_url(base: str, line: str) -> str:
    return f"{base.rstrip('/')}/lines/{line}/modules"


def send(client: httpx.Client, url: str, post: Post, rows: int, cols: int, api_key: str | None) -> str:
    """Post one frame; returns a short outcome for the counters (HTTP status, verdict or error)."""
    headers = {"Content-Type": "image/png", "X-Module-Serial": post.serial, "X-Frame-Id": post.frame_id}
    if api_key:
        headers["X-API-Key"] = api_key
    try:
        response = client.post(url, params={"rows": rows, "cols": cols}, content=post.body, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # the service may restart under a demo: keep going
        log.warning("%s: %s: %s", post.serial, type(exc).__name__, exc)
        return "error"
    verdict = None
    if response.headers.get("content-type", "").startswith("application/json"):
        try:
            body = response.json()
        except ValueError:  # a proxy's error page labelled JSON: report the status, keep the line running
            body = None
        verdict = body.get("verdict") if isinstance(body, dict) else None
    log.info(
        "%s -> %d %s (%d defective cells in truth, %.0f kB)",
        post.serial,
        response.status_code,
        verdict or response.text[:120],
        post.defective_cells,
        len(post.body) / 1024,
    )
    return str(verdict or response.status_code)


def run(args: argparse.Namespace, cells: ElpvCells, client: httpx.Client | None = None) -> Counter[str]:
    """Send frames at `args.rate` per second until the count or the duration is reached.

    `client` (an httpx.Client) is for tests with a mock transport; by default one is opened here.
    """
    count = args.count if args.count is not None else (10**9 if args.duration else 10)
    frames = generate_frames(
        cells,
        count,
        seed=args.seed,
        grids=((args.rows, args.cols),),
        cell_px=(args.cell_px * 0.9, args.cell_px * 1.1),
        neighbour_probability=0.1,
        defect_rate=args.defect_rate,
        half_cut_share=1.0 if args.half_cut else 0.0,
        half_cut_grids=((args.rows, args.cols),),
    )
    url = module_url(args.url, args.line)
    outcomes: Counter[str] = Counter()
    start = time.monotonic()
    with client or httpx.Client(timeout=args.timeout) as client:
        for number, post in enumerate(posts(frames, args.line, args.seed)):
            # A steady schedule, not a sleep after each post: slow answers do not lower the rate. No frame
            # starts after the duration, whether it is due then or only sent then (a slow service)
            due = start + number / args.rate
            if args.duration is not None and max(due, time.monotonic()) - start >= args.duration:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            outcomes[send(client, url, post, args.rows, args.cols, args.api_key)] += 1
    return outcomes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pvqc simulate-line", description="Post synthetic EL module frames to a pvqc service."
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument("--line", default="L1", help="the production line's id")
    parser.add_argument("--rate", type=float, default=0.5, help="frames per second")
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument("--count", type=int, help="frames to send (default 10 without --duration)")
    stop.add_argument("--duration", type=float, help="seconds to run: no frame starts after them")
    parser.add_argument("--rows", type=int, default=6, help="cell rows as the module appears in the frame")
    parser.add_argument(
        "--cols", type=int, default=10, help="cell columns as the module appears in the frame"
    )
    parser.add_argument(
        "--cell-px",
        type=float,
        default=280.0,
        help="a cell's size in the frame, pixels (280: a 6x10 module on a 6 MP line camera, about the "
        "classifier's native 300 px; far smaller cells are upsampled and judged less reliably)",
    )
    parser.add_argument(
        "--defect-rate",
        type=float,
        default=None,
        help="share of modules with 1-3 defective cells, the rest functional (default: random ELPV cells)",
    )
    parser.add_argument(
        "--half-cut",
        action="store_true",
        help="half-cut modules: --rows x --cols counts half cells (e.g. 6x24 for a 144-cell module); "
        "--cell-px stays the full cell's side",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None, help="sent as the X-API-Key header")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    args = parser.parse_args(argv)
    if not math.isfinite(args.rate) or args.rate <= 0:
        parser.error(f"expected --rate > 0 frames per second (finite), got {args.rate}")
    if args.count is not None and args.count < 1:
        parser.error(f"expected --count >= 1 frames, got {args.count}")
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        parser.error(f"expected --duration > 0 seconds, got {args.duration}")
    if args.defect_rate is not None and not 0 <= args.defect_rate <= 1:
        parser.error(f"expected --defect-rate in [0, 1], got {args.defect_rate}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error(f"expected --timeout > 0 seconds, got {args.timeout}")
    if args.rows < 1 or args.cols < 1:
        parser.error(f"expected --rows and --cols >= 1, got {args.rows}x{args.cols}")
    return args


def cli(argv: list[str] | None = None) -> int:
    """`pvqc simulate-line`: exit status 0 when at least one frame was judged (a verdict came back),
    1 when none was, 2 when the ELPV cells it renders frames from are missing."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cells = load_elpv()
    except DatasetError as exc:  # no ELPV data here: one line, as every pvqc command ends on bad input
        sys.stderr.write(f"error: {exc}\n")  # the command's own line, not a log record
        return 2
    outcomes = run(args, cells)
    log.info(
        "sent %d frames to %s: %s", sum(outcomes.values()), module_url(args.url, args.line), dict(outcomes)
    )
    # refused posts (401 for a wrong key, 404 for a wrong URL) are no demo: only verdicts count
    judged = sum(n for outcome, n in outcomes.items() if not outcome.isdigit() and outcome != "error")
    return 0 if judged else 1
