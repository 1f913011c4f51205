"""benchmark: which configuration finds the right images, and at what cost.

A grid of cells (classifier x embedder x bucket policy x crop) runs over a labelled set split into
gallery and queries. Cells sharing classifier, embedder and crop share one cache and one pass of
the query images, so nothing is computed twice; only the search differs between them.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lookalike.cache.autopolicy import fit_weights
from lookalike.cache.metrics import cmc_curve, compute_metrics
from lookalike.cache.policies import AUTO, BucketPolicy, parse_policy, resolve_auto
from lookalike.cache.search import Searcher
from lookalike.cache.store import load_cache
from lookalike.models.errors import UserError, message_of
from lookalike.models.registry import NO_CLASSIFIER
from lookalike.models.weights import WeightsUnavailable
from lookalike.pipeline.build import ProgressBar, build_cache
from lookalike.pipeline.config import PipelineConfig
from lookalike.pipeline.datasets import LabelledSet, load_labelled, split_queries
from lookalike.pipeline.engines import create_engine
from lookalike.pipeline.evaluation import reports
from lookalike.pipeline.evaluation.environment import environment
from lookalike.pipeline.items import Item
from lookalike.pipeline.pipeline import build_pipeline, fingerprint

CMC_DEPTH = 20


@dataclass(frozen=True)
class Cell:
    classifier: str
    embedder: str
    buckets: str
    crop: str  # 'off' | 'on'

    @property
    def group(self) -> tuple[str, str, str]:
        return self.classifier, self.embedder, self.crop

    @property
    def name(self) -> str:
        return f"{self.classifier}/{self.embedder}/{self.buckets}/crop-{self.crop}"


def make_grid(classifiers: list[str], embedders: list[str], buckets: list[str], crops: list[str]) -> list[Cell]:
    """Every combination; without a classifier only flat search makes sense."""
    for crop in crops:
        if crop not in ("off", "on"):
            raise UserError(f"--crop {crop}: use off, on or off,on")
    for policy in buckets:
        if policy != AUTO:
            parse_policy(policy)
    return [Cell(c, e, b, crop) for c, e, b, crop in itertools.product(classifiers, embedders, buckets, crops)
            if c != NO_CLASSIFIER or b == "flat"]  # `auto` needs a classifier too: it may choose buckets


def read_grid_file(path: str | Path) -> dict[str, list[str]]:
    """A YAML or JSON mapping of classifier/embedder/buckets/crop to lists."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise UserError(f"{path}: a grid file maps classifier/embedder/buckets/crop to lists")
    def text(value) -> str:  # YAML reads off/on as booleans
        return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)

    return {key: [text(v) for v in (value if isinstance(value, list) else [value])] for key, value in data.items()}


def link_tree(data: LabelledSet, folder: Path) -> Path:
    """A folder-per-label view of `data` made of symlinks (the dataset itself is never written)."""
    for i, (path, label) in enumerate(zip(data.paths, data.labels)):
        target = folder / label / f"{i:06d}_{Path(path).name}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to((data.root / path).resolve())
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass
class GroupRun:
    """What one (classifier, embedder, crop) group computed: the cache and the embedded queries."""

    searcher: Searcher
    items: list[Item]
    query_labels: np.ndarray
    cost: dict


def run_group(cell: Cell, gallery_dir: Path, queries: LabelledSet, out: Path, base: PipelineConfig,
              latency_samples: int, engine: str = "local", ray_address: str | None = None,
              index: str = "auto", exact_max_rows: int | None = None) -> GroupRun:
    config = replace(base, classifier=cell.classifier, embedder=cell.embedder, crop=cell.crop == "on")
    pipeline = build_pipeline(config)
    # Keyed by the fingerprint (a changed model, weight file or preprocessing gets a cache of its own) and the index.
    key = hashlib.sha1(json.dumps(fingerprint(pipeline.describe(), "classifier"), sort_keys=True).encode()).hexdigest()[:10]
    variant = "".join([f"-{index.replace(':', '-')}" if index != "auto" else "",
                       f"-exact{exact_max_rows}" if exact_max_rows else ""])
    cache_dir = out / "caches" / f"{key}{variant}"
    summary = build_cache(gallery_dir, cache_dir, config, pipeline=pipeline, progress=ProgressBar(),
                          engine=create_engine(engine, config, ray_address, pipeline), index=index,
                          exact_max_rows=exact_max_rows)
    data = load_cache(cache_dir)
    paths = [str(queries.root / p) for p in queries.paths]
    started = time.perf_counter()
    items = list(tqdm(pipeline.run(paths), total=len(paths), desc="queries", unit="img", leave=False))
    batch_seconds = time.perf_counter() - started
    failed = [item for item in items if item.error]
    if failed:
        raise UserError(f"{len(failed)} query images unreadable, e.g. {failed[0].path}: {failed[0].error}")
    single = []
    for path in paths[:latency_samples]:  # one image at a time, as a user's query runs
        started = time.perf_counter()
        list(pipeline.run([path]))
        single.append((time.perf_counter() - started) * 1000)
    cost = {"build_images_per_s": summary.images_per_s or None, "query_images_per_s": len(paths) / batch_seconds,
            "embed_ms_p50": float(np.percentile(single, 50)), "embed_ms_p95": float(np.percentile(single, 95)),
            "cache_bytes": folder_bytes(cache_dir), "auto_validated_on": summary.auto_path,
            "choose_policy_s": summary.phases.get("choose_policy"), "cache_kept": summary.unchanged}
    return GroupRun(Searcher(data), items, np.array(queries.labels), cost)


def evaluate_policy(run: GroupRun, policy: BucketPolicy) -> tuple[dict, np.ndarray, np.ndarray, list]:
    """Metrics of one policy: every query ranks all its candidates (the rest count as not retrieved); on the
    large-gallery path (a gallery index, or more rows than the cache's exact_max_rows) to the depth MAP@R needs,
    the largest R, as a search there takes a pool of an index's candidates for the results asked."""
    columns = run.searcher.data.columns
    gallery_labels = np.asarray(columns["labels"])
    n_gallery = len(gallery_labels)
    n_relevant = np.array([(gallery_labels == label).sum() for label in run.query_labels])
    large = run.searcher.gallery_index is not None or n_gallery > run.searcher.exact_max_rows
    depth = max(CMC_DEPTH, int(n_relevant.max(initial=1))) if large else n_gallery
    relevance = np.zeros((len(run.items), n_gallery), dtype=bool)
    candidates, search_ms, top_rows, agreement = [], [], [], []
    for i, item in enumerate(run.items):
        started = time.perf_counter()
        hits = run.searcher.search(item.embedding, policy, depth, item.classes, item.probs)
        search_ms.append((time.perf_counter() - started) * 1000)
        relevance[i, :len(hits.rows)] = gallery_labels[hits.rows] == run.query_labels[i]
        candidates.append(hits.candidates)
        top_rows.append(hits.rows[:5])
        if item.classes is not None:
            same = gallery_labels == run.query_labels[i]
            agreement.append(np.mean(columns["classes"][same, 0] == item.classes[0]) if same.any() else np.nan)
    metrics = compute_metrics(relevance, n_relevant, n_gallery)
    metrics["bucket_hit_rate"] = float(np.mean(relevance.any(axis=1)[n_relevant > 0]))
    metrics["candidate_fraction"] = float(np.mean(candidates) / n_gallery)
    metrics["classifier_agreement"] = float(np.nanmean(agreement)) if agreement else None
    metrics["search_ms_p50"] = float(np.percentile(search_ms, 50))
    return metrics, cmc_curve(relevance, n_relevant, CMC_DEPTH), relevance, top_rows


def run_benchmark(cells: list[Cell], out: str | Path, data: str | None = None, query_fraction: float = 0.2,
                  seed: int = 0, gallery: str | None = None, queries: str | None = None,
                  gallery_labels: str | None = None, query_labels: str | None = None, device: str = "auto",
                  latency_samples: int = 20, sheets: int = 6, engine: str = "local",
                  ray_address: str | None = None, index: str = "auto", exact_max_rows: int | None = None) -> dict:
    """Run every cell, write report.json, report.md and the pictures into `out`; return the report. `index` is
    build-cache's gallery index for every cache (ivf or ivfpq forces the approximate search path on small sets), and
    `exact_max_rows` where its large-gallery path starts (lower forces it: pooled validation, approximate DBA)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gallery_set, query_set = _labelled_sets(data, query_fraction, seed, gallery, queries, gallery_labels, query_labels)
    gallery_dir = link_tree(gallery_set, out / "gallery")
    base = PipelineConfig(device=device)
    report = {"data": {"source": data or {"gallery": gallery, "queries": queries}, "gallery": len(gallery_set),
                       "queries": len(query_set), "labels": len(set(gallery_set.labels)),
                       "query_fraction": query_fraction if data else None, "seed": seed},
              "environment": environment(device), "cells": []}
    curves, extras = {}, {}
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.group, []).append(cell)
    bar = tqdm(total=len(cells), desc="cells", unit="cell")
    for group_cells in groups.values():
        try:
            run = run_group(group_cells[0], gallery_dir, query_set, out, base, latency_samples, engine, ray_address,
                            index, exact_max_rows)
        except Exception as err:  # a failing group is recorded and the run goes on
            status = "skipped" if isinstance(err, (WeightsUnavailable, FileNotFoundError)) else "failed"
            reason = message_of(err)
            detail = None if status == "skipped" else traceback.format_exc(limit=3)
            for cell in group_cells:
                report["cells"].append({"config": asdict(cell), "status": status, "error": reason, "trace": detail})
                bar.update()
            continue
        reports.group_pictures(run, group_cells[0], out)
        # Fused cells without @W get their weight fitted on the gallery (without labels: the cache's weight).
        policies = [parse_policy(resolve_auto(cell.buckets, run.searcher.data.manifest.default_policy)) for cell in group_cells]
        fitted = fit_weights(run.searcher.data.columns,
                             [p for p in dict.fromkeys(policies) if p.kind == "fused" and p.weight is None], seed)
        for cell, policy in zip(group_cells, policies):
            try:
                policy = fitted.get(policy, policy)
                metrics, curves[cell.name], relevance, top_rows = evaluate_policy(run, policy)
                cost = dict(run.cost, query_ms_p50=run.cost["embed_ms_p50"] + metrics.pop("search_ms_p50"))
                report["cells"].append({"config": asdict(cell), "status": "ok", "policy": str(policy),
                                        "metrics": metrics, "cost": cost, "cmc": curves[cell.name].tolist()})
                extras[cell.name] = (run, top_rows)
            except Exception as err:
                report["cells"].append({"config": asdict(cell), "status": "failed",
                                        "error": message_of(err), "trace": traceback.format_exc(limit=3)})
            bar.update()
    bar.close()
    report["cells"].sort(key=lambda c: -(c.get("metrics") or {}).get("MAP@R", -1.0))
    _write_outputs(report, curves, extras, out, sheets, seed)
    return report


def _labelled_sets(data: str | None, query_fraction: float, seed: int, gallery: str | None, queries: str | None,
                   gallery_labels: str | None, query_labels: str | None) -> tuple:
    """(gallery set, query set): a seeded split of `data`, or the two sets given."""
    if data:
        return split_queries(load_labelled(data), query_fraction, seed)
    if gallery and queries:
        return load_labelled(gallery, gallery_labels), load_labelled(queries, query_labels)
    raise UserError("give --data DIR|ZIP, or both --gallery and --queries")


def _write_outputs(report: dict, curves: dict, extras: dict, out: Path, sheets: int, seed: int) -> None:
    """report.json, report.md, the CMC chart, and the best cell's confusion matrix and result sheets."""
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    reports.write_markdown(report, out / "report.md")
    reports.cmc_chart(curves, out / "cmc.png")
    best = next((c for c in report["cells"] if c["status"] == "ok"), None)
    if best:
        run, top_rows = extras[Cell(**best["config"]).name]
        reports.confusion_matrix(run, top_rows, out / "confusion.png")
        reports.result_sheets(run, top_rows, sheets, seed, out / "sheets.png")
