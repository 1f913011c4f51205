"""run_speed: every figure of one configuration, in order, into one report."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from lookalike.models.errors import UserError
from lookalike.pipeline.evaluation.environment import environment
from lookalike.pipeline.evaluation.speed.camera import build_figures, camera_figures
from lookalike.pipeline.evaluation.speed.children import run_child
from lookalike.pipeline.evaluation.speed.measure import (
    agreement,
    cpu_budget,
    forward_ceilings,
    naive_embedder,
    preprocess_core_ms,
    query_latency,
)
from lookalike.pipeline.evaluation.speed.synthetic import search_sizes_benchmark


def run_speed(gallery: str | Path, config, queries: int = 50, naive_images: int = 200, cold_runs: int = 3,
              reference_queries: int = 5, search_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000),
              forward_seconds: float = 4.0, workdir: str | Path | None = None, echo=None, engine: str = "local",
              ray_address: str | None = None, camera_images: int = 100) -> dict:
    """All the figures for one configuration; `echo` gets a line per finished step."""
    from lookalike.pipeline.datasets import resolve_data
    from lookalike.pipeline.gallery import scan_gallery
    from lookalike.pipeline.images import load_image
    from lookalike.pipeline.pipeline import build_pipeline

    echo = echo or (lambda line: None)
    root = resolve_data(gallery)
    entries, _ = scan_gallery(root)
    if not entries:
        raise UserError(f"{gallery}: no images")
    report = {"environment": environment(config.device), "config": config.to_dict(), "gallery": str(root), "images": len(entries)}
    started = time.perf_counter()
    pipeline = build_pipeline(config)
    report["model_load_s"] = time.perf_counter() - started
    forward = forward_ceilings(pipeline, load_image(root / entries[0].relpath), config.batch_size, forward_seconds)
    report["forward"] = forward
    echo(f"forward-only: {forward['images_per_s']:.1f} images/s")
    _measure_cpu_budget(report, pipeline, root, entries, config.device, echo)
    engines = {"local": None}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cache = Path(tmp) / "cache"
        report["build"] = build_figures(root, cache, config, pipeline)
        echo(f"build-cache: {report['build']['images_per_s']:.1f} images/s")
        if engine != "local":
            engines[engine] = _measure_engine_build(report, root, Path(tmp), config, pipeline, engine, ray_address,
                                                    echo)
        naive_run = _measure_naive_build(report, root, entries, config, pipeline, naive_images, echo)
        images = [root / e.relpath for e in entries[len(entries) // 2::max(1, len(entries) // (queries + 1))]]
        report["query"] = query_latency(cache, images, queries, cold_runs, reference_queries, naive_run,
                                        config.device, config.runtime)
        echo(f"query: warm p50 {report['query']['warm_ms_p50']:.1f} ms, cold {report['query']['cold_s']:.2f} s")
        report["search"] = search_sizes_benchmark(list(search_sizes), Path(tmp)) if search_sizes else {}
        if camera_images:
            step = max(1, len(entries) // camera_images)
            report["camera"] = camera_figures(root, [e.relpath for e in entries[::step]][:camera_images], config,
                                              pipeline, engines, Path(tmp) / "camera", report.get("cpu_budget"))
            echo("camera photos: " + ", ".join(f"{name} {figures['camera_vs_small']:.2f} x small photos"
                                               for name, figures in report["camera"].items() if name in engines))
    report.update(_ratios(report))
    return report


def _measure_cpu_budget(report: dict, pipeline, root: Path, entries: list, device: str, echo) -> None:
    """report["cpu_budget"] on a CPU (on a GPU the forward does not use the cores the decoding needs)."""
    from lookalike.models.machine import usable_cpus
    from lookalike.models.runtime import resolve_device

    if resolve_device(device).type != "cpu":
        return
    sample = [e.relpath for e in entries[::max(1, len(entries) // 100)]][:100]
    report["cpu_budget"] = cpu_budget(report["forward"]["images_per_s"], preprocess_core_ms(pipeline, root, sample),
                                      usable_cpus())
    echo(f"CPU budget: forward {report['cpu_budget']['forward_core_ms']:.1f} core-ms per image, preprocessing "
         f"{report['cpu_budget']['preprocess_core_ms']:.1f}: embedding at most "
         f"{report['cpu_budget']['embed_bound_vs_forward']:.2f} x forward-only")


def _measure_engine_build(report: dict, root: Path, tmp: Path, config, pipeline, engine: str,
                          ray_address: str | None, echo):
    """report["engine_build"]: build-cache with another engine, against the local one; the engine, connected."""
    from lookalike.pipeline.engines import create_engine

    built = create_engine(engine, config, ray_address, pipeline)
    built.connect()  # Ray starts (or joins its cluster) before the clock; its actors within it
    report["engine_build"] = dict(build_figures(root, tmp / f"cache-{engine}", config, pipeline, built), engine=engine)
    report["engine_vs_local"] = report["engine_build"]["images_per_s"] / report["build"]["images_per_s"]
    echo(f"build-cache --engine {engine}: {report['engine_build']['images_per_s']:.1f} images/s")
    return built


def _measure_naive_build(report: dict, root: Path, entries: list, config, pipeline, naive_images: int, echo):
    """report["naive"] (one image at a time, in a fresh process) and report["agreement"] with eager fp32; the eager
    fp32 copies of the models (the agreement reference and the reference query)."""
    step = max(1, len(entries) // naive_images) if naive_images else 1
    sample = [e.relpath for e in entries[::step]][:naive_images]
    report["naive"] = {"images_per_s": 0.0}
    if sample:
        report["naive"] = run_child("naive-build", config=config.to_dict(), root=str(root), paths=sample)
    echo(f"naive build: {report['naive']['images_per_s']:.1f} images/s")
    naive_run = naive_embedder(pipeline)
    if sample:
        report["agreement"] = agreement(pipeline, naive_run, root, sample[:64])
        echo(f"agreement with eager fp32: cosine min {report['agreement']['cosine_min']:.5f}")
    return naive_run


def _ratios(report: dict) -> dict:
    """The headline figures and their ratios, from the parts measured."""
    forward, build, naive, query = report["forward"], report["build"], report["naive"], report["query"]
    return {
        "forward_images_per_s": forward["images_per_s"], "build_images_per_s": build["images_per_s"],
        "naive_images_per_s": naive["images_per_s"],
        "build_vs_forward": build["images_per_s"] / forward["images_per_s"],
        "build_vs_naive": build["images_per_s"] / naive["images_per_s"],
        "query_warm_ms_p50": query["warm_ms_p50"], "query_warm_ms_p95": query["warm_ms_p95"],
        "query_cold_s": query["cold_s"], "query_warm_vs_forward": query["warm_ms_p50"] / forward["batch1_ms_sum"],
    }
