"""A small end-to-end benchmark with tiny models on drawn images writes every report file."""
from __future__ import annotations

import json

from click.testing import CliRunner

from lookalike.cli import cli
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
    assert len(skipped) == 5 and all("clip" in c["error"] for c in skipped)  # no CLIP weights: the offline fixture hides any hub cache
    maps = [c["metrics"]["MAP@R"] for c in ok]
    assert maps == sorted(maps, reverse=True)
    flat = next(c for c in ok if c["config"]["buckets"] == "flat")
    assert flat["metrics"]["candidate_fraction"] == 1.0 and flat["metrics"]["bucket_hit_rate"] == 1.0
    # three colours of drawn shapes: every query's first result has its colour, under every policy
    assert all(c["metrics"]["P@1"] == 1.0 and c["cost"]["query_ms_p50"] > 0 for c in ok)
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


def test_an_index_choice_gets_caches_of_its_own(gallery, tmp_path):
    """--index ivf builds every cache with a gallery index, apart from the auto caches (it answers differently)."""
    arguments = ["benchmark", "--data", str(gallery), "--classifier", TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER,
                 "--buckets", "flat", "--out", str(tmp_path / "bench"), "--device", "cpu"]
    assert CliRunner().invoke(cli, arguments).exit_code == 0
    result = CliRunner().invoke(cli, [*arguments, "--index", "ivf"])
    assert result.exit_code == 0, result.output
    caches = sorted(p.name for p in (tmp_path / "bench" / "caches").iterdir())
    assert len(caches) == 2 and caches[1] == f"{caches[0]}-ivf"
    assert list((tmp_path / "bench" / "caches" / caches[1]).glob("gen-*/index.json"))
    assert not list((tmp_path / "bench" / "caches" / caches[0]).glob("gen-*/index.json"))


def test_explicit_gallery_and_queries_with_label_maps_and_a_grid_file(tmp_path):
    from tests.conftest import SHAPES, draw_shape

    gallery_labels, query_labels = {}, {}
    for index, (label, (colour, shape)) in enumerate(SHAPES.items()):
        for i in range(4):
            name = f"g{index}{i}.png"
            draw_shape(tmp_path / "gallery" / name, colour, shape, seed=10 * index + i)
            gallery_labels[name] = label
        draw_shape(tmp_path / "query_images" / f"q{index}.png", colour, shape, seed=99 + index)
        query_labels[f"q{index}.png"] = label
    (tmp_path / "train_image_info.json").write_text(json.dumps(gallery_labels))
    (tmp_path / "test_image_info.json").write_text(json.dumps(query_labels))
    (tmp_path / "grid.yaml").write_text(f"classifier: [{TINY_CLASSIFIER}]\nembedder: {TINY_EMBEDDER}\n"
                                        "buckets: [flat, auto]\ncrop: [off]\n")
    result = CliRunner().invoke(cli, [
        "benchmark", "--gallery", str(tmp_path / "gallery"), "--queries", str(tmp_path / "query_images"),
        "--gallery-labels", str(tmp_path / "train_image_info.json"),
        "--query-labels", str(tmp_path / "test_image_info.json"), "--grid", str(tmp_path / "grid.yaml"),
        "--out", str(tmp_path / "bench"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert (report["data"]["gallery"], report["data"]["queries"], report["data"]["labels"]) == (12, 3, 3)
    assert sorted(c["config"]["buckets"] for c in report["cells"]) == ["auto", "flat"]
    assert all(c["status"] == "ok" and len(c["cmc"]) == 20 for c in report["cells"])
    assert not (tmp_path / "gallery" / "cache").exists()  # nothing is written into the dataset


def test_bad_grid_values_are_refused(gallery, tmp_path):
    result = CliRunner().invoke(cli, ["benchmark", "--data", str(gallery), "--crop", "maybe", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "--crop maybe" in result.stderr


def test_exact_max_rows_forces_the_large_gallery_path_and_the_report_says_so(gallery, tmp_path):
    """--exact-max-rows below the gallery's size: a cache of its own, `auto` validated through the search path, and
    report.md names the path and what choosing cost; run again, that its cache was kept."""
    out = tmp_path / "bench"
    arguments = ["benchmark", "--data", str(gallery), "--classifier", TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER,
                 "--buckets", "flat,auto", "--out", str(out), "--device", "cpu", "--exact-max-rows", "4"]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    assert [p.name.endswith("-exact4") for p in (out / "caches").iterdir()] == [True]
    cell = json.loads((out / "report.json").read_text())["cells"][0]
    assert cell["cost"]["auto_validated_on"] == "search path, approximate k-NN graph"
    assert "validated on search path, approximate k-NN graph" in (out / "report.md").read_text()
    assert CliRunner().invoke(cli, arguments).exit_code == 0
    assert "the cache of an earlier run, unchanged: not validated again" in (out / "report.md").read_text()
