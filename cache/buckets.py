"""Bucket membership: the one rule for which gallery rows belong to which bucket, and class agreement.

A gallery row's buckets are its top-M classifier classes (soft assignment; M = 1 is its top-1 class), or with
`bucket_by label` the classifier class of its folder label. Rows are stored grouped by their first bucket, so a
top-1 bucket is one contiguous block of the embedding matrix.
"""
from __future__ import annotations

import numpy as np


def bucket_keys(columns: dict[str, np.ndarray], bucket_by: str, gallery_classes: int = 1) -> np.ndarray:
    """[rows, M] bucket keys of every gallery row (M = 1 with bucket_by label); [rows, 0] without a classifier."""
    if bucket_by == "label":
        return np.asarray(columns["label_classes"], np.int64)[:, None]
    return np.asarray(columns["classes"][:, :gallery_classes], np.int64)


def grouped_order(columns: dict[str, np.ndarray], bucket_by: str) -> np.ndarray:
    """The row order that stores each top-1 bucket contiguously (stable: gallery order within a bucket)."""
    keys = bucket_keys(columns, bucket_by)
    if keys.shape[1] == 0:
        return np.arange(len(keys))
    return np.argsort(keys[:, 0], kind="stable")


class BucketTable:
    """Which gallery rows are in which bucket (CSR layout), for one membership M."""

    def __init__(self, keys: np.ndarray):
        keys = np.asarray(keys, dtype=np.int64)
        rows = np.repeat(np.arange(len(keys)), keys.shape[1])
        flat = keys.reshape(-1)
        order = np.argsort(flat, kind="stable")
        self.keys, starts = np.unique(flat[order], return_index=True)
        self.offsets = np.append(starts, len(flat))
        self.rows = rows[order]

    def rows_of(self, key: int) -> np.ndarray:
        """The bucket's rows, ascending (a contiguous run for a top-1 bucket of a grouped cache)."""
        i = np.searchsorted(self.keys, key)
        if i == len(self.keys) or self.keys[i] != key:
            return np.zeros(0, dtype=np.int64)
        return self.rows[self.offsets[i]:self.offsets[i + 1]]


def as_slice(rows: np.ndarray) -> slice | None:
    """`rows` as a slice when they are one ascending run (then a matrix read is a view, not a gather); None for any
    other order, a reordered run included ([1, 3, 2, 4])."""
    rows = np.asarray(rows)
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows) and bool((np.diff(rows) == 1).all()):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return None


def class_agreement(query_classes: np.ndarray, query_probs: np.ndarray,
                    gallery_classes: np.ndarray, gallery_probs: np.ndarray) -> np.ndarray:
    """[queries, rows] of p_q . p_g over the stored top-k classes of each side (the rest of the mass is ignored).

    The queries' classes are mapped to compact ids and each query's probabilities spread into a dense row, so the
    product is k gathers, not a k x k match; a gallery class no query has (found by a binary search among theirs,
    not a sort of the gallery's) adds nothing.
    """
    query_classes, gallery_classes = np.atleast_2d(query_classes), np.atleast_2d(gallery_classes)
    query_probs = np.atleast_2d(np.asarray(query_probs, np.float32))
    gallery_probs = np.asarray(gallery_probs, np.float32)
    queries = len(query_classes)
    ids, query_codes = np.unique(query_classes, return_inverse=True)
    dense = np.zeros((queries, len(ids) + 1), np.float32)  # the last column: a class no query has
    dense[np.arange(queries)[:, None], query_codes.reshape(query_classes.shape)] = query_probs
    gallery_codes = np.minimum(np.searchsorted(ids, gallery_classes), len(ids) - 1)
    gallery_codes[ids[gallery_codes] != gallery_classes] = len(ids)
    total = np.zeros((queries, len(gallery_classes)), np.float32)
    for j in range(gallery_classes.shape[1]):
        total += gallery_probs[:, j] * dense[:, gallery_codes[:, j]]
    return total
