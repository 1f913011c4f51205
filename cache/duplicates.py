"""Near-duplicate groups from stored embeddings: a faiss range search (inner product above a threshold) within
each bucket's rows, or over the whole gallery, then connected components of the pairs found.

Connected components, not cliques: the variants of one photo (a crop, a re-encode, a flip) are each close to the
original but not always to each other, and a component keeps them together through it. The cost is chaining
(two distinct photos joined through a third); the benchmark (docs/dedup-benchmark.md) measures how much the
groups' implied pairs lose against the raw pairs at the default threshold.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

QUERY_CHUNK = 4096  # rows range-searched at once (bounds the result buffers)


@dataclass
class DuplicateGroup:
    rows: np.ndarray  # gallery rows, most connected first
    best: np.ndarray  # per member: its highest similarity to another member
    pairs: list[tuple[int, int, float]]  # (row, row, similarity) above the threshold, best first


def similar_pairs(vectors: np.ndarray, threshold: float,
                  buckets: Iterable[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows i, rows j, similarity) of every pair i < j with inner product above `threshold`, searched within
    each array of rows in `buckets` (a pair sharing several buckets is reported once), or among all rows."""
    import faiss

    groups = [np.arange(len(vectors))] if buckets is None else [np.asarray(b, np.int64) for b in buckets]
    found_i, found_j, found_s = [], [], []
    for rows in groups:
        if len(rows) < 2:
            continue
        members = np.ascontiguousarray(vectors[rows], np.float32)
        index = faiss.IndexFlatIP(members.shape[1])
        index.add(members)
        for start in range(0, len(rows), QUERY_CHUNK):
            lims, sims, ids = index.range_search(members[start:start + QUERY_CHUNK], float(threshold))
            queries = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64)))
            keep = queries < ids  # each pair once, no self pairs
            found_i.append(rows[queries[keep]])
            found_j.append(rows[ids[keep]])
            found_s.append(sims[keep])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
    low, high = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(low * len(vectors) + high, return_index=True)
    return low[first], high[first], s[first]


def _components(count: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component id per row (union-find with path halving)."""
    parent = np.arange(count)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(x) for x in range(count)])


def find_duplicates(vectors: np.ndarray, threshold: float,
                    buckets: Iterable[np.ndarray] | None = None) -> list[DuplicateGroup]:
    """Groups of two or more rows joined by pairs above `threshold` (see similar_pairs), largest first."""
    i, j, sims = similar_pairs(vectors, threshold, buckets)
    component = _components(len(vectors), i, j)
    best = np.full(len(vectors), -np.inf, np.float32)
    np.maximum.at(best, i, sims)
    np.maximum.at(best, j, sims)
    degree = np.bincount(np.concatenate([i, j]), minlength=len(vectors))
    groups = []
    for key in np.unique(component[i]):
        members = np.flatnonzero(component == key)
        members = members[np.lexsort((members, -best[members], -degree[members]))]
        inside = component[i] == key
        order = np.argsort(-sims[inside], kind="stable")
        pairs = [(int(a), int(b), float(s)) for a, b, s in zip(i[inside][order], j[inside][order], sims[inside][order])]
        groups.append(DuplicateGroup(members, best[members], pairs))
    groups.sort(key=lambda g: (-len(g.rows), -float(g.best.max()), int(g.rows.min())))
    return groups
