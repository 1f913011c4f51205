"""`duplicates`: near-duplicate groups of a cache's whole gallery, and a contact sheet of the groups.

The search is flat, not within the cache's buckets: on the benchmark (docs/dedup-benchmark.md) pairs sharing a
top-1 bucket kept recall 0.635 of flat's 0.818 (an edited copy often changes class), top-3 buckets 0.793, and the
local scale needs each image's flat nearest neighbours anyway, so buckets would save no search."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache.duplicates import DuplicateGroup, find_duplicates
from cache.store import CacheData, load_cache
from models.errors import UserError
from pipeline.sheets import Tile, contact_sheet

# Per embedder preset: (locally scaled score threshold, `sure` cosine), from the near-duplicate benchmark's tuning
# set (seed 0: 100 caltech101-22 photos x 3 versions + 200 distinct photos; the threshold with the best pair F1
# there, reported on the disjoint seed-1 set, docs/dedup-benchmark.md). Other embedders have no measured default:
# give --threshold (then no `sure` cosine applies).
DEFAULTS = {"mobilenetv2": (0.05, 0.95)}
SHEET_GROUPS = 20  # groups drawn in a contact sheet at most (largest first)
SHEET_MEMBERS = 8


@dataclass
class DuplicateReport:
    data: CacheData
    threshold: float  # on the locally scaled score (cache/duplicates.py)
    groups: list[DuplicateGroup]
    sure: float | None  # cosine above which a pair always counts (None: the scaled score alone)

    def to_dict(self) -> dict:
        root, paths = self.data.gallery_root, self.data.columns["paths"]
        return {"cache": str(self.data.root), "threshold": self.threshold, "sure_cosine": self.sure,
                "groups": [{"members": [{"path": str(root / str(paths[r])), "best_cosine": float(s)}
                                        for r, s in zip(group.rows, group.best)],
                            "pairs": [{"a": str(root / str(paths[a])), "b": str(root / str(paths[b])),
                                       "cosine": cosine, "score": score} for a, b, cosine, score in group.pairs]}
                           for group in self.groups]}


def defaults(data: CacheData) -> tuple[float, float]:
    """(threshold, sure cosine) measured for the cache's embedder; UserError when none was."""
    embedder = data.manifest["config"]["embedder"]
    if embedder not in DEFAULTS:
        raise UserError(f"--threshold: no measured default for embedder '{embedder}' of {data.root} "
                        f"(measured: {', '.join(DEFAULTS)}); give a score between 0 and 1")
    return DEFAULTS[embedder]


def cache_duplicates(cache_dir: str | Path, threshold: float | None = None) -> DuplicateReport:
    """Near-duplicate groups of a cache; UserError for a cache without embeddings or a threshold outside (0, 1]."""
    if threshold is not None and not 0 < threshold <= 1:
        raise UserError(f"--threshold {threshold}: must be a score in (0, 1]")
    data = load_cache(cache_dir)
    if len(data) == 0 or data.columns["embeddings"].shape[1] == 0:
        raise UserError(f"{data.root}: the cache holds no embeddings; run build-cache on a gallery with images")
    threshold, sure = defaults(data) if threshold is None else (threshold, None)
    return DuplicateReport(data, threshold, find_duplicates(data.columns["embeddings"], threshold, sure=sure), sure)


def duplicate_sheet(report: DuplicateReport, out: str | Path) -> Path:
    """A contact sheet: one row per group (the largest SHEET_GROUPS), members with their best cosine."""
    root, paths = report.data.gallery_root, report.data.columns["paths"]
    rows = [[Tile(root / str(paths[r]), f"{Path(str(paths[r])).name}\ngroup {g + 1}, best {s:.3f}")
             for r, s in list(zip(group.rows, group.best))[:SHEET_MEMBERS]]
            for g, group in enumerate(report.groups[:SHEET_GROUPS])]
    if not rows:
        raise UserError(f"--sheet {out}: no duplicate groups at threshold {report.threshold:g}, nothing to draw")
    return contact_sheet(rows, out)
