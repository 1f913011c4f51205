"""`auto` and the fused weight are chosen on the gallery: class agreement is used only where it helps."""
from __future__ import annotations

import numpy as np
import pytest

from cache.search import Searcher
from cache.store import CacheData, empty_columns
from pipeline.fusion import choose_policy
from pipeline.policies import resolve_auto


def gallery_cache(tmp_path, informative_classes: bool) -> Searcher:
    """300 images of 3 labels; embeddings carry a weak label signal; classes follow labels or not."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 100)
    embeddings = rng.normal(size=(300, 16)) + 0.8 * np.eye(16)[labels]
    embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)
    top1 = labels if informative_classes else rng.integers(0, 3, 300)
    classes = np.stack([top1, (top1 + 1) % 3, (top1 + 2) % 3], axis=1).astype(np.int32)
    columns = empty_columns(16, 3)
    columns.update(paths=np.array([f"{i}.jpg" for i in range(300)]), labels=np.array([f"l{x}" for x in labels]),
                   label_classes=np.full(300, -1, np.int32), classes=classes,
                   probs=np.tile(np.array([0.8, 0.15, 0.05], np.float32), (300, 1)), embeddings=embeddings)
    return Searcher(CacheData(tmp_path, {}, columns))


def test_informative_classes_make_auto_choose_a_fused_policy(tmp_path):
    chosen = choose_policy(gallery_cache(tmp_path, informative_classes=True), fraction=0.3)
    assert chosen.kind == "fused" and chosen.weight > 0


def test_uninformative_classes_leave_flat_search(tmp_path):
    assert str(choose_policy(gallery_cache(tmp_path, informative_classes=False), fraction=0.3)) == "flat"


def test_unlabelled_gallery_has_no_choice(tmp_path):
    searcher = gallery_cache(tmp_path, informative_classes=True)
    searcher.data.columns["labels"] = np.array([""] * 300)
    assert choose_policy(searcher) is None


@pytest.mark.parametrize("text, manifest, expected", [
    ("auto", {"default_buckets": "fused:10@1+soft:3"}, "fused:10@1+soft:3"),
    ("auto", {}, "flat"), ("topk:3", {"default_buckets": "flat"}, "topk:3")])
def test_auto_resolves_to_the_caches_choice(text, manifest, expected):
    assert resolve_auto(text, manifest) == expected
