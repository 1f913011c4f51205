"""Learned whitening (Radenović et al., TPAMI 2018): one linear map, fitted on the labelled gallery, under which the
variation between images of one label is white, so the directions that tell labels apart dominate the cosine.

x -> unit((x - mean) @ P), P = C^(-1/2) of the within-label covariance C (each image minus its label's mean),
shrunk towards a multiple of the identity by the Ledoit-Wolf rule: with fewer images than dimensions (800 of 1,280
on tiny-imagenet-20) the plain covariance is singular. Radenović et al. follow it with a rotation
(PCA of the whitened space), which leaves cosines unchanged at full dimension, so it is left out.

`auto` adopts a `+white` policy only where leave-one-out validation says it wins, fitting the map without the
held-out queries (cache/autopolicy.py); the build then fits it on every labelled image and stores it beside the
rows (generation files whitening.npy and the `white` column).
"""
from __future__ import annotations

import numpy as np

from lookalike.models.outputs import unit_rows

FIT_ROWS = 100_000


def can_fit_whitening(labels: np.ndarray) -> bool:
    """Whether some label has two images (the within-label variation a whitening is fitted on)."""
    _, counts = np.unique(np.asarray(labels)[np.asarray(labels) != ""], return_counts=True)
    return bool((counts > 1).any())


def fit_whitening(vectors: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None,
                  seed: int = 0) -> np.ndarray | None:
    """The whitening learned from the labelled `vectors` (those of `rows`, all when None) as one [dim + 1, dim]
    float32 matrix: the mean, then P; None when no label has two images. Images without a label, and labels with
    one image (no within-label variation), do not shape it. Above FIT_ROWS images it is fitted on a seeded sample of
    them, gathered alone (at 10^6 rows the whole float64 pass held 8 GB)."""
    import scipy.sparse

    rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
    if len(rows) > FIT_ROWS:  # the covariance of a few hundred dimensions needs no more
        rows = np.sort(np.random.default_rng(seed).choice(rows, FIT_ROWS, replace=False))
    labels = np.asarray(labels)[rows]
    if not can_fit_whitening(labels):
        return None
    vectors = np.asarray(vectors[rows], np.float32)
    names, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    kept = (labels != "") & (counts[codes] > 1)
    codes = codes[kept]
    label_sums = scipy.sparse.csr_matrix((np.ones(len(codes), np.float32), (codes, np.flatnonzero(kept))),
                                         shape=(len(names), len(vectors)))
    means = np.asarray(label_sums @ vectors) / np.maximum(counts, 1)[:, None].astype(np.float32)
    covariance = ledoit_wolf(vectors[kept] - means[codes])
    values, axes = np.linalg.eigh(covariance)
    projection = axes / np.sqrt(np.maximum(values, values.max() * 1e-9))[None, :]
    return np.vstack([vectors.mean(axis=0, dtype=np.float64), projection]).astype(np.float32)


def ledoit_wolf(centred: np.ndarray) -> np.ndarray:
    """The Ledoit-Wolf shrunk covariance (Ledoit & Wolf 2004) of rows with mean zero, as scikit-learn's ledoit_wolf
    with assume_centered: (1 - s) S + s m I, where S = X'X / n, m = trace(S) / p and s = min(b, d) / d, with
    d = |S - m I|^2 / p and b = (sum_i |x_i|^4 / n - |S|^2) / (n p) (Frobenius norms). One [p, p] product and the
    rows' norms: scikit-learn makes a second product, of the squared rows, for the fourth moments (at 10^6 rows the
    fit took 5 s, its import 1 s of it; now 1 s)."""
    count, dim = centred.shape
    covariance = (centred.T @ centred).astype(np.float64) / count
    trace, squares = float(np.trace(covariance)), float(np.sum(covariance ** 2))
    mean_variance = trace / dim
    fourth = float(np.sum(np.einsum("ij,ij->i", centred, centred, dtype=np.float64) ** 2)) / count
    spread = (squares - 2.0 * mean_variance * trace + dim * mean_variance ** 2) / dim
    noise = min((fourth - squares) / (count * dim), spread)
    shrinkage = 0.0 if noise == 0 else noise / spread
    covariance *= 1.0 - shrinkage
    covariance.flat[::dim + 1] += shrinkage * mean_variance
    return covariance


def whiten(vectors: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """`vectors` [n, dim] (or one [dim]) in the whitened space, L2-normalised."""
    whitened = np.asarray(vectors, np.float32) @ whitening[1:]
    whitened -= whitening[0] @ whitening[1:]  # (x - mean) P without an [n, dim] x - mean: 10^6 rows in 4 s, not 7
    return unit_rows(whitened, in_place=True)
