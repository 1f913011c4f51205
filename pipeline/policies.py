"""Bucket policies: which part of the gallery a query searches, and how candidates are ranked.

Grammar (as typed on the command line):
  auto            the policy chosen for this gallery when the cache was built (pipeline/fusion.py)
  flat            search everything (no classifier needed)
  top1            the bucket of the query's most probable class (the reference behaviour)
  topk:N          the union of the buckets of the query's N most probable classes
  fused[:N][@W]   candidates as topk:N (default 3), ranked by cosine + W * p_q . p_g, the inner
                  product of the query's and the gallery image's class-probability vectors; W is
                  fitted on the gallery when omitted
  ...+soft:M      gallery images count in the buckets of their M most probable classes (default 1)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_PATTERN = re.compile(r"^(?P<kind>flat|top1|topk|fused)(?::(?P<n>\d+))?(?:@(?P<w>[0-9.]+))?"
                      r"(?:\+soft:(?P<m>\d+))?$")


AUTO = "auto"


def resolve_auto(text: str, manifest: dict) -> str:
    """`auto` -> the policy recorded in the cache (flat when none was chosen); other text unchanged."""
    return (manifest.get("default_buckets") or "flat") if text == AUTO else text


@dataclass(frozen=True)
class BucketPolicy:
    kind: str  # 'flat' | 'topk' | 'fused'
    query_classes: int = 1
    gallery_classes: int = 1
    weight: float | None = None

    @property
    def uses_buckets(self) -> bool:
        return self.kind != "flat"

    def __str__(self) -> str:
        if self.kind == "flat":
            return "flat"
        text = {"topk": "top1" if self.query_classes == 1 else f"topk:{self.query_classes}",
                "fused": f"fused:{self.query_classes}"}[self.kind]
        if self.weight is not None:
            text += f"@{self.weight:g}"
        return text + (f"+soft:{self.gallery_classes}" if self.gallery_classes > 1 else "")


def parse_policy(text: str) -> BucketPolicy:
    """Parse a policy string; ValueError naming the valid forms otherwise."""
    match = _PATTERN.match(text.strip())
    if not match:
        raise ValueError(f"unknown bucket policy '{text}': use flat, top1, topk:N, fused[:N][@W], "
                         "optionally followed by +soft:M")
    kind, n, w, m = match["kind"], match["n"], match["w"], match["m"]
    if kind == "flat":
        if n or w or m:
            raise ValueError(f"bucket policy '{text}': flat takes no arguments")
        return BucketPolicy("flat")
    if kind == "top1" and n:
        raise ValueError(f"bucket policy '{text}': write topk:{n} instead")
    if w and kind != "fused":
        raise ValueError(f"bucket policy '{text}': only fused takes a weight (@W)")
    query_classes = 1 if kind == "top1" else int(n or 3)
    gallery_classes = int(m or 1)
    if query_classes < 1 or gallery_classes < 1:
        raise ValueError(f"bucket policy '{text}': N and M must be at least 1")
    return BucketPolicy("fused" if kind == "fused" else "topk", query_classes, gallery_classes,
                        float(w) if w else None)
