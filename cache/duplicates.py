"""Near-duplicate groups from stored embeddings.

A pair is a near-duplicate when its *locally scaled* similarity 2*cos(i, j) - r_i - r_j (r: an image's mean cosine to
its LOCAL_K nearest others; CSLS, Conneau et al. 2018) is above the threshold and its cosine above a `floor` (two
distinct photos can be each other's only close neighbours), or its cosine alone is above a `sure` level. Raw cosine cannot tell a re-encoded copy from another photo of a dense class (distinct airliner photos are as
close as a cropped copy is to its original); local scaling asks "closer than each image's usual neighbours", which
is what a copy is. On the benchmark (docs/dedup-benchmark.md) it raised pair F1 at the tuned default from 0.58 to 0.76. Since a pair with
a positive scaled score lies within one side's LOCAL_K nearest (cos > min(r_i, r_j)), the candidates are those k-NN
lists (one flat faiss search, which also gives r) plus a faiss range search at `sure` (for an image copied more than
LOCAL_K times). With bucket keys, only pairs sharing a bucket count (r stays gallery-wide: a bucket of two images
would otherwise scale its own pair to 0).

Groups are connected components of the pairs: the versions of one photo are close to the original, not always to
each other, and a component keeps them together through it (on the benchmark the groups' implied pairs had F1 0.78
against 0.76 for the pairs alone: chaining cost less precision than it recovered recall).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lookalike.cache.metrics import rank_by_score
from lookalike.cache.rerank import nearest_others

LOCAL_K = 5  # neighbours that set an image's usual similarity (best of 3/5/10/20 on the tuning set)
QUERY_CHUNK = 4096  # rows range-searched at once (bounds the result buffers)


@dataclass
class DuplicateGroup:
    rows: np.ndarray  # gallery rows, most connected first
    best: np.ndarray  # per member: its highest cosine to another member it is paired with
    pairs: list[tuple[int, int, float, float]]  # (row, row, cosine, scaled score), best score first


def similar_pairs(vectors: np.ndarray, threshold: float, bucket_keys: np.ndarray | None = None,
                  sure: float | None = None, floor: float = -1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows i < j, cosine, scaled score) of every near-duplicate pair (see the module), each pair once: scaled score
    above `threshold` with cosine above `floor`, or cosine above `sure`. With `bucket_keys` ([rows, M] bucket keys,
    -1 for none) only pairs that share a bucket count."""
    import faiss

    vectors = np.ascontiguousarray(vectors, np.float32)
    depth = min(LOCAL_K, len(vectors) - 1)
    if depth < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
    sims, ids = nearest_others(vectors, depth)
    local = sims.mean(axis=1)
    i, j, cosine = [np.repeat(np.arange(len(vectors)), depth)], [ids.reshape(-1)], [sims.reshape(-1)]
    if sure is not None:  # every pair above `sure`, however many copies an image has
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        for start in range(0, len(vectors), QUERY_CHUNK):
            lims, found, near = index.range_search(vectors[start:start + QUERY_CHUNK], float(sure))
            i.append(start + np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64))))
            j.append(near)
            cosine.append(found)
    i, j, cosine = np.concatenate(i), np.concatenate(j).astype(np.int64), np.concatenate(cosine)
    low, high = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(low * len(vectors) + high, return_index=True)
    first = first[low[first] != high[first]]
    low, high, cosine = low[first], high[first], cosine[first]
    score = 2 * cosine - local[low] - local[high]
    passed = (score > threshold) & (cosine > floor)
    if sure is not None:
        passed |= cosine > sure
    if bucket_keys is not None:
        a, b = bucket_keys[low][:, :, None], bucket_keys[high][:, None, :]
        passed &= ((a == b) & (a >= 0)).any(axis=(1, 2))
    return low[passed], high[passed], cosine[passed], score[passed]


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


def find_duplicates(vectors: np.ndarray, threshold: float, bucket_keys: np.ndarray | None = None,
                    sure: float | None = None, floor: float = -1.0) -> list[DuplicateGroup]:
    """Groups of two or more rows joined by near-duplicate pairs (see similar_pairs), largest first."""
    i, j, cosine, score = similar_pairs(vectors, threshold, bucket_keys, sure, floor)
    component = _components(len(vectors), i, j)
    best = np.full(len(vectors), -np.inf, np.float32)
    np.maximum.at(best, i, cosine)
    np.maximum.at(best, j, cosine)
    degree = np.bincount(np.concatenate([i, j]), minlength=len(vectors))
    groups = []
    for key in np.unique(component[i]):
        members = np.flatnonzero(component == key)
        members = members[np.lexsort((members, -best[members], -degree[members]))]
        inside = np.flatnonzero(component[i] == key)
        inside = inside[rank_by_score(score[inside])]
        pairs = [(int(i[p]), int(j[p]), float(cosine[p]), float(score[p])) for p in inside]
        groups.append(DuplicateGroup(members, best[members], pairs))
    groups.sort(key=lambda g: (-len(g.rows), -float(g.best.max()), int(g.rows.min())))
    return groups
