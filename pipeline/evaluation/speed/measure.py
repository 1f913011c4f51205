"""Model-side figures: forward-only ceilings, the naive one-at-a-time build, agreement with eager fp32, query
latency (warm in a process of its own, cold as a new `cli.py query`)."""
from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lookalike.models.errors import UserError
from lookalike.pipeline.evaluation.speed.children import ROOT, run_child


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _model_calls(pipeline) -> list[tuple]:
    """(name, transform, batched forward, model) for every model stage, as the stages call them."""
    from lookalike.pipeline.stages import ClassifyStage, EmbedStage

    calls = []
    for stage in pipeline.stages:
        if isinstance(stage, ClassifyStage):
            calls.append((f"classify:{stage.classifier.spec.name}", stage.transform,
                          lambda batch, s=stage: s.classifier.predict(batch, s.classes_kept), stage.classifier.net))
        elif isinstance(stage, EmbedStage):
            embedder = stage.embedder
            calls.append((f"embed:{embedder.spec.name}", stage.transform, embedder.embed,
                          getattr(embedder, "net", embedder)))
    return calls


def _runs_as(model) -> str:
    """'onnxruntime', or torch with the autocast precision it chose ('torch bfloat16'), or 'torch float32'."""
    if getattr(getattr(model, "onnx", None), "in_use", False):
        return "onnxruntime"
    return f"torch {getattr(model, 'precision', 'float32')}"


def forward_ceilings(pipeline, image, batch_size: int, seconds: float = 4.0) -> dict:
    """Images/s of each model on preprocessed batches (no decoding), and batch-1 latency in ms."""
    models = {}
    for name, transform, forward, model in _model_calls(pipeline):
        import torch

        one = transform(image)
        batch = torch.stack([one] * batch_size)
        forward(batch)  # warm-up: first-call allocations, kernel choice
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or count < 2 * batch_size:
            forward(batch)
            count += batch_size
        rate = count / (time.perf_counter() - started)
        single = one[None]
        forward(single)
        latencies = []
        for _ in range(15):
            t = time.perf_counter()
            forward(single)
            latencies.append((time.perf_counter() - t) * 1000)
        models[name] = {"images_per_s": rate, "batch1_ms_p50": statistics.median(latencies),
                        "input": list(one.shape), "runs_as": _runs_as(model)}
    combined = 1.0 / sum(1.0 / m["images_per_s"] for m in models.values()) if models else 0.0
    return {"models": models, "images_per_s": combined,
            "batch1_ms_sum": sum(m["batch1_ms_p50"] for m in models.values())}


def preprocess_core_ms(pipeline, root: Path, paths: list[str]) -> float:
    """Milliseconds of one core to decode and preprocess one image as the build's loader threads do (mean over
    `paths` after one warm-up, thread CPU time)."""
    import torch

    from lookalike.pipeline.pipeline import load_item

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the loader threads
    try:
        load_item(paths[0], root, pipeline.decode_side, pipeline.transforms)
        started = time.thread_time()
        for path in paths:
            load_item(path, root, pipeline.decode_side, pipeline.transforms)
        return (time.thread_time() - started) * 1000 / len(paths)
    finally:
        torch.set_num_threads(threads)


def cpu_budget(forward_images_per_s: float, preprocess_ms: float, cores: int) -> dict:
    """Where a CPU build's time goes when every core is busy: the forward's core-ms per image (its threads use
    every core), the preprocessing's, and the embedding rate the two allow together against the forward-only
    ceiling (the decoding threads share the cores the forward would use)."""
    forward_ms = cores * 1000 / forward_images_per_s
    return {"cores": cores, "forward_core_ms": forward_ms, "preprocess_core_ms": preprocess_ms,
            "embed_bound_vs_forward": forward_ms / (forward_ms + preprocess_ms)}


def naive_embedder(pipeline):
    """One image at a time, as the reference notebooks: fresh fp32 NCHW copies of the models, no_grad."""
    import torch

    from lookalike.models.outputs import l2_normalize
    from lookalike.pipeline.images import load_image
    from lookalike.pipeline.stages import ClassifyStage, EmbedStage

    steps = []
    for stage in pipeline.stages:
        if isinstance(stage, ClassifyStage):
            model = copy.deepcopy(stage.classifier.net.model).to(memory_format=torch.contiguous_format)

            def classify(x, model=model, stage=stage):
                x = x.to(next(model.parameters()).device)
                pooled = model.forward_head(model.forward_features(x), pre_logits=True)
                return pooled if stage.embed else None, int(model.get_classifier()(pooled).argmax(-1)[0])

            steps.append((stage.transform, classify))
        elif isinstance(stage, EmbedStage):
            embedder = stage.embedder
            module = getattr(getattr(embedder, "net", None), "model", None) or getattr(embedder, "visual", None)
            if module is None:  # a kind the reference never had: run it as lookalike does, batch of one
                steps.append((stage.transform, lambda x, e=embedder: (torch.as_tensor(e.embed(x)), None)))
                continue
            module = copy.deepcopy(module).to(memory_format=torch.contiguous_format)
            if hasattr(embedder, "net"):
                def embed(x, m=module):
                    return m.forward_head(m.forward_features(x.to(next(m.parameters()).device)), pre_logits=True), None
            else:
                def embed(x, m=module):
                    return m(x.to(next(m.parameters()).device)), None
            steps.append((stage.transform, embed))

    def run(path: Path) -> tuple[np.ndarray | None, int | None]:
        """(L2-normalised embedding, top-1 class or None) of one image."""
        image = load_image(path)
        vector = top1 = None
        with torch.no_grad():
            for transform, forward in steps:
                features, top = forward(transform(image)[None])
                top1 = top if top is not None else top1
                if features is not None:
                    vector = l2_normalize(features, "the eager reference")[0]
        return vector, top1

    return run


def naive_build(config: dict, root: Path, paths: list[str]) -> dict:
    """The naive build of `paths`, timed in this process (call it in a fresh one: see warm_queries)."""
    from lookalike.pipeline.config import PipelineConfig
    from lookalike.pipeline.pipeline import build_pipeline

    run = naive_embedder(build_pipeline(PipelineConfig(**dict(config, runtime="torch"))))  # eager, by definition
    run(root / paths[0])  # warm-up, not counted
    rows, started = [], time.perf_counter()
    for path in paths:
        rows.append(run(root / path))
    seconds = time.perf_counter() - started
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds}


def agreement(pipeline, naive_run, root: Path, paths: list[str]) -> dict:
    """How the pipeline's outputs (its runtime and precision) compare with eager fp32 on real images:
    the smallest and mean cosine of the embeddings, and the share of images with the same top-1 class."""
    items = list(pipeline.run(paths, root))
    cosines, same = [], []
    for item, path in zip(items, paths):
        if item.error:
            continue
        vector, top1 = naive_run(root / path)
        cosines.append(float(np.dot(item.embedding, vector)))
        if top1 is not None:
            same.append(int(item.classes[0]) == top1)
    return {"images": len(cosines), "cosine_min": min(cosines), "cosine_mean": float(np.mean(cosines)),
            "top1_agreement": float(np.mean(same)) if same else None}


def warm_queries(cache: Path, paths: list[str], overrides: dict) -> list[float]:
    """Milliseconds of each query, one image at a time, in this process after two warm-up queries."""
    from lookalike.pipeline.query import open_query_pipeline

    pipeline, _ = open_query_pipeline(cache, overrides)
    list(pipeline.run(paths[:2]))
    warm = []
    for path in paths:
        started = time.perf_counter()
        items = list(pipeline.run([path]))
        warm.append((time.perf_counter() - started) * 1000)
        if items[0].error or not items[0].results:
            raise UserError(f"speed: query {path} failed: {items[0].error}")
    return warm


def query_latency(cache: Path, images: list[Path], queries: int, cold_runs: int, reference_queries: int,
                  naive_run=None, device: str = "auto", runtime: str = "torch") -> dict:
    """Warm and cold query latency with the given device and runtime (a cache records neither)."""
    from lookalike.pipeline.query import open_query_pipeline, runs_recorded_exports

    overrides = {"device": device, "runtime": runtime}
    pipeline, config = open_query_pipeline(cache, overrides)
    chosen = [str(images[i % len(images)]) for i in range(queries)]
    # Warm queries run in a process of their own, as a user's query process: nothing left over from the build
    # (thread pools, the page cache of its writes) can slow them or be counted in them.
    warm = run_child("warm-queries", cache=str(cache), paths=chosen, overrides=overrides)
    cold = []
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for i in range(cold_runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "query", chosen[i], "--cache", str(cache),
                        "--device", device, "--runtime", runtime],
                       check=True, capture_output=True, env=env, cwd=ROOT)
        cold.append(time.perf_counter() - t)
    recorded = runs_recorded_exports(config, pipeline.stage("retrieve").searcher.data)
    result = {"buckets": config.buckets, "warm_ms_p50": percentile(warm, 50), "warm_ms_p95": percentile(warm, 95),
              "cold_s": statistics.median(cold), "cold_runs": cold_runs, "queries": queries,
              "path": "the cache's ONNX exports, no torch" if recorded else "torch"}
    classify = pipeline.stage("classify")
    if naive_run is not None and classify is not None and reference_queries:
        # The reference approach: classify the query, then embed its predicted class's gallery images now.
        searcher = pipeline.stage("retrieve").searcher
        table = searcher.table(1)
        root = searcher.data.gallery_root
        paths = searcher.data.columns["paths"]
        costs, sizes = [], []
        for path in chosen[:reference_queries]:
            t = time.perf_counter()
            item = list(pipeline.run([path]))[0]
            rows = table.rows_of(int(item.classes[0]))
            for row in rows:
                naive_run(root / str(paths[row]))
            costs.append(time.perf_counter() - t)
            sizes.append(len(rows))
        result.update(reference_s_mean=float(np.mean(costs)), reference_bucket_images_mean=float(np.mean(sizes)),
                      reference_queries=reference_queries)
    return result
