"""A small end-to-end benchmark with tiny models on drawn images writes every report file."""
from __future__ import annotations

import json

from click.testing import CliRunner

from cli import cli
from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER


def test_benchmark_writes_reports_and_pictures(gallery, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(cli, [
        "benchmark", "--data", str(gallery), "--query-fraction", "0.34", "--seed", "1",
        "--classifier", f"none,{TINY_CLASSIFIER}", "--embedder", f"{TINY_EMBEDDER},clip",
        "--buckets", "flat,top1,topk:2,fused:2", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["queries"] == 6 and report["data"]["gallery"] == 12
    ok = [c for c in report["cells"] if c["status"] == "ok"]
    skipped = [c for c in report["cells"] if c["status"] == "skipped"]
    assert len(ok) == 5  # none+flat, tiny classifier x 4 policies, with the tiny embedder
    assert len(skipped) == 5 and all("clip" in c["error"] for c in skipped)  # no CLIP weights offline
    maps = [c["metrics"]["MAP@R"] for c in ok]
    assert maps == sorted(maps, reverse=True)
    flat = next(c for c in ok if c["config"]["buckets"] == "flat")
    assert flat["metrics"]["candidate_fraction"] == 1.0 and flat["metrics"]["bucket_hit_rate"] == 1.0
    assert all(0 <= c["metrics"]["P@1"] <= 1 and c["cost"]["query_ms_p50"] > 0 for c in ok)
    for name in ("report.md", "cmc.png", "confusion.png", "sheets.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(list(out.glob("*-pr_roc.png"))) == 2 and len(list(out.glob("*-tsne.png"))) == 2
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("|")]
    header = [h.strip() for h in table[0].strip("|").split("|")]
    assert len(table) == 2 + 10 and all(len(row.strip("|").split("|")) == len(header) for row in table)
    assert any(row.split("|")[3].strip() == "top1 *" for row in table[2:])


def test_caches_are_reused_across_runs(gallery, tmp_path):
    arguments = ["benchmark", "--data", str(gallery), "--classifier", TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER,
                 "--buckets", "flat", "--out", str(tmp_path / "bench"), "--device", "cpu"]
    assert CliRunner().invoke(cli, arguments).exit_code == 0
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert report["cells"][0]["cost"]["build_images_per_s"] is None  # nothing embedded the second time
