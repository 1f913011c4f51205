"""Milvus as the search backend, through Milvus Lite (a local file URI takes the same code path as a cluster's): the
same answers as the local faiss search under every kind of policy, an export that resumes and repeats idempotently,
query and serve through --milvus, and every bad target refused with one line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("pymilvus", reason="the milvus extra is not installed: pip install -e '.[milvus]'")

import lookalike
from lookalike.cache import milvus
from lookalike.cache.buckets import BucketTable, bucket_keys
from lookalike.cache.milvus import PROPERTY, MilvusTarget, connect, described, export
from lookalike.cache.milvus_search import MilvusSearcher, bucket_filter
from lookalike.cache.search import Searcher
from lookalike.cache.store import CacheData, load_cache
from lookalike.cli import cli
from lookalike.pipeline.build import build_cache
from lookalike.pipeline.config import PipelineConfig
from tests.conftest import SHAPES, TINY_CLASSIFIER, TINY_EMBEDDER, draw_shape

ROOT = Path(__file__).resolve().parents[1]
# Policies of every kind: flat, top-1 and union buckets, soft buckets (element terms and ARRAY_CONTAINS_ANY), the
# fused class bonus, and re-ranking (DBA made locally, expansion, k-reciprocal), and the cache's own choice.
POLICIES = ["flat", "top1", "topk:3", "auto", "top1+soft:2", "topk:2+soft:10", "fused:3@0.5", "flat@0.3+qe:3",
            "topk:3+dba:3+krecip:4/2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("milvus")
    for index, (label, (colour, shape)) in enumerate(SHAPES.items()):
        for i in range(6):
            draw_shape(root / "gallery" / label / f"{i}.png", colour, shape, seed=100 * index + i)
    config = PipelineConfig(classifier=TINY_CLASSIFIER, embedder=TINY_EMBEDDER, device="cpu", batch_size=4)
    build_cache(root / "gallery", root / "cache", config)
    return root / "cache"


@pytest.fixture(scope="module")
def target(cache) -> MilvusTarget:
    """The cache exported to a Milvus Lite file."""
    target = MilvusTarget(str(cache.parent / "rows.db"))
    report = export(load_cache(cache), target)
    assert (report.rows, report.written) == (18, 18)
    return target


def same_answers(faiss_answer, milvus_answer) -> None:
    assert [r.row for r in milvus_answer.results] == [r.row for r in faiss_answer.results]
    assert [r.score for r in milvus_answer.results] == pytest.approx([r.score for r in faiss_answer.results], abs=1e-4)
    assert milvus_answer.candidates == faiss_answer.candidates and milvus_answer.policy == faiss_answer.policy


def test_milvus_answers_as_faiss_under_every_kind_of_policy(cache, target):
    local, remote = lookalike.open(cache), lookalike.open(cache, target)
    assert type(local.session.searcher) is Searcher and isinstance(remote.session.searcher, MilvusSearcher)
    for policy in POLICIES:
        for row in range(0, 18, 2):
            same_answers(local.more_like(row, 5, policy), remote.more_like(row, 5, policy))


def test_milvus_never_reads_the_local_gallery_index(cache, target, tmp_path):
    """Milvus finds the rows: a damaged local gallery index (build-cache --index) stops a local search, in one line,
    and not a search through Milvus, which never opens it."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (load_cache(copy).generation / "index.json").write_text("{}")
    with pytest.raises(lookalike.UserError, match=r"its index: it cannot be read \(TypeError\); rebuild"):
        lookalike.open(copy).more_like(0, 5, "flat")
    same_answers(lookalike.open(cache).more_like(0, 5, "flat"), lookalike.open(copy, target).more_like(0, 5, "flat"))


def test_buckets_become_filter_expressions():
    assert bucket_filter([-1], 1, "classifier", 10) == ""
    assert bucket_filter([3, 7], 1, "classifier", 10) == "bucket in [3, 7]"
    assert bucket_filter([3], 4, "label", 10) == "bucket in [3]"
    assert bucket_filter([3, 7], 10, "classifier", 10) == "ARRAY_CONTAINS_ANY(classes, [3, 7])"
    assert bucket_filter([3, 7], 2, "classifier", 10) == ("classes[0] == 3 or classes[0] == 7 or classes[1] == 3 or "
                                                          "classes[1] == 7")


def test_each_filter_selects_the_rows_of_its_buckets(cache, target):
    """The filters against the one membership rule (cache/buckets.py), for top-1 and soft buckets of each width."""
    data, client = load_cache(cache), connect(target)
    classes = data.columns["classes"]
    for gallery_classes in (1, 2, 3, classes.shape[1]):
        table = BucketTable(bucket_keys(data.columns, "classifier", gallery_classes))
        for keys in ([int(key)] for key in np.unique(classes[:, :3])):
            expression = bucket_filter(keys, gallery_classes, "classifier", classes.shape[1])
            found = client.query(target.collection, filter=expression, output_fields=["row"], limit=100)
            assert sorted(hit["row"] for hit in found) == sorted(set(np.concatenate([table.rows_of(k) for k in keys])))


def test_the_collection_records_the_cache_it_holds(cache, target):
    client, data = connect(target), load_cache(cache)
    record, dim = described(client, target)
    assert record["fingerprint"] == data.manifest.fingerprint and record["complete"] is True
    assert (dim, record["dim"], record["metric"], record["count"]) == (data.manifest.dim, data.manifest.dim, "IP", 18)
    assert record["generation"] == data.generation.name and record["built"] == data.manifest.built
    [row] = client.query(target.collection, filter="row == 4", output_fields=["path", "label", "bucket", "classes"])
    assert row["path"] == str(data.columns["paths"][4]) and row["label"] == str(data.columns["labels"][4])
    assert row["bucket"] == int(data.columns["classes"][4, 0])
    assert list(row["classes"]) == data.columns["classes"][4].tolist()


def test_an_interrupted_export_resumes_and_a_repeated_one_writes_nothing(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(milvus, "EXPORT_BATCH_ROWS", 4)
    target, data = MilvusTarget(str(tmp_path / "resumed.db")), load_cache(cache)

    def stop_after_two_batches(done: int, total: int) -> None:
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export(data, target, progress=stop_after_two_batches)
    with pytest.raises(lookalike.UserError, match="its export did not finish; run export-milvus again to resume"):
        lookalike.open(cache, target)
    connect(target).release_collection(target.collection)  # as a new process finds it
    assert export(data, target).written == 10  # rows 8-17: the first two batches were kept
    assert export(data, target).written == 0
    same_answers(lookalike.open(cache).more_like(3, 5, "topk:3"), lookalike.open(cache, target).more_like(3, 5, "topk:3"))


def run(*arguments: str):
    return CliRunner().invoke(cli, list(arguments))


def test_export_and_query_from_the_command_line(cache, tmp_path):
    uri = str(tmp_path / "cli.db")
    exported = run("export-milvus", "--cache", str(cache), "--uri", uri, "--collection", "shapes")
    assert exported.exit_code == 0, exported.output
    assert exported.stdout.strip() == f"Milvus collection 'shapes' at {uri}: 18 rows, 18 written by this run"
    photo = str(cache.parent / "gallery" / "blue_squares" / "4.png")
    answers = []
    for extra in ([], ["--milvus", uri, "--collection", "shapes"]):
        result = run("query", photo, "--cache", str(cache), "--json", "--buckets", "topk:3", "--device", "cpu", *extra)
        assert result.exit_code == 0, result.output
        answers.append(json.loads(result.stdout))
    assert [r["row"] for r in answers[1][0]["results"]] == [r["row"] for r in answers[0][0]["results"]]


def test_serve_searches_milvus_and_a_failing_milvus_is_a_502(cache, target, monkeypatch):
    from fastapi.testclient import TestClient
    from pymilvus.exceptions import MilvusException

    from lookalike.pipeline.serve.app import create_app

    answers, apps = [], []
    for remote in (None, target):
        apps.append(create_app(cache, {"device": "cpu"}, milvus=remote))
        client = TestClient(apps[-1], base_url="http://localhost:8000")
        response = client.post("/api/query", json={"row": 5, "k": 4, "buckets": "fused:3@2"})
        assert response.status_code == 200, response.text
        answers.append([(r["row"], round(r["score"], 4)) for r in response.json()["results"]])
    assert answers[0] == answers[1]

    def gone(*args, **kwargs):
        raise MilvusException(code=2, message="the server went away")

    monkeypatch.setattr(apps[1].state.live.index.session.searcher.client, "search", gone)
    response = TestClient(apps[1], base_url="http://localhost:8000").post("/api/query", json={"row": 5})
    assert response.status_code == 502
    assert response.json() == {"error": "Milvus collection 'lookalike' at rows.db: searching failed: the server went away"}


def tampered(cache: Path, uri: str, name: str, **changes) -> None:
    """The cache exported to collection `name`, its record then changed as another cache's export would be."""
    target = MilvusTarget(uri, name)
    export(load_cache(cache), target)
    client = connect(target)
    client.alter_collection_properties(name, {PROPERTY: json.dumps(described(client, target)[0] | changes)})


def other_dimension(uri: str) -> None:
    """A collection exported from a cache of 8-d vectors."""
    columns = {"paths": np.array(["a.png"]), "labels": np.array([""]), "label_classes": np.array([-1], np.int32),
               "classes": np.array([[1]], np.int32), "embeddings": np.eye(1, 8, dtype=np.float32)}
    export(CacheData.in_memory(columns), MilvusTarget(uri, "eight"))


def test_each_bad_target_is_one_line_and_exit_1(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(milvus, "CONNECT_TIMEOUT_S", 1.0)
    uri = str(tmp_path / "bad.db")
    tampered(cache, uri, "other_pipeline", fingerprint=load_cache(cache).manifest.fingerprint | {"bucket_by": "label"})
    tampered(cache, uri, "other_generation", built="2020-01-01T00:00:00")
    other_dimension(uri)
    photo = str(cache.parent / "gallery" / "red_circles" / "1.png")
    cases = {
        ("http://127.0.0.1:9", "lookalike"): "error: cannot reach Milvus at http://127.0.0.1:9: ",
        (str(tmp_path / "absent" / "rows.db"), "lookalike"): f"error: cannot reach Milvus at {tmp_path}/absent/rows.db: ",
        (uri, "missing"): f"error: Milvus collection 'missing' at {uri}: no such collection; write it with",
        (uri, "eight"): f"error: Milvus collection 'eight' at {uri}: it holds 8-d vectors and this cache",
        (uri, "other_pipeline"): f"error: Milvus collection 'other_pipeline' at {uri}: it was exported from another "
                                 "pipeline (bucket_by: 'label' -> 'classifier'); run export-milvus with this cache",
        (uri, "other_generation"): f"error: Milvus collection 'other_generation' at {uri}: it holds 18 rows of the "
                                   "generation built 2020-01-01T00:00:00",
    }
    for (where, name), message in cases.items():
        result = run("query", photo, "--cache", str(cache), "--milvus", where, "--collection", name)
        assert result.exit_code == 1 and result.stdout == "", result.output
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message), result.stderr
        assert "Exception" not in result.stderr  # pymilvus's own message, not its error's repr
    bad_index = run("export-milvus", "--cache", str(cache), "--uri", uri, "--index", "FAST")
    assert bad_index.exit_code == 1
    assert bad_index.stderr == "error: index 'FAST': use one of FLAT, IVF_FLAT, HNSW, AUTOINDEX\n", bad_index.stderr
    refused = run("export-milvus", "--cache", str(cache), "--uri", uri, "--collection", "eight")
    assert refused.exit_code == 1
    assert refused.stderr.strip().endswith("give another --collection, or --replace to overwrite it"), refused.stderr
    replaced = run("export-milvus", "--cache", str(cache), "--uri", uri, "--collection", "eight", "--replace")
    assert replaced.exit_code == 0 and replaced.stdout.endswith("18 rows, 18 written by this run\n"), replaced.output
    renewed = run("export-milvus", "--cache", str(cache), "--uri", uri, "--collection", "other_generation")
    assert renewed.exit_code == 0 and renewed.stdout.endswith("18 written by this run\n"), renewed.output


DEMO = Path(os.environ.get("LOOKALIKE_DEMO", ROOT / ".demo"))


@pytest.mark.real
def test_the_demo_cache_answers_the_same_from_milvus_lite(real_weights, tmp_path):
    """The 22 demo photos (make demo) under flat, top1, topk:3 and the cache's auto: the same top-5 rows as faiss,
    scores within 1e-4."""
    if not (DEMO / "cache" / "CURRENT").is_file():
        pytest.skip(f"no demo cache at {DEMO} (make demo, or set LOOKALIKE_DEMO)")
    photos = sorted(str(path) for path in (DEMO / "queries").glob("*.jpg"))
    target = MilvusTarget(str(tmp_path / "demo.db"))
    export(load_cache(DEMO / "cache"), target)
    local, remote = lookalike.open(DEMO / "cache"), lookalike.open(DEMO / "cache", target)
    for policy in ("flat", "top1", "topk:3", "auto"):
        for faiss_answer, milvus_answer in zip(local.query(photos, 5, policy), remote.query(photos, 5, policy)):
            same_answers(faiss_answer, milvus_answer)
