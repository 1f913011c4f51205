"""The public Python API, used as a user would: only `import lookalike` and what it exports."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import lookalike
from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER

ROOT = Path(__file__).resolve().parents[1]
TINY = {"classifier": TINY_CLASSIFIER, "embedder": TINY_EMBEDDER, "device": "cpu", "batch_size": 4}


@pytest.fixture
def index(gallery, tmp_path) -> lookalike.Index:
    calls = []
    report = lookalike.build(gallery, tmp_path / "cache", progress=lambda done, total: calls.append((done, total)),
                             **TINY)
    assert isinstance(report, lookalike.BuildReport) and report.images == 18 and report.embedded == 18
    assert calls[-1] == (18, 18) and [done for done, _ in calls] == sorted(done for done, _ in calls)
    return lookalike.open(tmp_path / "cache")


def test_every_kind_of_image_gets_the_same_answer(index, gallery):
    """A path, the file's bytes, a PIL image and an HxWx3 uint8 array of one photo are one query."""
    photo = gallery / "blue_squares" / "2.png"
    pixels = Image.open(photo).convert("RGB")
    answers = [index.query(image, k=4, buckets="flat")
               for image in (photo, str(photo), photo.read_bytes(), pixels, np.asarray(pixels))]
    rows = {tuple(r.row for r in answer.results) for answer in answers}
    assert len(rows) == 1
    for answer in answers[1:]:
        assert [r.score for r in answer.results] == pytest.approx([r.score for r in answers[0].results], abs=1e-6)
    first = answers[0].results[0]
    assert first.path == "blue_squares/2.png" and first.label == "blue_squares" and first.score > 0.999
    assert not Path(first.path).is_absolute() and (index.gallery_root / first.path).is_file()
    assert dataclasses.is_dataclass(first) and dataclasses.is_dataclass(answers[0])
    assert answers[0].policy == "flat" and answers[0].candidates == 18 and len(answers[0].predicted) == 5


def test_several_images_give_a_list_and_a_bad_one_does_not_stop_the_rest(index, gallery, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    photo = gallery / "red_circles" / "0.png"
    answers = index.query([photo, broken, photo.read_bytes()], k=3)
    assert [a.error is None for a in answers] == [True, False, True]
    assert str(broken) in answers[1].query and answers[1].results == []
    assert [r.row for r in answers[0].results] == [r.row for r in answers[2].results]
    with pytest.raises(lookalike.UserError, match=re.escape(str(broken))):
        index.query(broken)
    with pytest.raises(lookalike.UserError, match="HxWx3 uint8"):
        index.query(np.zeros((8, 8), np.float32))


def test_to_json_is_what_query_json_prints(index, gallery):
    from lookalike.cli import cli

    photo = str(gallery / "green_triangles" / "4.png")
    result = CliRunner().invoke(cli, ["query", photo, "--cache", str(index.data.root), "--json", "-k", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [json.loads(json.dumps(index.query(photo, k=3).to_json()))]


def test_rows_duplicates_info_and_length(index, gallery):
    answer = index.more_like(7, k=3, buckets="flat")
    assert answer.results[0].row == 7 and answer.results[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(index) == 18
    info = index.info
    assert info["gallery_images"] == 18 and info["gallery_root"] == str(gallery.resolve())
    assert info["pipeline"]["embedder"] == TINY_EMBEDDER and info["policy"] != "auto"
    report = index.duplicates(threshold=0.5)
    assert isinstance(report, lookalike.DuplicateReport) and "groups" in report.to_dict()


def test_text_queries_need_a_clip_cache(index):
    with pytest.raises(lookalike.UserError, match="CLIP"):
        index.query_text("a red circle")


def test_bad_options_and_caches_are_user_errors(gallery, tmp_path):
    with pytest.raises(lookalike.UserError, match="unknown option colour"):
        lookalike.build(gallery, tmp_path / "cache", colour="red", **TINY)
    with pytest.raises(lookalike.UserError, match="not a lookalike cache|no cache|CURRENT"):
        lookalike.open(tmp_path / "nowhere")


def test_all_lists_the_public_api_and_import_loads_no_model_library():
    assert set(lookalike.__all__) >= {"build", "open", "Index", "Answer", "Result", "Prediction", "BuildReport",
                                      "DuplicateReport", "UserError", "__version__"}
    assert all(hasattr(lookalike, name) for name in lookalike.__all__)
    code = ("import sys, lookalike; print(lookalike.__version__, "
            "[m for m in ('torch', 'timm', 'open_clip', 'faiss', 'ultralytics') if m in sys.modules])")
    import subprocess

    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert output.stdout.split() == [lookalike.__version__, "[]"]


def readme_api_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.real
def test_the_readme_api_example_runs_as_written(real_weights, assets, tmp_path, monkeypatch, capsys):
    """On a small copy of the demo layout (.demo/gallery, .demo/queries) made from caltech101-22."""
    from lookalike.pipeline.datasets import load_labelled

    data = load_labelled(assets / "data" / "caltech101-22.zip")
    for label in ("pizza", "airplanes", "llama"):
        paths = [p for p, lab in zip(data.paths, data.labels) if lab == label]
        (tmp_path / ".demo" / "queries").mkdir(parents=True, exist_ok=True)
        (tmp_path / ".demo" / "queries" / f"{label}.jpg").write_bytes((data.root / paths[0]).read_bytes())
        for path in paths[1:9]:
            target = tmp_path / ".demo" / "gallery" / label / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((data.root / path).read_bytes())
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_api_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    results = [line.split() for line in printed if re.match(r"\d+ \d\.\d{3} ", line)]
    assert len(results) == 5 and results[0][2] == "pizza"  # rank, cosine, label, path: a pizza comes first
