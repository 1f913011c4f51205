"""Packaging: one `lookalike` package in the wheel, no AGPL in the core install, extras that hold only what build,
query and serve do not need, and an install that works beside a user's own `models/` and `pipeline/` packages."""
from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

import lookalike
from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER

ROOT = Path(__file__).resolve().parents[1]
AGPL = re.compile(r"AGPL|Affero", re.I)
TINY = {"classifier": TINY_CLASSIFIER, "embedder": TINY_EMBEDDER, "device": "cpu", "batch_size": 4}


def installed_closure(name: str, extras: tuple[str, ...] = ()) -> dict[str, str]:
    """Every distribution `pip install name[extras]` brings, as installed here: {name: its licence text}."""
    found: dict[str, str] = {}
    todo = [(name, extras)]
    while todo:
        current, wanted = todo.pop()
        try:
            dist = distribution(current)
        except PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found and not wanted:
            continue
        meta = dist.metadata
        # The License field's first line: a field holding whole texts is no declaration (scipy's holds the GPL of a
        # bundled runtime, whose section 13 names the Affero licence; scipy is BSD).
        declared = (meta.get("License") or "").strip().splitlines()[:1]
        found[key] = " ".join(filter(None, [meta.get("License-Expression"), *declared,
                                            *[c for c in meta.get_all("Classifier") or [] if "License" in c]]))
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or any(
                    requirement.marker.evaluate(dict(default_environment(), extra=extra)) for extra in wanted or ("",)):
                todo.append((requirement.name, tuple(requirement.extras)))
    return found


def test_the_core_install_pulls_no_agpl_distribution():
    """Read from the metadata of every distribution the core install brings (as installed by make setup)."""
    core = installed_closure("lookalike")
    assert {"torch", "timm", "open-clip-torch", "faiss-cpu", "platformdirs", "onnxruntime", "fastapi"} <= set(core)
    assert {"ultralytics", "matplotlib", "scikit-learn", "pytorch-metric-learning"}.isdisjoint(core)
    assert [name for name, licence in core.items() if AGPL.search(licence)] == []
    with_crop = installed_closure("lookalike", ("crop",))
    assert AGPL.search(with_crop["ultralytics"])  # the check sees an AGPL licence where there is one


def test_build_query_duplicates_and_serve_need_no_extra(gallery, tmp_path):
    """Run with the crop, eval, train and milvus extras' libraries made unimportable: the core works without them
    (build-cache fits learned whitening without scikit-learn)."""
    blocked = ["ultralytics", "matplotlib", "yaml", "sklearn", "pytorch_metric_learning", "pymilvus", "milvus_lite"]
    code = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # import raises ImportError
import lookalike
lookalike.build({str(gallery)!r}, {str(tmp_path / 'cache')!r}, **{TINY!r})
index = lookalike.open({str(tmp_path / 'cache')!r})
answer = index.query({str(gallery / 'red_circles' / '1.png')!r})
index.duplicates(0.5)
from lookalike.pipeline.serve.app import create_app
create_app({str(tmp_path / 'cache')!r})
print(answer.results[0].path)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "red_circles/1.png"


def test_crop_without_the_crop_extra_is_one_line_naming_it(gallery, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lookalike.cli import cli

    monkeypatch.setitem(sys.modules, "ultralytics", None)
    result = CliRunner().invoke(cli, ["build-cache", "--gallery", str(gallery), "--out", str(tmp_path / "c"),
                                      "--crop", "--classifier", TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: --crop needs the 'crop' extra (ultralytics is missing): pip install 'lookalike[crop]' "
        "(ultralytics, AGPL-3.0)"]


def test_milvus_without_the_milvus_extra_is_one_line_naming_it(monkeypatch):
    from lookalike.cache.milvus import MilvusTarget, connect

    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(lookalike.UserError) as refused:
        connect(MilvusTarget("rows.db"))
    assert str(refused.value) == "Milvus needs the 'milvus' extra (pymilvus is missing): pip install 'lookalike[milvus]'"


def test_folders_follow_xdg_unless_a_lookalike_variable_says(monkeypatch, tmp_path):
    from lookalike.models.files import user_cache_dir, user_config_dir

    monkeypatch.delenv("LOOKALIKE_CACHE_DIR")
    monkeypatch.delenv("LOOKALIKE_CONFIG_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    assert user_cache_dir() == tmp_path / "xdg-cache" / "lookalike"
    assert user_config_dir() == tmp_path / "xdg-config" / "lookalike"
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "mine"))
    assert user_cache_dir() == tmp_path / "mine"


def test_version_is_the_package_version():
    from click.testing import CliRunner

    from lookalike.cli import cli

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"lookalike, version {lookalike.__version__}"


@pytest.mark.slow
def test_the_wheel_holds_one_package_and_runs_beside_a_users_own_packages(gallery, tmp_path):
    source = tmp_path / "source"  # built from a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist")], cwd=source, check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("lookalike-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["lookalike"]
    assert {name.split("/")[0] for name in names} == {"lookalike", f"lookalike-{lookalike.__version__}.dist-info"}
    assert {"lookalike/__init__.py", "lookalike/cli.py", "lookalike/pipeline/serve/page.html",
            "lookalike/pipeline/api.py", "lookalike/models/registry.py", "lookalike/cache/store.py"} <= set(names)
    assert not any(name.startswith(("lookalike/tests", "lookalike/scripts")) for name in names)

    # A fresh venv with the wheel alone; torch and the other dependencies come from this environment's site-packages.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    [packages] = venv.glob("lib/python*/site-packages")
    (packages / "reuse-installed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    lookalike.build(gallery, tmp_path / "cache", **TINY)

    project = tmp_path / "project"  # a user's project with generic package names of its own
    for package in ("models", "pipeline", "cache"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f"OWNER = 'user {package}'\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    photo = gallery / "blue_squares" / "4.png"
    query = ["query", str(photo), "--cache", str(tmp_path / "cache"), "--json", "--buckets", "flat"]
    script = subprocess.run([venv / "bin" / "lookalike", *query], cwd=project, env=env, capture_output=True,
                            text=True, check=False)
    assert script.returncode == 0, script.stderr[-2000:]
    assert json.loads(script.stdout)[0]["results"][0]["path"] == str(photo)
    both = ("import models, pipeline, cache, lookalike, lookalike.pipeline.api, lookalike.models.registry; "
            "print(models.OWNER, pipeline.OWNER, cache.OWNER, sep=','); print(lookalike.__file__); "
            "from importlib.resources import files; print(files('lookalike.pipeline.serve').joinpath('page.html')"
            ".read_text()[:15])")
    result = subprocess.run([venv / "bin" / "python", "-c", both], cwd=project, env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    owners, where, page = result.stdout.splitlines()
    assert owners == "user models,user pipeline,user cache"
    assert Path(where).is_relative_to(packages) and page.lower().startswith("<!doctype html")
