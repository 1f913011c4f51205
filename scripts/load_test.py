"""Bounded load test of `serve` on loopback: starts `cli.py serve` on a free 127.0.0.1 port, warms it up, then
N clients upload photos (from a folder or zip) back to back for a fixed time. Prints requests/s, p50/p99
latency, errors and the server's resident memory (RSS) before, during and after, as a Markdown section."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_photos(source: Path, limit: int) -> list[tuple[str, bytes]]:
    """Up to `limit` photos spread evenly over a folder or zip, read into memory (names sorted)."""
    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as archive:
            names = sorted(n for n in archive.namelist() if n.lower().endswith(PHOTO_SUFFIXES))
            step = max(1, len(names) // limit)
            return [(Path(n).name, archive.read(n)) for n in names[::step][:limit]]
    paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    step = max(1, len(paths) // limit)
    return [(p.name, p.read_bytes()) for p in paths[::step][:limit]]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cache: str, runtime: str | None, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "cli.py", "serve", "--cache", cache, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--runtime", runtime] if runtime else []
    with open(log, "w") as output:  # the server keeps its own copy of the descriptor
        server = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit(f"serve did not start; its log: {log}")


def run_clients(url: str, photos: list[tuple[str, bytes]], clients: int, seconds: float,
                on_tick=None) -> tuple[list[float], int, float]:
    """(latencies of successful requests in s, error count, wall seconds); `on_tick` runs about every 5 s."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        nonlocal errors
        with httpx.Client(timeout=60) as session:
            i = index
            while time.monotonic() < deadline:
                name, data = photos[i % len(photos)]
                i += clients
                started = time.perf_counter()
                try:
                    ok = session.post(url, files={"file": (name, data, "image/jpeg")}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - started
                with lock:
                    if ok:
                        latencies.append(took)
                    else:
                        errors += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(5.0, left))
        if on_tick:
            on_tick()
    for thread in threads:
        thread.join()
    return latencies, errors, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--photos", required=True, help="folder or .zip of query photos")
    parser.add_argument("--runtime", choices=["torch", "onnx"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=int, default=20, help="requests before measuring")
    parser.add_argument("--max-photos", type=int, default=256)
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 600:
        raise SystemExit("--clients 1..64 and --seconds up to 600: this test is bounded")
    photos = load_photos(Path(args.photos), args.max_photos)
    port = free_port()
    server = start_server(args.cache, args.runtime, port, Path(f"/tmp/lookalike-load-{port}.log"))
    url = f"http://127.0.0.1:{port}/api/query"
    try:
        with httpx.Client(timeout=60) as warm:
            for name, data in photos[:args.warmup]:
                warm.post(url, files={"file": (name, data, "image/jpeg")}).raise_for_status()
        before = rss_mib(server.pid)
        samples = [before]
        latencies, errors, wall = run_clients(url, photos, args.clients, args.seconds,
                                              on_tick=lambda: samples.append(rss_mib(server.pid)))
        after = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    ms = np.asarray(latencies) * 1000
    command = "python scripts/load_test.py " + " ".join(sys.argv[1:])
    print(f"| clients | seconds | requests | requests/s | p50 ms | p99 ms | errors | RSS MiB before → after (peak) |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| {args.clients} | {wall:.1f} | {len(ms)} | {len(ms) / wall:.1f} | {np.percentile(ms, 50):.0f} | "
          f"{np.percentile(ms, 99):.0f} | {errors} | {before:.0f} → {after:.0f} ({max(samples + [after]):.0f}) |\n\n"
          f"`{command}` — {len(photos)} distinct photos, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores; RSS MiB every ~5 s: {', '.join(f'{v:.0f}' for v in samples + [after])}")


if __name__ == "__main__":
    main()
