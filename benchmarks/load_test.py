"""Load test of `captioner serve`: throughput, latency, errors, and what dynamic batching gains.

Starts the server itself on a free loopback port, twice: with dynamic batching (--max-batch 16) and one
request at a time (--max-batch 1). Each gets the same warm-up and then the same N caption requests, C at a
time; the report compares them. Everything is bounded: a fixed number of requests, a timeout per request,
a deadline per run, and the servers are always stopped. Writes a Markdown report to stdout and --out.

    .venv/bin/python benchmarks/load_test.py --model CHECKPOINT [--requests 500] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class Run:
    label: str
    max_batch: int
    sent: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] | None = None
    mean_batch: float = 0.0
    error_examples: list[str] | None = None
    model: str = ""

    @property
    def throughput(self) -> float:
        return (self.sent - self.errors) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the successful requests' latencies, in ms."""
        values = sorted(self.latencies or [])
        return values[min(len(values) - 1, max(0, round(q / 100 * len(values)) - 1))] if values else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`captioner serve` in a subprocess on 127.0.0.1; returns once /healthz answers."""
    port = free_port()
    command = [sys.executable, "-m", "captioner.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    command += ["--model", args.model] if args.model else []
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(
        f"the server did not answer within {args.startup_timeout} s:\n{log.read_text()[-2000:]}"
    )


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def send_all(url: str, images: list[tuple[str, bytes]], n: int, args: argparse.Namespace) -> Run:
    """n caption requests, args.concurrency at a time; those not started before the deadline are errors."""
    run = Run("", 0, latencies=[], error_examples=[])
    deadline = time.monotonic() + args.run_timeout
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    form = {"beam_size": str(args.beam_size), "n_best": "1"}

    def one(i: int, client: httpx.Client) -> tuple[float | None, str | None]:
        if time.monotonic() > deadline:
            return None, "not sent: the run's deadline had passed"
        name, data = images[i % len(images)]
        start = time.perf_counter()
        try:
            r = client.post(f"{url}/api/caption", files={"file": (name, data)}, data=form)
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"
        if r.status_code != 200:
            return None, f"HTTP {r.status_code}: {r.text[:200]}"
        return (time.perf_counter() - start) * 1000, None

    with httpx.Client(timeout=args.request_timeout, limits=limits) as client:
        with ThreadPoolExecutor(args.concurrency) as pool:
            start = time.perf_counter()
            results = list(pool.map(lambda i: one(i, client), range(n)))
            run.seconds = time.perf_counter() - start
    for latency, error in results:
        run.sent += 1
        if error is None:
            run.latencies.append(latency)
        else:
            run.errors += 1
            if len(run.error_examples) < 3:
                run.error_examples.append(error)
    return run


def measure(args: argparse.Namespace, label: str, max_batch: int, images: list[tuple[str, bytes]]) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args, max_batch, Path(tmp) / "server.log")
        try:
            send_all(url, images, args.concurrency * 2, args)  # warm-up: first passes are slow
            before = httpx.get(f"{url}/healthz", timeout=10).json()
            run = send_all(url, images, args.requests, args)
            after = httpx.get(f"{url}/healthz", timeout=10).json()
        finally:
            stop_server(proc)
    batches = after["batching"]["batches"] - before["batching"]["batches"]
    requests = after["batching"]["requests"] - before["batching"]["requests"]
    run.label, run.max_batch, run.mean_batch = label, max_batch, requests / batches if batches else 0.0
    run.model = f"{after['model']} ({after['encoder']} encoder, {after['decoder']} decoder)"
    return run


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor() or "unknown",
    )
    kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return (
        f"{len(os.sched_getaffinity(0))} CPUs (nproc), {cpu}, {kb / 2**20:.1f} GiB RAM; "
        f"load average at start {load}; OMP_NUM_THREADS={threads}; Python {platform.python_version()}"
    )


def report(args: argparse.Namespace, runs: list[Run], images: int, host: str) -> str:
    batched, single = runs
    gain = batched.throughput / single.throughput if single.throughput else float("nan")
    folder = args.images.resolve()
    folder = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    lines = [
        "# Load test: `captioner serve`",
        "",
        f"{datetime.date.today()}: {args.requests} caption requests, {args.concurrency} at a time, over "
        f"127.0.0.1 after a warm-up of {2 * args.concurrency}; {images} different photos from "
        f"`{folder}`, beam size {args.beam_size}. Model: {batched.model}.",
        "",
        f"Machine: {host}.",
        "",
        "| server | requests | errors | throughput (req/s) | p50 (ms) | p99 (ms) | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.label} | {r.sent} | {r.errors} | {r.throughput:.1f} | {r.percentile(50):.0f} "
            f"| {r.percentile(99):.0f} | {r.mean_batch:.1f} |"
        )
    lines += [
        "",
        f"Dynamic batching gives **{gain:.2f}x** the throughput of captioning one request at a time.",
    ]
    for r in runs:
        lines += [f"\nErrors ({r.label}): " + "; ".join(r.error_examples)] if r.error_examples else []
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory or bundled model name")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--images", type=Path, default=ROOT / "examples", help="folder of photos to send")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds for one request")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="no request starts after this many s")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "load-test.md")
    args = p.parse_args()
    paths = sorted(f for f in args.images.iterdir() if f.suffix.lower() in SUFFIXES)
    if not paths:
        print(f"load_test: no photos in {args.images}", file=sys.stderr)
        return 1
    images = [(f.name, f.read_bytes()) for f in paths]
    host = machine()
    runs = []
    for label, max_batch in [
        (f"batched (max batch {args.max_batch})", args.max_batch),
        ("one by one (max batch 1)", 1),
    ]:
        print(f"load_test: {label}: {args.requests} requests...", file=sys.stderr, flush=True)
        runs.append(measure(args, label, max_batch, images))
    text = report(args, runs, len(images), host)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 1 if any(r.errors for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
