"""Caches written before format 2 (rows in gallery order, `default_buckets`, the older decode rule) still answer.

tests/fixtures/format1-cache was built by lookalike's format-1 code over the drawn `gallery` fixture with the tiny
random models of `tiny_config`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lookalike.cache.manifest import CacheError
from lookalike.cache.store import load_cache
from lookalike.cli import cli
from lookalike.pipeline.build import build_cache

FORMAT1 = Path(__file__).parent / "fixtures" / "format1-cache"


@pytest.fixture
def old_cache(tmp_path) -> Path:
    copy = tmp_path / "old-cache"
    shutil.copytree(FORMAT1, copy)
    return copy


def test_a_format_1_cache_answers_queries(old_cache, gallery):
    data = load_cache(old_cache)
    assert data.manifest.format_version == 1 and len(data) == 18
    image = gallery / "blue_squares" / "3.png"
    result = CliRunner().invoke(cli, ["query", str(image), "--cache", str(old_cache), "--json", "-k", "3"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)[0]
    assert answer["results"][0]["path"].endswith("blue_squares/3.png") and answer["results"][0]["score"] > 0.999
    assert answer["buckets"] == data.manifest.default_policy  # `auto` is the choice recorded as default_buckets
    assert {r["label"] for r in answer["results"]} == {"blue_squares"}


def test_updating_a_format_1_cache_says_what_to_run(old_cache, gallery, tiny_config):
    with pytest.raises(CacheError, match="decode.*build-cache --rebuild"):
        build_cache(gallery, old_cache, tiny_config)
    assert build_cache(gallery, old_cache, tiny_config, rebuild=True).images == 18
    assert load_cache(old_cache).manifest.format_version == 2
