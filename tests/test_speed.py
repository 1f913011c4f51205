"""The speed benchmark and the search paths it measures: behaviour, never timings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lookalike.cache import search
from lookalike.cache import mapped
from lookalike.cache.policies import parse_policy
from lookalike.cache.search import WHOLE_GALLERY, ExactIndex, IVFIndex, Searcher
from lookalike.cache.store import CacheData, load_cache
from lookalike.pipeline.evaluation.speed import make_synthetic_cache, synthetic
from lookalike.pipeline.evaluation.speed.report import format_report

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("forward_images_per_s", "build_images_per_s", "naive_images_per_s", "build_vs_forward", "build_vs_naive",
            "query_warm_ms_p50", "query_cold_s")


def synthetic_data(tmp_path, count: int) -> CacheData:
    vectors, classes, _ = synthetic(count)
    columns = {"embeddings": vectors, "classes": classes, "paths": np.arange(count).astype(str)}
    return CacheData.in_memory(columns, tmp_path)


def recall_at_5(searcher: Searcher, truth: Searcher, queries: np.ndarray) -> float:
    flat = parse_policy("flat")
    found = [set(searcher.search(q, flat, 5).rows.tolist()) & set(truth.search(q, flat, 5).rows.tolist())
             for q in queries]
    return float(np.mean([len(f) / 5 for f in found]))


@pytest.mark.slow
@pytest.mark.parametrize("runtime, runs_as", [("torch", "torch float32"), ("onnx", "onnxruntime")])
def test_speed_json_has_every_figure(gallery, tiny_config, runtime, runs_as):
    from lookalike.cli import cli

    args = ["speed", "--gallery", str(gallery), "--classifier", tiny_config.classifier, "--embedder",
            tiny_config.embedder, "--device", "cpu", "--batch-size", "4", "--queries", "3", "--naive-images", "4",
            "--cold-runs", "1", "--search-sizes", "2000", "--forward-seconds", "0.3", "--json", "--runtime", runtime,
            "--camera-images", "3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in REQUIRED:
        assert report[key] > 0, key
    assert report["build"]["images"] == 18 and report["naive"]["images"] == 4
    assert {model["runs_as"] for model in report["forward"]["models"].values()} == {runs_as}
    # the runtime in use gives eager fp32's embeddings (top-1 of near-uniform random logits may flip:
    # tests/test_real.py checks it with real weights)
    assert report["agreement"]["cosine_min"] >= 0.999
    searched = report["search"]["2000"]
    assert {"top1", "topk:3", "flat"} <= set(searched) and searched["flat_index"] == "ExactIndex"
    camera = report["camera"]
    assert camera["images"] == 3 and camera["local"]["camera"]["images"] == camera["local"]["small"]["images"] == 3
    # the CPU budget names the limit: the forward's and the decoding's core time, and the rate they allow
    budget = report["cpu_budget"]
    assert budget["forward_core_ms"] > 0 and budget["preprocess_core_ms"] > 0
    assert 0 < budget["embed_bound_vs_forward"] < 1
    decoding = camera["cpu_budget"]["preprocess_core_ms"]
    assert decoding["camera"] > decoding["small"] and 0 < camera["cpu_budget"]["camera_vs_small_bound"] < 1
    assert "CPU budget" in format_report(report, "speed")


def test_exact_scan_in_slices_matches_brute_force(monkeypatch):
    monkeypatch.setattr(search, "SCAN_CHUNK_ROWS", 300)
    vectors, _, sample = synthetic(2000)
    queries, _ = sample(10)
    index = ExactIndex(np.arange(2000), vectors)
    for query in queries:
        scores, positions = index.search(query, 5)
        assert positions.tolist() == np.argsort(-(vectors @ query), kind="stable")[:5].tolist()
        assert np.allclose(scores, vectors[positions] @ query, atol=1e-5)


def test_ivf_recall_at_5_against_exact(tmp_path):
    data = synthetic_data(tmp_path, 20_000)
    approximate = Searcher(data, exact_max_rows=5_000)
    exact = Searcher(data, exact_max_rows=10**9)
    queries, _ = synthetic(0)[2](100)
    assert recall_at_5(approximate, exact, queries) >= 0.98
    assert isinstance(approximate.index(WHOLE_GALLERY, 1), IVFIndex) and isinstance(exact.index(WHOLE_GALLERY, 1), ExactIndex)


def test_ivf_index_is_saved_beside_the_generation_and_mapped_back(tmp_path):
    import faiss.contrib.torch_utils  # noqa: F401  (training imports it; it patches faiss.knn for torch tensors)

    make_synthetic_cache(tmp_path / "cache", 6_000)
    queries, _ = synthetic(0)[2](5)
    first = Searcher(load_cache(tmp_path / "cache"), exact_max_rows=1_000)
    hits = [first.search(q, parse_policy("flat"), 5).rows.tolist() for q in queries]
    saved = list((tmp_path / "cache").glob("gen-*/ivf-flat.faiss"))
    assert len(saved) == 1 and first.index(WHOLE_GALLERY, 1).saved
    second = Searcher(load_cache(tmp_path / "cache"), exact_max_rows=1_000)
    assert [second.search(q, parse_policy("flat"), 5).rows.tolist() for q in queries] == hits
    assert second.index(WHOLE_GALLERY, 1).saved


class RecordingArray(np.ndarray):
    """An embedding matrix that remembers which rows were read."""

    touched: list

    def __getitem__(self, key):
        self.touched.append(key)
        return np.asarray(self).__getitem__(key)


def test_bucket_search_reads_only_the_bucket_rows(tmp_path):
    data = synthetic_data(tmp_path, 5_000)
    recording = data.columns["embeddings"].view(RecordingArray)
    recording.touched = []
    data.columns["embeddings"] = recording
    searcher = Searcher(data)
    queries, classes = synthetic(0)[2](3)
    hits = searcher.search(queries[0], parse_policy("top1"), 5, classes[0], np.array([0.8, 0.15, 0.05]))
    bucket = searcher.table(1).rows_of(int(classes[0][0]))
    read = np.concatenate([np.arange(len(data))[key] if isinstance(key, slice) else np.atleast_1d(np.asarray(key))
                           for key in recording.touched])
    assert sorted(read.tolist()) == sorted(bucket.tolist()) and len(bucket) < len(data) / 100
    assert set(hits.rows.tolist()) <= set(bucket.tolist())


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return result.stdout.strip().splitlines()[-1]


def test_query_without_crop_never_imports_ultralytics(gallery, tiny_config, tmp_path):
    from lookalike.pipeline.build import build_cache

    build_cache(gallery, tmp_path / "cache", tiny_config)
    image = next(gallery.rglob("*.png"))
    code = ("import sys; from lookalike import cli\n"
            f"sys.argv = ['cli.py', 'query', {str(image)!r}, '--cache', {str(tmp_path / 'cache')!r}, '--json']\n"
            "try:\n    cli.cli()\nexcept SystemExit as end:\n    assert end.code in (0, None), end.code\n"
            "print('ultralytics' in sys.modules, 'torch' in sys.modules)")
    assert run_python(code) == "False False"  # nor torch: the cache's checked ONNX exports answer




def mapped_mib(filename: str) -> float:
    """Resident MiB of this process's mappings of `filename` (from /proc/self/smaps)."""
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            current = fields[5] if len(fields) >= 6 else None
        elif fields[0] == "Rss:" and current == filename:
            total += int(fields[1])
    return total / 1024


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc")
def test_a_query_process_does_not_keep_the_matrix_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(mapped, "RELEASE_ABOVE_BYTES", 0)  # as for a matrix of gigabytes
    make_synthetic_cache(tmp_path / "cache", 20_000)
    data = load_cache(tmp_path / "cache")
    searcher = Searcher(data)
    queries, classes = synthetic(0)[2](20)
    import faiss.contrib.torch_utils  # noqa: F401  (as after training code ran: memmaps must still work)

    for policy in ("top1", "topk:3", "flat", "fused"):
        for query, top in zip(queries, classes):
            searcher.search(query, parse_policy(policy), 5, top, np.array([0.8, 0.15, 0.05], np.float32))
        assert mapped_mib(str(data.columns["embeddings"].filename)) < 1, policy  # matrix: 39 MiB


def test_an_unsaved_ivf_index_is_kept_while_buckets_come_and_go(tmp_path, monkeypatch):
    """An in-memory cache's IVF index (auto's validation above exact_max_rows) is not evicted by bucket scans: made
    again for every flat search after one, it cost minutes at 10^6 rows."""
    data = synthetic_data(tmp_path, 5_000)
    monkeypatch.setattr(search, "CACHED_BYTES", 1)  # every exact bucket is over the budget
    searcher = Searcher(data, exact_max_rows=1_000)
    queries, classes = synthetic(0)[2](5)
    flat = searcher.index(WHOLE_GALLERY, 1)
    assert isinstance(flat, IVFIndex) and not flat.saved
    for query, own in zip(queries, classes):
        searcher.search(query, parse_policy("top1"), 5, own, np.array([0.8, 0.15, 0.05], np.float32))
        assert searcher.index(WHOLE_GALLERY, 1) is flat
