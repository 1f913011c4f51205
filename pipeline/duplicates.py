"""`duplicates`: near-duplicate groups of a cache's whole gallery, and a contact sheet of the groups.

The search is flat, not within the cache's buckets: on the benchmark (docs/dedup-benchmark.md) pairs sharing a
top-1 bucket kept recall 0.545 of flat's 0.688 (an edited copy often changes class), top-3 buckets 0.663, and the
local scale needs each image's flat nearest neighbours anyway, so buckets would save no search."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lookalike.cache.duplicates import DuplicateGroup, find_duplicates
from lookalike.cache.store import CacheData
from lookalike.models.errors import UserError
from lookalike.pipeline.sheets import Tile, contact_sheet


@dataclass(frozen=True)
class Rule:
    """A pair counts when scaled score > threshold and cosine > floor, or cosine > sure (cache/duplicates.py)."""

    threshold: float
    floor: float = -1.0
    sure: float | None = None


# Per embedder preset, from the near-duplicate benchmark's tuning set (seed 0: 100 caltech101-22 photos x 3 versions
# + 1,000 distinct photos): the (floor, threshold) with the best pair F1 there; sure = a cosine above which every tuning
# pair was true. Reported on the disjoint seed-1 set (docs/dedup-benchmark.md). Other embedders have no measured
# default: give --threshold (the scaled score alone then decides).
DEFAULTS = {"mobilenetv2": Rule(threshold=0.08, floor=0.75, sure=0.95)}
SHEET_GROUPS = 20  # groups drawn in a contact sheet at most (largest first)
SHEET_MEMBERS = 8


@dataclass
class DuplicateReport:
    data: CacheData
    rule: Rule
    groups: list[DuplicateGroup]

    def to_dict(self) -> dict:
        root, paths = self.data.gallery_root, self.data.columns["paths"]
        return {"cache": str(self.data.root), "threshold": self.rule.threshold, "floor_cosine": self.rule.floor,
                "sure_cosine": self.rule.sure,
                "groups": [{"members": [{"path": str(root / str(paths[r])), "best_cosine": float(s)}
                                        for r, s in zip(group.rows, group.best)],
                            "pairs": [{"a": str(root / str(paths[a])), "b": str(root / str(paths[b])),
                                       "cosine": cosine, "score": score} for a, b, cosine, score in group.pairs]}
                           for group in self.groups]}


def default_rule(data: CacheData) -> Rule:
    """The rule measured for the cache's embedder; UserError when none was."""
    embedder = data.manifest.config["embedder"]
    if embedder not in DEFAULTS:
        raise UserError(f"--threshold: no measured default for embedder '{embedder}' of {data.root} "
                        f"(measured: {', '.join(DEFAULTS)}); give a score between 0 and 1")
    return DEFAULTS[embedder]


def cache_duplicates(data: CacheData, threshold: float | None = None) -> DuplicateReport:
    """Near-duplicate groups of a loaded cache; UserError for a cache without embeddings or a threshold outside
    (0, 1]."""
    if threshold is not None and not 0 < threshold <= 1:
        raise UserError(f"--threshold {threshold}: must be a score in (0, 1]")
    if len(data) == 0 or data.columns["embeddings"].shape[1] == 0:
        raise UserError(f"{data.root}: the cache holds no embeddings; run build-cache on a gallery with images")
    rule = default_rule(data) if threshold is None else Rule(threshold)
    groups = find_duplicates(data.columns["embeddings"], rule.threshold, sure=rule.sure, floor=rule.floor)
    return DuplicateReport(data, rule, groups)


def duplicate_sheet(report: DuplicateReport, out: str | Path) -> Path:
    """A contact sheet: one row per group (the largest SHEET_GROUPS), members with their best cosine."""
    root, paths = report.data.gallery_root, report.data.columns["paths"]
    rows = [[Tile(root / str(paths[r]), f"{Path(str(paths[r])).name}\ngroup {g + 1}, best {s:.3f}")
             for r, s in list(zip(group.rows, group.best))[:SHEET_MEMBERS]]
            for g, group in enumerate(report.groups[:SHEET_GROUPS])]
    if not rows:
        raise UserError(f"--sheet {out}: no duplicate groups at threshold {report.rule.threshold:g}, nothing to draw")
    return contact_sheet(rows, out)
