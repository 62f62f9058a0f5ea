"""Throughput and latency of the inspection service against onnxruntime alone, same model, same run.

Starts `pvqc serve` in a subprocess on 127.0.0.1 (its own temporary var/), drives it from this
process with concurrent clients for bounded times, and prints one JSON line:
- raw onnxruntime cells/s (same model file, the service's batch size), measured before and after the
  service phases while the service is idle, both ways of spending the cores (one call over all of
  them; one single-threaded call per core side by side): the better of the two is the ceiling the
  ratios are taken against, and the ratio to plain one-call onnxruntime is given beside it;
- the module route with 60-cell and 144-half-cell frames (closed loop, `--clients` concurrent clients;
  a half cell is two views, so a 144-cell module is 288 model inputs): cells/s, modules/s,
  p50/p95/p99 latency and the ratio to raw onnxruntime;
- V2 binary infer (`--v2-batch` cells per request): cells/s, latencies, ratio;
- the 60-cell module route at an open-loop load of one module per second: p50/p95/p99;
- the service's peak RSS (VmHWM).
Usage: python benchmarks/service_throughput.py [--model-dir DIR] [--variant fp32|int8] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import httpx
import numpy as np

from model.card import SHIPPED_MODEL_DIR, read_card
from serving.cli import wait_until_ready
from serving.settings import usable_cores

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = SHIPPED_MODEL_DIR
DEV = ROOT / "var/dev-model"
# the service under test starts with this admin key, so the load generator can authenticate
BENCH_KEY = "pvqc_bench-key"
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}
LINES = {"L60": {"rows": 6, "cols": 10}, "L144": {"rows": 6, "cols": 24}}


def default_model_dir() -> Path:
    return SHIPPED if (SHIPPED / "card.json").is_file() else DEV


def module_png(rows: int, cols: int, size: int, seed: int, half_cut: bool = False) -> bytes:
    """A rectified module frame: rows x cols textured cells of `size` px with dark gaps, as PNG; with
    `half_cut` the cells are half as wide (a landscape 144-cell half-cut module), so the service judges
    each as two mirrored views, as it does on such a line."""
    rng = np.random.default_rng(seed)
    gap = 2 * max(1, size // 80)  # even, so both sides of a cell lose the same
    width = size // 2 if half_cut else size
    frame = np.zeros((rows * size, cols * width), np.uint8)
    for r in range(rows):
        for c in range(cols):
            cell = np.clip(rng.normal(160, 6, (size - gap, width - gap)), 0, 255).astype(np.uint8)
            frame[
                r * size + gap // 2 : (r + 1) * size - gap // 2,
                c * width + gap // 2 : (c + 1) * width - gap // 2,
            ] = cell
    ok, data = cv2.imencode(".png", frame)
    assert ok
    return data.tobytes()


def raw_cells_per_second(
    model_file: Path, size: int, batch: int, threads: int, seconds: float, workers: int = 1
) -> float:
    """onnxruntime alone: `workers` Python threads calling one session back to back on random cells."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    cells = np.random.default_rng(0).uniform(0, 255, (batch, 1, size, size)).astype(np.float32)
    for _ in range(2):
        session.run(None, {"image": cells})
    counts = [0] * workers
    started = time.perf_counter()

    def loop(worker: int) -> None:
        while time.perf_counter() - started < seconds:
            session.run(None, {"image": cells})  # onnxruntime releases the GIL while it runs
            counts[worker] += batch

    threads_running = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
    for thread in threads_running:
        thread.start()
    for thread in threads_running:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def raw_ceiling(model_file: Path, size: int, batch: int, seconds: float) -> dict[str, float]:
    """Both ways to spend the cores on onnxruntime alone: one call over all of them (plain
    onnxruntime), or one single-threaded call per core side by side."""
    cores = usable_cores()
    return {
        "one_call_all_cores": raw_cells_per_second(model_file, size, batch, 0, seconds),
        "one_call_per_core": raw_cells_per_second(model_file, size, batch, 1, seconds, cores),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service(args: argparse.Namespace, var_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        PVQC_MODEL_DIR=str(args.model_dir),
        PVQC_MODEL_VARIANT=args.variant,
        PVQC_VAR_DIR=str(var_dir),
        PVQC_LINES=json.dumps(LINES),
        PVQC_MAX_BATCH=str(args.batch),
        PVQC_ORT_THREADS=str(args.threads),
        PVQC_INFERENCE_WORKERS=str(args.workers),
        PVQC_BOOTSTRAP_ADMIN_KEY=BENCH_KEY,
    )
    command = [
        sys.executable,
        "-m",
        "pvqc",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(process, base, timeout=120)
    return process, base


Request = Callable[[httpx.Client, int], int]  # posts request n, returns cells judged


def closed_loop(base: str, request: Request, clients: int, seconds: float) -> dict[str, float]:
    """`clients` threads each posting back to back for `seconds`; cells/s, requests/s, latencies.

    Rates count only answers that arrive inside the steady-state window (after a fifth of the time
    for ramp-up, before the stop): a request of several seconds that straddles the stop would
    otherwise be counted whole against a partly idle tail.
    """
    latencies: list[float] = []
    finished: list[tuple[float, int]] = []  # (arrival time, cells)
    cells = [0]
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client_loop(worker: int) -> None:
        with httpx.Client(base_url=base, timeout=60, headers=AUTH) as client:
            n = 0
            while time.perf_counter() < stop_at:
                n += 1
                began = time.perf_counter()
                try:
                    judged = request(client, worker * 1_000_000 + n)
                except (httpx.HTTPError, RuntimeError):
                    with lock:
                        errors[0] += 1
                    continue
                now = time.perf_counter()
                with lock:
                    latencies.append(now - began)
                    finished.append((now, judged))
                    cells[0] += judged

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    window_start = started + seconds / 5
    in_window = [n for arrived, n in finished if window_start <= arrived <= stop_at]
    result = summary(latencies, stop_at - window_start, sum(in_window), errors[0])
    result["requests_per_s"] = round(len(in_window) / (stop_at - window_start), 3)
    return result


def open_loop(base: str, request: Request, rate: float, seconds: float) -> dict[str, float]:
    """Requests started at a fixed rate regardless of answers (a line does not wait), latencies."""
    latencies: list[float] = []
    errors, cells = [0], [0]
    lock = threading.Lock()

    def one(n: int) -> None:
        with httpx.Client(base_url=base, timeout=60, headers=AUTH) as client:
            began = time.perf_counter()
            try:
                judged = request(client, 2_000_000_000 + n)
            except (httpx.HTTPError, RuntimeError):
                with lock:
                    errors[0] += 1
                return
            with lock:
                latencies.append(time.perf_counter() - began)
                cells[0] += judged

    threads = []
    started = time.perf_counter()
    for n in range(int(seconds * rate)):
        time.sleep(max(0.0, started + n / rate - time.perf_counter()))
        thread = threading.Thread(target=one, args=(n,))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return summary(latencies, time.perf_counter() - started, cells[0], errors[0])


def summary(latencies: list[float], elapsed: float, cells: int, errors: int) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "requests": len(latencies),
        "errors": errors,
        "cells_per_s": round(cells / elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def module_request(line: str, body: bytes) -> Request:
    def post(client: httpx.Client, n: int) -> int:
        headers = {"Content-Type": "image/png", "X-Module-Serial": f"bench-{n}", "X-Frame-Id": "1"}
        response = client.post(f"/lines/{line}/modules", content=body, headers=headers)
        if response.status_code != 201:
            raise RuntimeError(response.text[:200])
        return len(response.json()["cells"])

    return post


def v2_request(name: str, size: int, batch: int) -> Request:
    cells = np.random.default_rng(1).uniform(0, 255, (batch, 1, size, size)).astype(np.float32)
    raw = cells.tobytes()
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": list(cells.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "probability", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    body = head + raw

    def post(client: httpx.Client, _n: int) -> int:
        response = client.post(
            f"/v2/models/{name}/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
        if response.status_code != 200:
            raise RuntimeError(response.text[:200])
        return batch

    return post


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--variant", default="fp32", help="model file variant from the card (fp32, int8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per phase")
    parser.add_argument(
        "--latency-seconds", type=float, default=20.0, help="time of the one-module-per-second phase"
    )
    parser.add_argument("--clients", type=int, default=3, help="concurrent clients in the throughput phases")
    parser.add_argument(
        "--batch", type=int, default=16, help="the service's max batch, also used for raw onnxruntime"
    )
    parser.add_argument("--v2-batch", type=int, default=8, help="cells per V2 infer request")
    parser.add_argument(
        "--threads", type=int, default=0, help="the service's intra-op threads (0: its default)"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="the service's inference workers (0: its default)"
    )
    args = parser.parse_args()

    card = read_card(args.model_dir)
    size = card.input.size
    model_file = card.onnx_path(args.model_dir, args.variant)
    raw_before = raw_ceiling(model_file, size, args.batch, args.seconds)
    frames = {60: module_png(6, 10, size, 0), 144: module_png(6, 24, size, 1, half_cut=True)}

    with tempfile.TemporaryDirectory(prefix="pvqc-bench-") as var_dir:
        process, base = start_service(args, Path(var_dir))
        try:
            warm = module_request("L60", frames[60])
            with httpx.Client(base_url=base, timeout=60, headers=AUTH) as client:
                for n in range(2):
                    warm(client, -1 - n)
            m60 = closed_loop(base, module_request("L60", frames[60]), args.clients, args.seconds)
            m144 = closed_loop(base, module_request("L144", frames[144]), args.clients, args.seconds)
            v2 = closed_loop(base, v2_request(card.name, size, args.v2_batch), args.clients, args.seconds)
            paced = open_loop(base, module_request("L60", frames[60]), 1.0, args.latency_seconds)
            rss = peak_rss_mb(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    raw_after = raw_ceiling(model_file, size, args.batch, args.seconds)
    # the ceiling is onnxruntime alone spending the cores its best way; plain onnxruntime (one call
    # over all cores) is reported beside it
    raws = {way: (raw_before[way] + raw_after[way]) / 2 for way in raw_before}
    raw = max(raws.values())

    def with_ratio(phase: dict[str, float]) -> dict[str, float]:
        return {
            **phase,
            "ratio_to_raw": round(phase["cells_per_s"] / raw, 3),
            "ratio_to_plain_onnxruntime": round(phase["cells_per_s"] / raws["one_call_all_cores"], 3),
        }

    print(
        json.dumps(
            {
                "benchmark": "service_throughput",
                "model": f"{card.name} {card.version}",
                "variant": args.variant,
                "input_size": size,
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
                "clients": args.clients,
                "max_batch": args.batch,
                "raw_onnxruntime_cells_per_s": round(raw, 2),
                "raw_ways_cells_per_s": {way: round(v, 2) for way, v in raws.items()},
                "raw_before": {way: round(v, 2) for way, v in raw_before.items()},
                "raw_after": {way: round(v, 2) for way, v in raw_after.items()},
                "module_60": {**with_ratio(m60), "modules_per_s": m60["requests_per_s"]},
                "module_144": {
                    **with_ratio(m144),
                    "modules_per_s": m144["requests_per_s"],
                    # half cells: two model inputs each, so the ratios to raw count half of the work
                    "model_inputs_per_s": round(2 * m144["cells_per_s"], 2),
                    "model_inputs_ratio_to_raw": round(2 * m144["cells_per_s"] / raw, 3),
                },
                "v2_binary": {**with_ratio(v2), "batch": args.v2_batch},
                "module_60_at_1_per_s": paced,
                "service_peak_rss_mb": rss,
            }
        )
    )


if __name__ == "__main__":
    main()
