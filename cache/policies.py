"""Bucket policies: which part of the gallery a query searches, and how candidates are ranked.

Grammar (as typed on the command line):
  auto            the policy chosen for this gallery when the cache was built (cache/autopolicy.py)
  flat            search everything (no classifier needed)
  top1            the bucket of the query's most probable class (the reference behaviour)
  topk:N          the union of the buckets of the query's N most probable classes
  topk:N~T        a "nucleus" of them: the shortest prefix of the query's top N classes whose
                  probabilities add up to at least T (all N when they never do), so a confident
                  query searches one bucket and an unsure one several
  fused[:N[~T]][@W]
                  candidates as topk:N (default 3) or topk:N~T, ranked by cosine + W * p_q . p_g,
                  the inner product of the query's and the gallery image's class-probability
                  vectors; W is fitted on the gallery when omitted
  ...+soft:M      gallery images count in the buckets of their M most probable classes (default 1)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from models.errors import UserError

_PATTERN = re.compile(r"^(?P<kind>flat|top1|topk|fused)(?::(?P<n>\d+)(?:~(?P<t>[0-9.]+))?)?"
                      r"(?:@(?P<w>[0-9.]+))?(?:\+soft:(?P<m>\d+))?$")
FORMS = "flat, top1, topk:N[~T], fused[:N[~T]][@W], optionally followed by +soft:M"


AUTO = "auto"
REFERENCE_POLICY = "top1"  # the reference notebooks' behaviour: search the predicted class only


def resolve_auto(text: str, default_policy: str) -> str:
    """`auto` -> the policy recorded in the cache (`default_policy`); other text unchanged."""
    return default_policy if text == AUTO else text


@dataclass(frozen=True)
class BucketPolicy:
    kind: str  # 'flat' | 'topk' | 'fused'
    query_classes: int = 1
    gallery_classes: int = 1
    weight: float | None = None
    nucleus: float | None = None  # T of topk:N~T / fused:N~T: the query's classes up to this much probability

    @property
    def uses_buckets(self) -> bool:
        return self.kind != "flat"

    def classes_used(self, probs: np.ndarray | None) -> np.ndarray | int:
        """How many of the query's most probable classes pick its buckets (per row of `probs`, best first):
        N, or with a nucleus the shortest prefix of the top N whose probabilities reach T (N if none does)."""
        if self.nucleus is None:
            return self.query_classes
        if probs is None:
            raise ValueError(f"bucket policy {self}: a nucleus needs the query's class probabilities")
        top = np.asarray(probs, np.float32)[..., :self.query_classes]
        return np.minimum((np.cumsum(top, axis=-1) < np.float32(self.nucleus)).sum(axis=-1) + 1, top.shape[-1])

    def __str__(self) -> str:
        if self.kind == "flat":
            return "flat"
        top1 = self.query_classes == 1 and self.nucleus is None
        text = {"topk": "top1" if top1 else f"topk:{self.query_classes}",
                "fused": f"fused:{self.query_classes}"}[self.kind]
        if self.nucleus is not None:
            text += f"~{_decimal(self.nucleus)}"
        if self.weight is not None:
            text += f"@{_decimal(self.weight)}"
        return text + (f"+soft:{self.gallery_classes}" if self.gallery_classes > 1 else "")


FLAT = BucketPolicy("flat")


def _decimal(value: float) -> str:
    """The shortest digits that read back as `value`, never in exponent form (1e-05), which the grammar lacks."""
    return np.format_float_positional(value, trim="-")


def parse_policy(text: str) -> BucketPolicy:
    """Parse a policy string; ValueError naming the valid forms otherwise."""
    match = _PATTERN.match(text.strip())
    if not match:
        raise UserError(f"unknown bucket policy {text!r}: use {FORMS}")
    kind, n, t, w, m = match["kind"], match["n"], match["t"], match["w"], match["m"]
    if kind == "flat":
        if n or w or m:
            raise UserError(f"bucket policy {text!r}: flat takes no arguments")
        return BucketPolicy("flat")
    if kind == "top1" and n:
        raise UserError(f"bucket policy {text!r}: write topk:{n} instead")
    if w and kind != "fused":
        raise UserError(f"bucket policy {text!r}: only fused takes a weight (@W)")
    query_classes = 1 if kind == "top1" else int(n or 3)
    gallery_classes = int(m or 1)
    if query_classes < 1 or gallery_classes < 1:
        raise UserError(f"bucket policy {text!r}: N and M must be at least 1")
    nucleus = _number(text, t, "T") if t else None
    if nucleus is not None and not 0 < nucleus <= 1:
        raise UserError(f"bucket policy {text!r}: the nucleus T is a probability in (0, 1]")
    return BucketPolicy("fused" if kind == "fused" else "topk", query_classes, gallery_classes,
                        _number(text, w, "W") if w else None, nucleus)


def _number(text: str, value: str, name: str) -> float:
    """A policy's decimal argument; '1.2.3' matches the pattern's digits-and-dots but is no number."""
    try:
        return float(value)
    except ValueError:
        raise UserError(f"bucket policy {text!r}: {name} must be a number, not '{value}'") from None
