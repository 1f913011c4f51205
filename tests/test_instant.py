"""The instant query path: a cache whose models all have checked ONNX exports answers without torch, from
preprocessing that gives torchvision's tensor, and falls back to torch (one line) when an export cannot be trusted."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lookalike
from lookalike.models.onnx_session import export_dir
from lookalike.models.preprocess import ArrayTransform, describe_transform
from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER

MODEL_LIBRARIES = ("torch", "torchvision", "timm", "open_clip", "ultralytics")
# Not model libraries, and no query needs them: building, auto's validation, scikit-learn (benchmark plots).
BUILD_MODULES = ("lookalike.pipeline.build", "lookalike.cache.autopolicy", "sklearn")


def run_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command line in a fresh process, printing which model libraries (and build modules) it imported as its
    last line."""
    code = (f"import sys\nsys.argv = ['lookalike', *{list(arguments)!r}]\nfrom lookalike.cli import main\n"
            "try:\n    main()\nexcept SystemExit as end:\n    code = end.code\nelse:\n    code = 0\n"
            f"print(sorted(m for m in {MODEL_LIBRARIES + BUILD_MODULES!r} if m in sys.modules))\nsys.exit(code)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, check=False)


def imported(result: subprocess.CompletedProcess) -> list[str]:
    return json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"'))


@pytest.fixture
def auto_cache(gallery, tmp_path) -> Path:
    """A cache built with the default runtime (auto: ONNX Runtime on this CPU), classifier and embedder apart."""
    report = lookalike.build(gallery, tmp_path / "cache", classifier=TINY_CLASSIFIER, embedder=TINY_EMBEDDER,
                             device="cpu", batch_size=4)
    assert report.images == 18
    return tmp_path / "cache"


def test_a_cache_with_checked_exports_answers_without_importing_torch(auto_cache, gallery, tmp_path):
    exports = lookalike.open(auto_cache).data.manifest.exports
    assert set(exports) == {"classify", "embed"} and all(len(r["sha256"]) == 64 for r in exports.values())
    photo = str(gallery / "red_circles" / "2.png")
    flat = ["--json", "--buckets", "flat"]  # tiny random models: every cosine is ~0.99, and re-ranking reorders them
    fast = run_cli("query", photo, "--cache", str(auto_cache), *flat, cwd=tmp_path)
    assert fast.returncode == 0 and fast.stderr == "", fast.stderr[-2000:]
    assert imported(fast) == []
    slow = run_cli("query", photo, "--cache", str(auto_cache), *flat, "--runtime", "torch", cwd=tmp_path)
    assert slow.returncode == 0 and "torch" in imported(slow)
    [a], [b] = (json.loads("\n".join(r.stdout.strip().splitlines()[:-1])) for r in (fast, slow))
    assert [r["row"] for r in a["results"]] == [r["row"] for r in b["results"]]
    assert [r["score"] for r in a["results"]] == pytest.approx([r["score"] for r in b["results"]], abs=1e-4)
    assert a["results"][0]["path"] == photo


def test_duplicates_help_and_errors_load_no_model_library(auto_cache, tmp_path):
    for arguments in (["duplicates", "--cache", str(auto_cache), "--threshold", "0.5"], ["--help"],
                      ["query", "x.jpg", "--cache", str(tmp_path / "missing")], ["build-cache", "--help"]):
        result = run_cli(*arguments, cwd=tmp_path)
        assert imported(result) == [], (arguments, result.stderr[-500:])


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_an_export_that_is_not_the_recorded_one_falls_back_to_torch_in_one_line(auto_cache, gallery, tmp_path,
                                                                               damage):
    record = lookalike.open(auto_cache).data.manifest.exports["embed"]
    path = export_dir() / record["file"]
    if damage == "changed":  # e.g. replaced by a planted export: its bytes no longer hash to the manifest's record
        path.write_bytes(path.read_bytes() + b"\0")
    else:
        path.unlink()
    photo = str(gallery / "blue_squares" / "3.png")
    result = run_cli("query", photo, "--cache", str(auto_cache), "--json", "--buckets", "flat", cwd=tmp_path)
    assert result.returncode == 0 and "torch" in imported(result)
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("lookalike: ") and line.endswith("; loading the models in torch")
    assert ("sha256 differs" if damage == "changed" else "No such file") in line
    answer = json.loads("\n".join(result.stdout.strip().splitlines()[:-1]))[0]
    assert answer["results"][0]["path"] == photo


def photo_variants(photo: Image.Image) -> list[tuple[str, bytes]]:
    """One real photo as a phone, a scanner or an editor may save it: CMYK, palette, 16-bit, EXIF-rotated."""
    variants = []
    for name, image, fmt, options in (
            ("cmyk.jpg", photo.convert("CMYK"), "JPEG", {}),
            ("palette.png", photo.quantize(64), "PNG", {}),
            ("grey16.png", Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)), "PNG", {}),
            ("rgba.png", photo.convert("RGBA"), "PNG", {})):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        variants.append((name, buffer.getvalue()))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", exif=exif.tobytes())
    variants.append(("exif-rotated.jpg", buffer.getvalue()))
    return variants


@pytest.mark.real
def test_numpy_preprocessing_gives_torchvisions_tensor_on_real_photos(real_weights, assets):
    """timm's (mobilenetv2) and open_clip's eval transforms against their recorded steps run in PIL + numpy, on 60
    real photos of mixed sizes and modes, decoded as the pipeline decodes them."""
    import zipfile

    from lookalike.models.embedders import load_clip
    from lookalike.models.registry import resolve_spec
    from lookalike.models.timm_net import load_timm_net
    from lookalike.pipeline.images import load_image

    timm_transform = load_timm_net(resolve_spec("mobilenetv2", "classifier"), "cpu").transform
    _, clip_transform, _, _ = load_clip(resolve_spec("clip:ViT-B-32/laion2b_s34b_b79k@random", "embedder"))
    with zipfile.ZipFile(assets / "data" / "caltech101-22.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.lower().endswith(".jpg"))[::200][:12]
        photos = [archive.read(name) for name in names]
    files = []
    for data in photos:
        files.append(("original.jpg", data))
        files += photo_variants(Image.open(io.BytesIO(data)).convert("RGB"))
    assert len(files) >= 50
    worst = 0.0
    for transform in (timm_transform, clip_transform):
        steps = describe_transform(transform)
        assert steps is not None
        for side in (448, 1024):
            for name, data in files:
                image = load_image(data, side, name=name)
                worst = max(worst, float(np.abs(transform(image).numpy() - ArrayTransform(steps)(image)).max()))
    assert worst <= 1e-6, f"max abs difference {worst}"


@pytest.mark.real
def test_the_demo_queries_get_the_same_top5_from_the_exports_and_from_torch(real_weights, assets, tmp_path):
    """caltech101-22 with one held-out photo per class (as make demo lays it out), 10 gallery photos per class."""
    from lookalike.pipeline.datasets import load_labelled

    data = load_labelled(assets / "data" / "caltech101-22.zip")
    queries = []
    for label in sorted(set(data.labels)):
        paths = [p for p, lab in zip(data.paths, data.labels) if lab == label]
        queries.append(data.root / paths[0])
        for path in paths[1:11]:
            target = tmp_path / "gallery" / label / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(data.root / path)
    lookalike.build(tmp_path / "gallery", tmp_path / "cache", classifier="mobilenetv2", embedder="mobilenetv2")
    assert len(queries) == 22
    fast = lookalike.open(tmp_path / "cache").query(queries)
    slow = lookalike.open(tmp_path / "cache", runtime="torch").query(queries)
    assert type(lookalike.open(tmp_path / "cache").load().session.pipeline.stages[0].classifier).__name__ \
        == "RecordedClassifier"
    for a, b in zip(fast, slow):  # the same five; rows whose ranking scores tie (to 1e-6) may swap places
        assert {r.row for r in a.results} == {r.row for r in b.results}
        ranked_by = [[r.score if r.rank_score is None else r.rank_score for r in x.results] for x in (a, b)]
        assert ranked_by[0] == pytest.approx(ranked_by[1], abs=1e-4)
        swapped = [i for i, (x, y) in enumerate(zip(a.results, b.results)) if x.row != y.row]
        assert all(abs(ranked_by[1][i] - ranked_by[1][j]) < 1e-6 for i in swapped for j in swapped)
