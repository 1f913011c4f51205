"""`duplicates`: near-duplicate groups of a cache's gallery, searched within the buckets of the cache's policy when
it has them (flat otherwise), and a contact sheet of the groups."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache.duplicates import DuplicateGroup, find_duplicates
from cache.search import Searcher
from cache.store import CacheData, load_cache
from models.errors import UserError
from pipeline.policies import parse_policy, resolve_auto
from pipeline.sheets import Tile, contact_sheet

# Cosine above which two images count as near-duplicates, per embedder preset: the best pair F1 on the tuning set
# of the near-duplicate benchmark (seed 0, 100 caltech101-22 photos x 3 versions + 200 distinct photos; reported on
# the disjoint seed-1 set, docs/dedup-benchmark.md). Other embedders have no measured default: give --threshold.
DEFAULT_THRESHOLDS = {"mobilenetv2": 0.80}
SHEET_GROUPS = 20  # groups drawn in a contact sheet at most (largest first)
SHEET_MEMBERS = 8


@dataclass
class DuplicateReport:
    data: CacheData
    threshold: float
    searched: str  # 'flat' or the policy whose buckets were searched
    groups: list[DuplicateGroup]

    def to_dict(self) -> dict:
        root, paths = self.data.gallery_root, self.data.columns["paths"]
        return {"cache": str(self.data.root), "threshold": self.threshold, "searched": self.searched,
                "groups": [{"members": [{"path": str(root / str(paths[r])), "best_similarity": float(s)}
                                        for r, s in zip(group.rows, group.best)],
                            "pairs": [{"a": str(root / str(paths[a])), "b": str(root / str(paths[b])), "similarity": s}
                                      for a, b, s in group.pairs]} for group in self.groups]}


def default_threshold(data: CacheData) -> float:
    embedder = data.manifest["config"]["embedder"]
    if embedder not in DEFAULT_THRESHOLDS:
        raise UserError(f"--threshold: no measured default for embedder '{embedder}' of {data.root} "
                        f"(measured: {', '.join(DEFAULT_THRESHOLDS)}); give a cosine between 0 and 1")
    return DEFAULT_THRESHOLDS[embedder]


def cache_duplicates(cache_dir: str | Path, threshold: float | None = None) -> DuplicateReport:
    """Near-duplicate groups of a cache; UserError for a cache without embeddings or a threshold outside (0, 1]."""
    if threshold is not None and not 0 < threshold <= 1:
        raise UserError(f"--threshold {threshold}: must be a cosine similarity in (0, 1]")
    data = load_cache(cache_dir)
    if len(data) == 0 or data.columns["embeddings"].shape[1] == 0:
        raise UserError(f"{data.root}: the cache holds no embeddings; run build-cache on a gallery with images")
    threshold = default_threshold(data) if threshold is None else threshold
    policy = parse_policy(resolve_auto("auto", data.manifest))
    buckets, searched = None, "flat"
    if policy.uses_buckets:
        table = Searcher(data).table(policy.gallery_classes)
        buckets, searched = (table.rows_of(int(key)) for key in table.keys), str(policy)
    return DuplicateReport(data, threshold, searched, find_duplicates(data.columns["embeddings"], threshold, buckets))


def duplicate_sheet(report: DuplicateReport, out: str | Path) -> Path:
    """A contact sheet: one row per group (the largest SHEET_GROUPS), members with their best similarity."""
    root, paths = report.data.gallery_root, report.data.columns["paths"]
    rows = [[Tile(root / str(paths[r]), f"{Path(str(paths[r])).name}\ngroup {g + 1}, best {s:.3f}")
             for r, s in list(zip(group.rows, group.best))[:SHEET_MEMBERS]]
            for g, group in enumerate(report.groups[:SHEET_GROUPS])]
    if not rows:
        raise UserError(f"--sheet {out}: no duplicate groups at threshold {report.threshold:g}, nothing to draw")
    return contact_sheet(rows, out)
