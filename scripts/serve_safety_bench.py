"""What one hostile client can do to `serve` (issue 21's targets), measured on loopback against `cli.py serve`:

1. memory: 150 distinct re-ranking policies (each a new DBA matrix), sent as "more like this" queries, retried
   after each 429 as a determined client would: the server's RSS growth;
2. fairness: a normal client's upload latency (p95) alone, then while a second client sends the heaviest allowed
   policy back to back, each with a new DBA weight (so nothing it asks for is ever cached): the ratio;
3. throughput: 8 clients uploading photos (scripts/load_test.py's loop).
Prints a Markdown section."""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from load_test import free_port, load_photos, rss_mib, run_clients, start_server  # this folder's load test

HEAVIEST = "flat@10+dba:100@{a}+qe:100@10+krecip:100/100"  # every size at its limit (cache/policies.py)


def hostile_policies(count: int) -> list[str]:
    return [f"flat+dba:{2 + i % 99}@{i / count:.4f}" for i in range(count)]


def send_policies(url: str, policies: list[str]) -> tuple[int, int, int]:
    """(answered, refused with 429 then retried, other errors): each policy is sent until it is answered."""
    answered = busy = errors = 0
    with httpx.Client(timeout=120) as client:
        for i, policy in enumerate(policies):
            while True:
                response = client.post(url, json={"row": i % 50, "buckets": policy})
                if response.status_code != 429:
                    break
                busy += 1
                time.sleep(float(response.headers.get("retry-after", "1")))
            answered += response.status_code == 200
            errors += response.status_code != 200
    return answered, busy, errors


def heavy_client(url: str, stop: threading.Event, counts: dict) -> None:
    """The heaviest allowed policy back to back, a new DBA weight each time, ignoring 429s."""
    with httpx.Client(timeout=120) as client:
        n = 0
        while not stop.is_set():
            n += 1
            policy = HEAVIEST.format(a=f"{(n * 7) % 10_000 / 1000:.3f}")
            status = client.post(url, json={"row": n % 50, "buckets": policy}).status_code
            counts[status] = counts.get(status, 0) + 1


def p95_ms(latencies: list[float]) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--photos", required=True, help="folder or .zip of query photos")
    parser.add_argument("--seconds", type=float, default=20.0, help="each latency and throughput phase")
    parser.add_argument("--policies", type=int, default=150)
    args = parser.parse_args()
    photos = load_photos(Path(args.photos), 256)
    port = free_port()
    server = start_server(args.cache, None, port, Path(f"/tmp/lookalike-safety-{port}.log"))
    url = f"http://127.0.0.1:{port}/api/query"
    try:
        with httpx.Client(timeout=60) as warm:
            for name, data in photos[:20]:
                warm.post(url, files={"file": (name, data, "image/jpeg")}).raise_for_status()
        before = rss_mib(server.pid)
        started = time.monotonic()
        answered, busy, errors = send_policies(url, hostile_policies(args.policies))
        policy_seconds = time.monotonic() - started
        after = rss_mib(server.pid)

        alone, alone_errors, _ = run_clients(url, photos, 1, args.seconds)
        stop, counts = threading.Event(), {}
        heavy = threading.Thread(target=heavy_client, args=(url, stop, counts))
        heavy.start()
        contended, contended_errors, _ = run_clients(url, photos, 1, args.seconds)
        stop.set()
        heavy.join()

        eight, eight_errors, wall = run_clients(url, photos, 8, args.seconds)
        final = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"| measure | figure | target |\n|---|---|---|\n"
          f"| RSS after {args.policies} distinct DBA policies | {before:.0f} → {after:.0f} MiB (+{after - before:.0f}); "
          f"{answered} answered, {errors} refused, {busy} × 429 retried, {policy_seconds:.1f} s | ≤ +100 MB |\n"
          f"| normal upload p95 alone → beside the heaviest policy | {p95_ms(alone):.0f} → {p95_ms(contended):.0f} ms "
          f"(× {p95_ms(contended) / p95_ms(alone):.2f}); heavy client's answers: "
          f"{', '.join(f'{n} × {s}' for s, n in sorted(counts.items()))} | ≤ × 3 |\n"
          f"| 8 clients uploading | {len(eight) / wall:.1f} queries/s, p50 {np.percentile(eight, 50) * 1000:.0f} ms, "
          f"p99 {np.percentile(eight, 99) * 1000:.0f} ms, {eight_errors} errors | ≥ 25 queries/s |\n\n"
          f"`python scripts/serve_safety_bench.py {' '.join(sys.argv[1:])}` — errors alone/contended "
          f"{alone_errors}/{contended_errors}; RSS at the end {final:.0f} MiB; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
