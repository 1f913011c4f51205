"""Near-duplicate groups: found from vectors with known duplicates, within buckets, and through the CLI; bad input
gets one line."""
from __future__ import annotations

import json
from dataclasses import replace
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from lookalike.cache.duplicates import find_duplicates, similar_pairs
from lookalike.models.outputs import unit_rows
from lookalike.cache.generations import write_generation
from lookalike.cache.store import load_cache
from lookalike.cli import cli
from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER

THRESHOLD = "0.5"


def families(seed: int = 0, dim: int = 64):
    """3 families (an original and 2 slight variants, cosine ~0.99) among 20 unrelated vectors."""
    rng = np.random.default_rng(seed)
    originals = unit_rows(rng.normal(size=(3, dim)))
    variants = unit_rows(np.repeat(originals, 2, axis=0) + 0.1 * rng.normal(size=(6, dim)) / np.sqrt(dim))
    others = unit_rows(rng.normal(size=(20, dim)))
    vectors = np.vstack([originals, variants, others])  # rows 0-2 originals; 3-8 their variants; 9+ unrelated
    return vectors, [{0, 3, 4}, {1, 5, 6}, {2, 7, 8}]


def test_groups_are_the_known_families():
    vectors, expected = families()
    groups = find_duplicates(vectors, 0.5)
    assert sorted((set(g.rows.tolist()) for g in groups), key=min) == expected
    for group in groups:
        assert len(group.pairs) == 3 and all(cosine > 0.9 and score > 0.5 for _, _, cosine, score in group.pairs)
        assert np.all(group.best > 0.9)


def test_an_image_copied_many_times_is_found_through_the_sure_cosine():
    """Ten copies make each other their usual neighbours (scaled score ~0): the sure cosine still groups them."""
    vectors, _ = families()
    copies = np.vstack([vectors[9:10]] * 10 + [vectors[10:]])
    assert find_duplicates(copies, 0.5) == []
    assert [g.rows.tolist() for g in find_duplicates(copies, 0.5, sure=0.99)] == [list(range(10))]


def test_chained_variants_stay_one_group():
    """A variant close to the original but not to the other variant still joins its family (connected components)."""
    base = unit_rows(np.eye(8)[0] + 0.0)
    left = unit_rows(base + 0.6 * np.eye(8)[1])
    right = unit_rows(base - 0.6 * np.eye(8)[1])
    vectors = np.vstack([left, base, right, np.eye(8)[5]])
    assert float(left @ right) < 0.8 < float(left @ base)
    groups = find_duplicates(vectors, 0.5)
    assert [g.rows.tolist() for g in groups] == [[1, 0, 2]]  # the most connected member first


def test_only_pairs_sharing_a_bucket_count():
    vectors, _ = families()
    keys = np.full((len(vectors), 2), -1)
    keys[[0, 3], 0] = 7  # bucket 7: rows 0 and 3; bucket 8: rows 1, 4, 5 (row 4 also in bucket 9)
    keys[[1, 4, 5], 0] = 8
    keys[4, 1] = 9
    i, j, _, _ = similar_pairs(vectors, 0.5, keys)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 3), (1, 5)]  # (0, 4) and (3, 4) cross buckets


@pytest.fixture
def duplicated_cache(gallery, tmp_path):
    """The drawn gallery plus exact copies of two images under other names, as a tiny-model cache. Random-weight
    embeddings put every drawn image at cosine ~0.99, so the cache's vectors are then replaced by distinct random
    ones (a copy keeping its original's vector), as a trained embedder would place them."""
    shutil.copy(gallery / "red_circles" / "0.png", gallery / "red_circles" / "copy_of_0.png")
    shutil.copy(gallery / "blue_squares" / "2.png", gallery / "blue_squares" / "copy_of_2.png")
    out = tmp_path / "cache"
    result = CliRunner().invoke(cli, ["build-cache", "--gallery", str(gallery), "--out", str(out), "--classifier",
                                      TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = load_cache(out, mmap=False)
    paths = [str(p) for p in data.columns["paths"]]
    vectors = unit_rows(np.random.default_rng(0).normal(size=(len(paths), 32)))
    for copy in ("red_circles/copy_of_0.png", "blue_squares/copy_of_2.png"):
        vectors[paths.index(copy)] = vectors[paths.index(copy.replace("copy_of_", ""))]
    write_generation(out, replace(data.manifest, dim=32, dba=None, default_policy="flat"),
                     dict(data.columns, embeddings=vectors))
    return out


def test_cli_lists_the_copies_and_draws_a_sheet(duplicated_cache, tmp_path):
    sheet = tmp_path / "groups.png"
    result = CliRunner().invoke(cli, ["duplicates", "--cache", str(duplicated_cache), "--threshold", THRESHOLD,
                                      "--json", "--sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)["groups"]
    names = sorted(sorted(m["path"].split("/gallery/")[1] for m in g["members"]) for g in groups)
    assert names == [["blue_squares/2.png", "blue_squares/copy_of_2.png"], ["red_circles/0.png", "red_circles/copy_of_0.png"]]
    assert all(p["cosine"] > 0.9999 for g in groups for p in g["pairs"])
    assert sheet.is_file() and sheet.stat().st_size > 0
    text = CliRunner().invoke(cli, ["duplicates", "--cache", str(duplicated_cache), "--threshold", THRESHOLD])
    assert text.exit_code == 0 and text.stdout.startswith("2 groups of near-duplicates")


@pytest.mark.parametrize("arguments, message", [
    (["--threshold", "1.5"], "--threshold 1.5: must be a score in (0, 1]"),
    (["--threshold", "0"], "--threshold 0.0: must be a score in (0, 1]"),
    ([], f"--threshold: no measured default for embedder '{TINY_EMBEDDER}'"),
])
def test_bad_input_is_one_line(duplicated_cache, arguments, message):
    result = CliRunner().invoke(cli, ["duplicates", "--cache", str(duplicated_cache)] + arguments)
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_not_a_cache_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["duplicates", "--cache", str(tmp_path), "--threshold", "0.9"])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {tmp_path}: not a lookalike cache (no CURRENT file); run build-cache first"


def test_floor_drops_lonely_neighbours():
    """Two distinct images that are only each other's closest (cosine 0.6) score high once scaled; the floor
    keeps them apart."""
    rng = np.random.default_rng(5)
    others = unit_rows(rng.normal(size=(30, 256)))
    pair = unit_rows(np.vstack([np.eye(256)[0] + np.sqrt(2 / 3) * np.eye(256)[1],
                                np.eye(256)[0] + np.sqrt(2 / 3) * np.eye(256)[2]]))
    vectors = np.vstack([pair, others])
    assert 0.55 < float(pair[0] @ pair[1]) < 0.65
    assert [g.rows.tolist() for g in find_duplicates(vectors, 0.3)] == [[0, 1]]
    assert find_duplicates(vectors, 0.3, floor=0.7) == []
