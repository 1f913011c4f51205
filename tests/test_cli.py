"""The command line: readable and JSON output, one-line errors with non-zero exits, a fast --help."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lookalike.cli import cli
from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def built(gallery, tmp_path) -> Path:
    out = tmp_path / "cache"
    result = CliRunner().invoke(cli, ["build-cache", "--gallery", str(gallery), "--out", str(out), "--classifier",
                                      TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "18 images in cache" in result.output and "images/s" in result.output
    return out


def test_query_json_lists_ranked_results(built, gallery, tmp_path):
    query = str(gallery / "green_triangles" / "3.png")
    sheet = tmp_path / "sheet.png"
    result = CliRunner().invoke(cli, ["query", query, "--cache", str(built), "--json", "--buckets", "flat",
                                      "--sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    [answer] = json.loads(result.stdout)
    assert answer["query"] == query and len(answer["predicted"]) == 5
    assert [r["rank"] for r in answer["results"]] == [1, 2, 3, 4, 5]
    assert answer["results"][0]["path"] == str(gallery / "green_triangles" / "3.png")
    assert set(answer["results"][0]) == {"rank", "score", "rank_score", "row", "path", "label", "bucket"}
    assert answer["results"][0]["rank_score"] is None  # flat search ranks by the cosine itself
    assert sheet.stat().st_size > 0


def test_default_policy_is_the_one_the_cache_chose(built, gallery):
    from lookalike.cache.store import load_cache

    result = CliRunner().invoke(cli, ["query", str(gallery / "red_circles" / "0.png"), "--cache", str(built), "--json"])
    assert result.exit_code == 0, result.output
    chosen = load_cache(built).manifest.default_policy
    assert json.loads(result.stdout)[0]["buckets"] == chosen != "auto"


def test_query_table_is_readable(built, gallery):
    result = CliRunner().invoke(cli, ["query", str(gallery / "red_circles" / "0.png"), "--cache", str(built), "-k", "2"])
    assert result.exit_code == 0, result.output
    assert "predicted:" in result.output and "red_circles/0.png" in result.output
    assert len([line for line in result.output.splitlines() if line.strip().startswith(("1 ", "2 "))]) == 2


@pytest.mark.parametrize("arguments, message", [
    (["--buckets", "nearest"], "unknown bucket policy 'nearest'"),
    (["--classifier", "mobilenetv2"], "built with another pipeline"),
    (["-k", "0"], "must be at least 1"),
    (["--sheet", "/nonexistent/dir/x.png"], "--sheet /nonexistent/dir/x.png: the folder /nonexistent/dir does not exist"),
])
def test_bad_options_give_one_line_errors(built, gallery, arguments, message):
    result = CliRunner().invoke(cli, ["query", str(gallery / "red_circles" / "0.png"), "--cache", str(built)] + arguments)
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unreadable_query_is_reported_and_others_still_answered(built, gallery, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    result = CliRunner().invoke(cli, ["query", str(broken), str(gallery / "red_circles" / "1.png"), "--cache",
                                      str(built), "--json"])
    assert result.exit_code == 1
    assert f"error: {broken}:" in result.stderr
    assert len(json.loads(result.stdout)) == 1


def test_missing_cache_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["query", "x.jpg", "--cache", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: not a lookalike cache (no CURRENT file); run build-cache first"


def test_unavailable_model_is_one_line(gallery, tmp_path):
    result = CliRunner().invoke(cli, ["build-cache", "--gallery", str(gallery), "--out", str(tmp_path / "c"),
                                      "--classifier", "none", "--embedder", "clip"])
    assert result.exit_code == 1
    assert "cannot load open_clip model 'clip'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_help_imports_no_heavy_library():
    code = "import sys; from lookalike import cli; cli.cli(['--help'], standalone_mode=False); " \
           "print(sorted(m for m in ('torch', 'timm', 'faiss', 'ultralytics', 'open_clip', 'ray') if m in sys.modules))"
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert output.strip().endswith("[]")


def test_fused_score_is_the_cosine_and_the_ranking_score_is_apart(built, gallery):
    query = str(gallery / "blue_squares" / "2.png")
    result = CliRunner().invoke(cli, ["query", query, "--cache", str(built), "--json", "--buckets", "fused:3@2"])
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)[0]["results"]
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)  # the query itself: cosine 1, not 1 + agreement
    assert all(-1 <= r["score"] <= 1 and r["rank_score"] >= r["score"] for r in results)
    ranked = [r["rank_score"] for r in results]
    assert ranked == sorted(ranked, reverse=True)
    table = CliRunner().invoke(cli, ["query", query, "--cache", str(built), "--buckets", "fused:3@2"])
    assert "cosine" in table.output and "ranked by" in table.output


def test_a_sheet_in_a_missing_folder_creates_no_folder(built, tmp_path):
    target = tmp_path / "typo" / "sheet.png"
    result = CliRunner().invoke(cli, ["duplicates", "--cache", str(built), "--sheet", str(target)])
    assert result.exit_code == 1 and "does not exist" in result.stderr
    assert not target.parent.exists()


def test_float16_vectors_take_half_the_disk_and_give_the_same_answers(built, gallery, tmp_path):
    from lookalike.cache.store import load_cache

    out = tmp_path / "half"
    result = CliRunner().invoke(cli, ["build-cache", "--gallery", str(gallery), "--out", str(out), "--classifier",
                                      TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER, "--device", "cpu", "--float16"])
    assert result.exit_code == 0, result.output
    half, full = load_cache(out), load_cache(built)
    assert half.columns["embeddings"].dtype == np.float16 and full.columns["embeddings"].dtype == np.float32
    assert (half.generation / "embeddings.npy").stat().st_size < 0.6 * (full.generation / "embeddings.npy").stat().st_size
    photos = [str(p) for p in sorted(gallery.glob("*/*.png"))[::4]]
    for policy in ("flat", "auto", "topk:3"):
        answers = [json.loads(CliRunner().invoke(cli, ["query", *photos, "--cache", str(cache), "--buckets", policy,
                                                       "--json", "--device", "cpu"]).stdout) for cache in (out, built)]
        for a, b in zip(*answers):
            assert [r["row"] for r in a["results"]] == [r["row"] for r in b["results"]]
            assert [r["score"] for r in a["results"]] == pytest.approx([r["score"] for r in b["results"]], abs=2e-3)


@pytest.mark.parametrize("value", ["0", "-5", "many", "1e9"])
def test_a_bad_exact_max_rows_is_one_line(gallery, tmp_path, value):
    result = CliRunner().invoke(cli, ["build-cache", "--gallery", str(gallery), "--out", str(tmp_path / "c"),
                                      "--classifier", TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER,
                                      "--exact-max-rows", value])
    assert result.exit_code == 2 and "--exact-max-rows" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c").exists()
