"""How fast lookalike answers from a cold start, and how fast its default build runs, as a new user meets them.

Each figure is the median of fresh `lookalike` processes (files already in the OS cache: one untimed run first),
with the peak RSS of each process from wait4. The default build (--runtime auto) and the eager torch build run on
the same gallery in the same run.

    HF_HUB_OFFLINE=1 LOOKALIKE_WEIGHTS=../shared/weights .venv/bin/python scripts/instant_bench.py \\
        --cache .demo/cache --gallery .demo/gallery --queries .demo/queries
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb(command: list[str]) -> float:
    """Peak RSS of one run, from the kernel's accounting of the child (wait4)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        sys.exit(f"instant_bench: {' '.join(command)} failed (status {status})")
    return usage.ru_maxrss / 1024


def median_seconds(command: list[str], runs: int) -> tuple[float, list[float]]:
    subprocess.run(command, check=True, capture_output=True)  # untimed: the files are now in the OS cache
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def build_figures(gallery: str, runtime: str, classifier: str, embedder: str) -> dict:
    """A fresh build of `gallery` in a process of its own: images/s and its phases (BuildReport)."""
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import json, lookalike\n"
                f"r = lookalike.build({gallery!r}, {str(Path(tmp) / 'cache')!r}, classifier={classifier!r}, "
                f"embedder={embedder!r}, runtime={runtime!r})\n"
                "print(json.dumps(dict(images_per_s=r.images_per_s, seconds=r.seconds, phases=r.phases)))")
        result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="a cache built with the default runtime (make demo's)")
    parser.add_argument("--queries", required=True, help="a folder of query photos (10 are used)")
    parser.add_argument("--gallery", help="a gallery to build twice: --runtime auto (the default) and torch")
    parser.add_argument("--classifier", default="mobilenetv2")
    parser.add_argument("--embedder", default="mobilenetv2")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per figure (the median is shown)")
    args = parser.parse_args()
    lookalike = shutil.which("lookalike", path=str(Path(sys.executable).parent)) or "lookalike"
    photos = sorted(str(p) for p in Path(args.queries).iterdir())[:10]
    if len(photos) < 10:
        sys.exit(f"instant_bench: {args.queries}: need 10 query photos, found {len(photos)}")
    commands = {
        "query, 1 photo": [lookalike, "query", photos[0], "--cache", args.cache],
        "query, 10 photos": [lookalike, "query", *photos, "--cache", args.cache],
        "duplicates": [lookalike, "duplicates", "--cache", args.cache],
        "query, 1 photo, --runtime torch": [lookalike, "query", photos[0], "--cache", args.cache, "--runtime", "torch"],
    }
    print(f"| figure (median of {args.runs} fresh processes, {os.cpu_count()} CPUs) | seconds | runs | peak RSS |")
    print("|---|---|---|---|")
    for name, command in commands.items():
        median, times = median_seconds(command, args.runs)
        print(f"| `{' '.join(['lookalike', *command[1:2]])}` {name} | **{median:.2f}** | "
              f"{', '.join(f'{t:.2f}' for t in times)} | {peak_rss_mb(command):.0f} MB |")
    if args.gallery:
        print(f"\n| build-cache of {args.gallery} | images/s | seconds | phases (embed, choose_policy, the rest: "
              "model load, scan, publish) |\n|---|---|---|---|")
        rates = {}
        for runtime in ("auto", "torch"):
            figures = build_figures(args.gallery, runtime, args.classifier, args.embedder)
            rates[runtime] = figures["images_per_s"]
            print(f"| --runtime {runtime}{' (the default)' if runtime == 'auto' else ''} | "
                  f"{figures['images_per_s']:.1f} | {figures['seconds']:.1f} | "
                  f"{', '.join(f'{k} {v:.1f} s' for k, v in figures['phases'].items())} |")
        print(f"\ndefault build / eager torch build, same run: **{rates['auto'] / rates['torch']:.2f}x**")


if __name__ == "__main__":
    main()
