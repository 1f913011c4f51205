"""`speed`: how close build-cache and query come to what the models allow on this machine, measured.

Figures (all on the machine it runs on, with its thread count):
- forward-only throughput of each model (batched, its own resolution): the ceiling;
- end-to-end build-cache throughput (models loaded once, as a long build sees them) and its ratio;
- the naive build (one image at a time, fp32 NCHW under no_grad, as the reference notebooks) and its ratio;
- query latency: cold (a new `cli.py query` process) and warm (p50/p95 in one process), against the
  summed batch-1 forward times, and the reference approach (embed the predicted class's gallery at query time);
- search alone on synthetic L2-normalised vectors in 1,000 buckets, each size in a fresh process;
- with `--engine ray`, the same build on Ray Data (Ray started before the clock) against the local engine;
- "camera photos": a sample of the gallery re-encoded as 12 MP JPEGs (4000x3000), built against the same
  sample at its own size, with each engine measured.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.errors import UserError
from pipeline.evaluation.environment import environment

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC_DIM = 512
SYNTHETIC_BUCKETS = 1000


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# ---------------------------------------------------------------- models: forward-only ceilings

def _model_calls(pipeline) -> list[tuple]:
    """(name, transform, batched forward, model) for every model stage, as the stages call them."""
    from pipeline.stages import ClassifyStage, EmbedStage

    calls = []
    for stage in pipeline.stages:
        if isinstance(stage, ClassifyStage):
            calls.append((f"classify:{stage.classifier.spec.name}", stage.transform,
                          lambda batch, s=stage: s.classifier.predict(batch, s.k), stage.classifier.net))
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


# ---------------------------------------------------------------- the naive reference build

def naive_embedder(pipeline):
    """One image at a time, as the reference notebooks: fresh fp32 NCHW copies of the models, no_grad."""
    import torch

    from models.runtime import l2_normalize
    from pipeline.images import load_image
    from pipeline.stages import ClassifyStage, EmbedStage

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
    from pipeline.config import PipelineConfig
    from pipeline.pipeline import build_pipeline

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


# ---------------------------------------------------------------- query latency

def warm_queries(cache: Path, paths: list[str], overrides: dict) -> list[float]:
    """Milliseconds of each query, one image at a time, in this process after two warm-up queries."""
    from pipeline.query import open_query_pipeline

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
    from pipeline.query import open_query_pipeline

    overrides = {"device": device, "runtime": runtime}
    pipeline, config = open_query_pipeline(cache, overrides)
    chosen = [str(images[i % len(images)]) for i in range(queries)]
    # Warm queries run in a process of their own, as a user's query process: nothing left over from the build
    # (thread pools, the page cache of its writes) can slow them or be counted in them.
    warm = _child(f"import json; from pathlib import Path; from pipeline.evaluation.speed import warm_queries; "
                  f"print(json.dumps(warm_queries(Path({str(cache)!r}), {chosen!r}, {overrides!r})))")
    cold = []
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for i in range(cold_runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "query", chosen[i], "--cache", str(cache),
                        "--device", device, "--runtime", runtime],
                       check=True, capture_output=True, env=env, cwd=ROOT)
        cold.append(time.perf_counter() - t)
    result = {"buckets": config.buckets, "warm_ms_p50": _percentile(warm, 50), "warm_ms_p95": _percentile(warm, 95),
              "cold_s": statistics.median(cold), "cold_runs": cold_runs, "queries": queries}
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


# ---------------------------------------------------------------- search alone, synthetic

def synthetic(count: int, seed: int = 0, dim: int = SYNTHETIC_DIM, buckets: int = SYNTHETIC_BUCKETS,
              noise: float = 1.2):
    """(vectors, classes[count, 3], query sampler): clustered unit vectors, bucket centres in 50 groups.

    Each vector is its bucket centre plus Gaussian noise (cosine to the centre ~0.64); bucket centres
    scatter around 50 group centres, so neighbouring buckets overlap as similar classes do. Classes are
    the bucket and its two nearest buckets (a classifier's usual confusions).
    """
    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    groups = unit(rng.standard_normal((50, dim), dtype=np.float32))
    centres = unit(groups[rng.integers(0, 50, buckets)] + 0.8 * unit(rng.standard_normal((buckets, dim),
                                                                                         dtype=np.float32)))
    near = np.argsort(-(centres @ centres.T), axis=1)[:, :3]  # itself first
    own = rng.integers(0, buckets, count)
    vectors = np.empty((count, dim), np.float32)
    for start in range(0, count, 100_000):
        part = slice(start, min(count, start + 100_000))
        noise_part = rng.standard_normal((len(own[part]), dim), dtype=np.float32) * (noise / np.sqrt(dim))
        vectors[part] = unit(centres[own[part]] + noise_part)

    def queries(n: int, query_seed: int = 1):
        qrng = np.random.default_rng(query_seed)
        chosen = qrng.integers(0, buckets, n)
        q = unit(centres[chosen] + qrng.standard_normal((n, dim), dtype=np.float32) * (noise / np.sqrt(dim)))
        return q, near[chosen].astype(np.int32)

    return vectors, near[own].astype(np.int32), queries


def make_synthetic_cache(folder: Path, count: int) -> None:
    """A real cache generation (written by cache.store) holding `count` synthetic rows."""
    from cache.manifest import Manifest
    from cache.store import write_generation

    vectors, classes, _ = synthetic(count)
    columns = {
        "paths": np.char.add("img", np.arange(count).astype(str)), "sizes": np.zeros(count, np.int64),
        "mtimes": np.zeros(count, np.int64), "labels": classes[:, 0].astype(str),
        "label_classes": np.full(count, -1, np.int32), "classes": classes,
        "probs": np.tile(np.array([0.8, 0.15, 0.05], np.float32), (count, 1)),
        "boxes": np.full((count, 4), np.nan, np.float32), "embeddings": vectors,
    }
    write_generation(folder, Manifest(fingerprint={}, config={}, gallery_root=str(folder), count=count,
                                      dim=SYNTHETIC_DIM), columns)


def _memory() -> dict:
    """This process's resident memory in MiB: anonymous (its own) and file-backed (mapped pages)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def search_benchmark(folder: Path, bucket_queries: int = 200, flat_queries: int = 50,
                     recall_queries: int = 100) -> dict:
    """Latency per query of top1, topk:3 and flat on a synthetic cache, memory, and IVF recall@5."""
    import faiss  # noqa: F401  (its libraries are mapped before the baseline, as torch's are in a query process)

    from cache.policies import parse_policy
    from cache.search import EXACT_MAX_ROWS, ExactIndex, Searcher
    from cache.store import load_cache

    before = _memory()
    data = load_cache(folder)
    count = len(data)
    _, _, sample_queries = synthetic(0)
    queries, classes = sample_queries(max(bucket_queries, flat_queries, recall_queries))
    probs = np.array([0.8, 0.15, 0.05], np.float32)
    searcher = Searcher(data)
    out = {"items": count, "dim": SYNTHETIC_DIM, "buckets": SYNTHETIC_BUCKETS,
           "matrix_mib": count * SYNTHETIC_DIM * 4 / 2**20, "exact_max_rows": EXACT_MAX_ROWS}

    def timed(policy: str, n: int) -> dict:
        parsed = parse_policy(policy)
        searcher.search(queries[0], parsed, 5, classes[0], probs)  # builds or loads what it needs
        latencies = []
        for i in range(n):
            t = time.perf_counter()
            searcher.search(queries[i], parsed, 5, classes[i], probs)
            latencies.append((time.perf_counter() - t) * 1000)
        memory = _memory()
        return {"ms_p50": _percentile(latencies, 50), "ms_p95": _percentile(latencies, 95), "queries": n,
                "rss_anon_mib": memory["RssAnon"] - before["RssAnon"], "rss_file_mib": memory["RssFile"] - before["RssFile"]}

    parsed = parse_policy("top1")
    searcher.search(queries[0], parsed, 5, classes[0], probs)
    memory = _memory()
    out["one_query"] = {"rss_anon_mib": memory["RssAnon"] - before["RssAnon"],
                        "rss_file_mib": memory["RssFile"] - before["RssFile"]}
    out["top1"] = timed("top1", bucket_queries)
    out["topk:3"] = timed("topk:3", bucket_queries)
    t = time.perf_counter()
    searcher.search(queries[0], parse_policy("flat"), 5)
    out["flat_first_query_s"] = time.perf_counter() - t  # builds and saves the IVF index above EXACT_MAX_ROWS
    out["flat"] = timed("flat", flat_queries)
    exact = ExactIndex(np.arange(count), data.columns["embeddings"])
    started = time.perf_counter()
    truth = [exact.search(queries[i], 5)[1] for i in range(recall_queries)]
    out["flat_exact_ms"] = (time.perf_counter() - started) * 1000 / recall_queries
    index = searcher._index(-1, 1)
    out["flat_index"] = type(index).__name__
    if hasattr(index, "index"):
        sweep = {}
        for nprobe in (1, 2, 4, 8, 16, 32, 64):
            index.index.nprobe = nprobe
            t = time.perf_counter()
            found = [index.search(queries[i], 5)[1] for i in range(recall_queries)]
            ms = (time.perf_counter() - t) * 1000 / recall_queries
            recall = float(np.mean([len(set(f.tolist()) & set(g.tolist())) / 5 for f, g in zip(found, truth)]))
            sweep[nprobe] = {"recall_at_5": recall, "ms": ms}
        index.index.nprobe = searcher.nprobe
        out["ivf"] = {"nlist": int(index.index.nlist), "nprobe": searcher.nprobe, "sweep": sweep,
                      "recall_at_5": sweep[searcher.nprobe]["recall_at_5"]}
    out["peak_rss_mib"] = _memory()["VmHWM"]
    return out


def incremental_publish_benchmark(folder: Path, added: int = 100) -> dict:
    """Peak memory of an incremental build adding `added` rows to the synthetic cache in `folder`: the same merge,
    `auto` choice and publish as build-cache (the new rows arrive as a pending chunk, as embedded images do)."""
    from cache.store import load_cache
    from pipeline.build import _merge
    from pipeline.gallery import GalleryEntry

    before = _memory()
    previous = load_cache(folder)
    count, dim = len(previous), previous.manifest.dim
    vectors, classes, _ = synthetic(added, seed=1)
    chunk = {name: np.asarray(previous.columns[name][:added]).copy() for name in previous.columns}
    chunk.update(paths=np.char.add("new", np.arange(added).astype(str)), embeddings=vectors, classes=classes)
    entries = [GalleryEntry(p, None) for p in previous.columns["paths"].tolist() + chunk["paths"].tolist()]
    started = time.perf_counter()
    columns, rows = _merge(previous, [chunk], entries)
    from cache.autopolicy import choose_policy
    from cache.store import write_generation

    choose_policy(columns)
    write_generation(folder, replace(previous.manifest, count=rows), columns)
    matrix_mib = count * dim * 4 / 2**20
    peak = _memory()["VmHWM"] - before["VmRSS"]
    return {"rows": count, "added": added, "seconds": time.perf_counter() - started, "matrix_mib": matrix_mib,
            "peak_rss_above_start_mib": peak, "peak_vs_matrix": peak / matrix_mib}


def _child(code: str, timeout: float = 1800) -> dict | list:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            timeout=timeout, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if result.returncode != 0:
        raise RuntimeError(f"speed: a measuring process failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def search_sizes_benchmark(sizes: list[int], workdir: Path) -> dict:
    """Each size written by one process and searched by a fresh one (clean memory figures)."""
    results = {}
    for count in sizes:
        folder = workdir / f"synthetic-{count}"
        _child(f"from pathlib import Path; from pipeline.evaluation.speed import make_synthetic_cache; "
               f"make_synthetic_cache(Path({str(folder)!r}), {count}); print('{{}}')")
        results[str(count)] = _child(f"import json; from pathlib import Path; from pipeline.evaluation.speed import "
                                     f"search_benchmark; print(json.dumps(search_benchmark(Path({str(folder)!r}))))")
        results[str(count)]["incremental_publish"] = _child(
            f"import json; from pathlib import Path; from pipeline.evaluation.speed import incremental_publish_benchmark;"
            f" print(json.dumps(incremental_publish_benchmark(Path({str(folder)!r}))))")
    return results


# ---------------------------------------------------------------- camera photos

CAMERA_SIZE = (4000, 3000)


def camera_galleries(root: Path, relpaths: list[str], folder: Path) -> tuple[Path, Path]:
    """(the photos as they are, the same photos as 12 MP camera JPEGs): two galleries of the same images and labels.

    The camera copies are upscaled and saved at quality 90, as a phone saves them; they are made here, never
    committed."""
    from PIL import Image

    small, camera = folder / "small", folder / "camera"
    for rel in relpaths:
        (small / rel).parent.mkdir(parents=True, exist_ok=True)
        (small / rel).symlink_to(root / rel)
        target = (camera / rel).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(root / rel) as image:
            image.convert("RGB").resize(CAMERA_SIZE, Image.BICUBIC).save(target, quality=90)
    return small, camera


def build_figures(gallery: Path, cache: Path, config, pipeline, engine=None) -> dict:
    """One build-cache of `gallery` into `cache`, timed: end to end, its phases and the embedding phase alone."""
    from pipeline.build import build_cache

    summary = build_cache(gallery, cache, config, progress=False, pipeline=pipeline, engine=engine)
    return {"images": summary.embedded, "seconds": summary.seconds, "images_per_s": summary.images_per_s,
            "skipped": len(summary.skipped), "phases_s": summary.phases,
            "embed_images_per_s": summary.embedded / summary.phases["embed"]}


def camera_figures(root: Path, relpaths: list[str], config, pipeline, engines: dict, folder: Path) -> dict:
    """Build images/s of camera photos against the same photos at their own size, for each engine."""
    small, camera = camera_galleries(root, relpaths, folder)
    figures = {"images": len(relpaths), "size": list(CAMERA_SIZE)}
    for name, engine in engines.items():
        built = {kind: build_figures(gallery, folder / f"cache-{name}-{kind}", config, pipeline, engine)
                 for kind, gallery in (("small", small), ("camera", camera))}
        figures[name] = dict(built, camera_vs_small=built["camera"]["images_per_s"] / built["small"]["images_per_s"])
    return figures


# ---------------------------------------------------------------- everything

def run_speed(gallery: str | Path, config, queries: int = 50, naive_images: int = 200, cold_runs: int = 3,
              reference_queries: int = 5, search_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000),
              forward_seconds: float = 4.0, workdir: str | Path | None = None, echo=None, engine: str = "local",
              ray_address: str | None = None, camera_images: int = 100) -> dict:
    """All the figures for one configuration; `echo` gets a line per finished step."""
    from pipeline.datasets import resolve_data
    from pipeline.engines import create_engine
    from pipeline.gallery import scan_gallery
    from pipeline.images import load_image
    from pipeline.pipeline import build_pipeline

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
    engines = {"local": None}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cache = Path(tmp) / "cache"
        report["build"] = build_figures(root, cache, config, pipeline)
        echo(f"build-cache: {report['build']['images_per_s']:.1f} images/s")
        if engine != "local":
            engines[engine] = create_engine(engine, config, ray_address, pipeline)
            engines[engine].connect()  # Ray starts (or joins its cluster) before the clock; its actors within it
            report["engine_build"] = dict(build_figures(root, Path(tmp) / f"cache-{engine}", config, pipeline,
                                                        engines[engine]), engine=engine)
            report["engine_vs_local"] = report["engine_build"]["images_per_s"] / report["build"]["images_per_s"]
            echo(f"build-cache --engine {engine}: {report['engine_build']['images_per_s']:.1f} images/s")
        step = max(1, len(entries) // naive_images) if naive_images else 1
        sample = [e.relpath for e in entries[::step]][:naive_images]
        report["naive"] = {"images_per_s": 0.0}
        if sample:
            report["naive"] = _child(
                f"import json; from pathlib import Path; from pipeline.evaluation.speed import naive_build; print(json.dumps("
                f"naive_build({config.to_dict()!r}, Path({str(root)!r}), {sample!r})))")
        echo(f"naive build: {report['naive']['images_per_s']:.1f} images/s")
        naive_run = naive_embedder(pipeline)  # eager fp32 copies: the agreement reference and the reference query
        if sample:
            report["agreement"] = agreement(pipeline, naive_run, root, sample[:64])
            echo(f"agreement with eager fp32: cosine min {report['agreement']['cosine_min']:.5f}")
        images = [root / e.relpath for e in entries[len(entries) // 2::max(1, len(entries) // (queries + 1))]]
        report["query"] = query_latency(cache, images, queries, cold_runs, reference_queries, naive_run,
                                        config.device, config.runtime)
        echo(f"query: warm p50 {report['query']['warm_ms_p50']:.1f} ms, cold {report['query']['cold_s']:.2f} s")
        report["search"] = search_sizes_benchmark(list(search_sizes), Path(tmp)) if search_sizes else {}
        if camera_images:
            step = max(1, len(entries) // camera_images)
            report["camera"] = camera_figures(root, [e.relpath for e in entries[::step]][:camera_images], config,
                                              pipeline, engines, Path(tmp) / "camera")
            echo("camera photos: " + ", ".join(f"{name} {figures['camera_vs_small']:.2f} x small photos"
                                               for name, figures in report["camera"].items() if name in engines))
    build, naive, query = report["build"], report["naive"], report["query"]
    report.update(
        forward_images_per_s=forward["images_per_s"], build_images_per_s=build["images_per_s"],
        naive_images_per_s=naive["images_per_s"],
        build_vs_forward=build["images_per_s"] / forward["images_per_s"],
        build_vs_naive=build["images_per_s"] / naive["images_per_s"],
        query_warm_ms_p50=query["warm_ms_p50"], query_warm_ms_p95=query["warm_ms_p95"], query_cold_s=query["cold_s"],
        query_warm_vs_forward=query["warm_ms_p50"] / forward["batch1_ms_sum"],
    )
    return report


def format_report(report: dict, command: str) -> str:
    """The figures as Markdown: the command, the versions and threads, then one table per part."""
    env = report["environment"]
    lines = [f"`{command}`", "",
             f"python {env['python']}, torch {env['torch']}, timm {env['timm']}, faiss {env['faiss']}, "
             f"numpy {env['numpy']}, Pillow {env['pillow']}; torch threads {env['torch_threads']}, "
             f"{env['cpu_count']} CPUs, load average at start {env['load_average']}; {env['platform']}",
             f"gallery {report['gallery']} ({report['images']} images); device {report['config']['device']}, "
             f"batch {report['config']['batch_size']}, workers {report['config']['workers']}; "
             f"models loaded in {report['model_load_s']:.1f} s", "",
             "| measure | value |", "|---|---|"]
    for name, model in report["forward"]["models"].items():
        lines.append(f"| forward-only {name} (input {'x'.join(map(str, model['input']))}, {model['runs_as']}) | "
                     f"{model['images_per_s']:.1f} images/s; batch of 1: {model['batch1_ms_p50']:.1f} ms |")
    if "agreement" in report:
        a = report["agreement"]
        top1 = f", same top-1 class {a['top1_agreement']:.3f}" if a["top1_agreement"] is not None else ""
        lines.append(f"| outputs vs eager fp32 ({a['images']} gallery images) | embedding cosine min {a['cosine_min']:.5f}, "
                     f"mean {a['cosine_mean']:.6f}{top1} |")
    q = report["query"]
    lines += [
        f"| forward-only ceiling (all models) | {report['forward_images_per_s']:.1f} images/s |",
        f"| build-cache end to end ({report['build']['images']} images, {report['build']['seconds']:.1f} s) | "
        f"{report['build_images_per_s']:.1f} images/s = {report['build_vs_forward']:.2f} x forward-only |",
        f"| build-cache phases (embed = decode + models + chunk writes; publish = scan, merge, write) | "
        f"{', '.join(f'{k} {v:.1f} s' for k, v in report['build']['phases_s'].items())}; embedding alone "
        f"{report['build']['embed_images_per_s']:.1f} images/s |",
        f"| naive build ({report['naive'].get('images', 0)} images, one at a time) | "
        f"{report['naive_images_per_s']:.1f} images/s; build-cache is {report['build_vs_naive']:.2f} x faster |",
        f"| query warm ({q['queries']} queries, buckets {q['buckets']}) | p50 {q['warm_ms_p50']:.1f} ms, "
        f"p95 {q['warm_ms_p95']:.1f} ms = {report['query_warm_vs_forward']:.2f} x the summed batch-1 forwards "
        f"({report['forward']['batch1_ms_sum']:.1f} ms) |",
        f"| query cold (new `cli.py query` process, median of {q['cold_runs']}) | {q['cold_s']:.2f} s |",
    ]
    if "engine_build" in report:
        e = report["engine_build"]
        lines.append(f"| build-cache --engine {e['engine']} ({e['images']} images, {e['seconds']:.1f} s) | "
                     f"{e['images_per_s']:.1f} images/s = {report['engine_vs_local']:.2f} x the local engine |")
    for name, figures in report.get("camera", {}).items():
        if isinstance(figures, dict) and "camera" in figures:
            lines.append(f"| camera photos, engine {name} ({report['camera']['images']} photos at "
                         f"{'x'.join(map(str, report['camera']['size']))} vs the same photos as they are) | "
                         f"{figures['camera']['images_per_s']:.1f} vs {figures['small']['images_per_s']:.1f} images/s "
                         f"= {figures['camera_vs_small']:.2f} x |")
    if "reference_s_mean" in q:
        lines.append(f"| reference query (embed the predicted class's {q['reference_bucket_images_mean']:.0f} "
                     f"gallery images at query time, mean of {q['reference_queries']}) | {q['reference_s_mean']:.2f} s |")
    if report["search"]:
        lines += ["", f"Search alone, synthetic unit vectors, dim {SYNTHETIC_DIM}, {SYNTHETIC_BUCKETS} buckets "
                      "(each size in a fresh process; memory = growth of resident memory after the policy's queries: "
                      "anonymous / file-backed mapped pages):", "",
                  "| items | matrix MiB | top1 ms p50 (p95) | topk:3 ms p50 (p95) | flat ms p50 (p95) | flat index | "
                  "exact flat ms | recall@5 vs exact | mem after 1 query MiB | after 200 top1 + 200 topk:3 MiB | "
                  "after flat MiB | peak RSS MiB | first flat query s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for count, s in report["search"].items():
            ivf = s.get("ivf")
            recall = f"{ivf['recall_at_5']:.3f} (nlist {ivf['nlist']}, nprobe {ivf['nprobe']})" if ivf else "exact"
            lines.append(
                f"| {int(count):,} | {s['matrix_mib']:.0f} | {s['top1']['ms_p50']:.2f} ({s['top1']['ms_p95']:.2f}) | "
                f"{s['topk:3']['ms_p50']:.2f} ({s['topk:3']['ms_p95']:.2f}) | {s['flat']['ms_p50']:.2f} "
                f"({s['flat']['ms_p95']:.2f}) | {s['flat_index']} | {s['flat_exact_ms']:.1f} | {recall} | "
                f"{s['one_query']['rss_anon_mib']:.0f} / {s['one_query']['rss_file_mib']:.0f} | "
                f"{s['topk:3']['rss_anon_mib']:.0f} / {s['topk:3']['rss_file_mib']:.0f} | "
                f"{s['flat']['rss_anon_mib']:.0f} / {s['flat']['rss_file_mib']:.0f} | {s['peak_rss_mib']:.0f} | "
                f"{s['flat_first_query_s']:.1f} |")
        lines += ["", "Incremental build adding 100 rows (merge, `auto` choice, publish; fresh process): peak resident "
                      "memory above the process's start, against one copy of the embedding matrix:", ""]
        lines += [f"- {int(count):,} rows: peak {s['incremental_publish']['peak_rss_above_start_mib']:.0f} MiB = "
                  f"{s['incremental_publish']['peak_vs_matrix']:.2f} x the {s['matrix_mib']:.0f} MiB matrix, "
                  f"{s['incremental_publish']['seconds']:.1f} s" for count, s in report["search"].items()]
        sweeps = {count: s["ivf"]["sweep"] for count, s in report["search"].items() if s.get("ivf")}
        for count, sweep in sweeps.items():
            lines.append("")
            lines.append(f"IVF at {int(count):,} items, recall@5 / ms per query by nprobe: " + ", ".join(
                f"{n}: {v['recall_at_5']:.3f} / {v['ms']:.2f}" for n, v in sweep.items()))
    return "\n".join(lines)
