"""Every mistake a user can make, and every bad file, is one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lookalike.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def one_line(text: str) -> str:
    [line] = [line for line in text.split("\n") if line.strip() and "embedding:" not in line]  # bar aside
    return line


@pytest.mark.parametrize("arguments, message", [
    (["build-cache", "--gallery", "g"], "error: cli build-cache: Missing option '--out'. (see --help)"),
    (["build-cache", "--gallery", "g", "--out", "o", "--batch-size", "0"],
     "error: cli build-cache: Invalid value for '--batch-size': 0 is not in the range x>=1. (see --help)"),
    (["query", "x.jpg", "--cache", "c", "-k", "many"],
     "error: cli query: Invalid value for '-k': 'many' is not a valid integer. (see --help)"),
    (["serve-coffee"], "error: cli: No such command 'serve-coffee'. (see --help)"),
])
def test_usage_errors_are_one_line(arguments, message):
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 2
    assert result.stderr.strip() == message


def test_help_is_still_help():
    result = CliRunner().invoke(cli, ["query", "--help"])
    assert result.exit_code == 0 and result.stdout.startswith("Usage: cli query")


def test_missing_clip_weights_print_one_line_only(gallery, tmp_path):
    env = dict(os.environ, LOOKALIKE_WEIGHTS=str(tmp_path), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "cli.py", "build-cache", "--gallery", str(gallery), "--out",
                             str(tmp_path / "c"), "--classifier", "none", "--embedder", "clip"],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert one_line(result.stderr).startswith("error: cannot load open_clip model 'clip'"), result.stderr


def bad_run_dir(tmp_path: Path, change) -> Path:
    """A run directory of a tiny timm embedder whose config.json `change` edits."""
    from safetensors.torch import save_file

    from lookalike.models.embedding_nets import build_net, describe_backbone
    from lookalike.models.run_directory import FORMAT_VERSION

    model = describe_backbone("timm:test_efficientnet@random", (32, 32))
    net, _ = build_net(model, 8, pretrained=False)
    config = {"format": FORMAT_VERSION, "model": model, "embedding_size": 8, "training": {}}
    change(config)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config))
    save_file(net.state_dict(), str(run_dir / "model.safetensors"))
    return run_dir


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(notes="x"), "unknown key notes"),
    (lambda c: c["model"].update(colour="red"), "unknown key model.colour"),
    (lambda c: c["model"]["spec"].update(colour="red"), "unknown key model.spec.colour"),
    (lambda c: c["model"]["spec"]["create_kwargs"].update(act_layer="sparkle"), "cannot build the network"),
    (lambda c: c["model"]["spec"]["create_kwargs"].update(act_layer=5), "cannot build the network"),
    (lambda c: c["model"].update(kind="resnet"), "model kind 'resnet' is not one of"),
    (lambda c: c.update(model=[1]), "model kind [1] is not one of"),
])
def test_a_bad_run_config_is_one_line(gallery, tmp_path, change, message):
    run_dir = bad_run_dir(tmp_path, change)
    result = CliRunner().invoke(cli, ["build-cache", "--gallery", str(gallery), "--out", str(tmp_path / "c"),
                                      "--classifier", "none", "--embedder", f"ckpt:{run_dir}", "--device", "cpu"])
    assert result.exit_code == 1
    line = one_line(result.stderr)
    assert line.startswith(f"error: {run_dir / 'config.json'}: ") and message in line, line


def test_a_bug_is_one_line_naming_its_traceback_file_and_debug_shows_it(monkeypatch, tmp_path):
    """Anything that is not a user error is a bug: one line pointing at the full traceback, or --debug raises it."""
    from lookalike.pipeline import api

    def broken(*args, **kwargs):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr(api, "load_cache", broken)
    result = CliRunner().invoke(cli, ["query", "x.jpg", "--cache", str(tmp_path)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith("error: unexpected RuntimeError: an internal invariant broke (a bug: the full traceback")
    written = Path(lines[0].split("traceback is in ")[1].split(";")[0])
    assert "Traceback (most recent call last)" in written.read_text() and "broken" in written.read_text()
    debug = CliRunner().invoke(cli, ["--debug", "query", "x.jpg", "--cache", str(tmp_path)])
    assert isinstance(debug.exception, RuntimeError)


@pytest.mark.parametrize("arguments, message", [
    (["/nonexistent/gallery"], "Error: FileNotFoundError: /nonexistent/gallery: data folder or zip does not exist"),
    ([".", "--runtime", "fast"], "Error: Invalid value for '--runtime': 'fast' is not one of 'torch', 'onnx'."),
])
def test_engine_scale_script_refuses_bad_arguments_in_one_line(arguments, message):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "engine_scale.py"), *arguments],
                            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message  # click's usage lines may come first
