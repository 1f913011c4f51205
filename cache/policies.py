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
  flat@W          the whole gallery ranked by cosine + W * p_q . p_g
  ...+soft:M      gallery images count in the buckets of their M most probable classes (default 1)
Re-ranking of the candidates (cache/rerank.py), in this order after the rest:
  ...+white       candidates ranked in the gallery's learned whitened space (cache/whitening.py; stored at build
                  time, so only a cache that stores it takes it), DBA, expansion and k-reciprocal included
  ...+dba:K[@a]   database-side augmentation: gallery vectors replaced by the normalised sum of their K nearest
                  gallery vectors (itself included) weighted by cosine^a (a = 0 by default); stored at build time
  ...+qe:K[@a]    alpha query expansion: the query plus its K best candidates weighted by cosine^a (a = 1), again
  ...+krecip:K1/K2  k-reciprocal re-ranking (Zhong et al. 2017) of the best rerank.POOL (100) candidates
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lookalike.models.errors import UserError

_PATTERN = re.compile(r"^(?P<kind>flat|top1|topk|fused)(?::(?P<n>\d+)(?:~(?P<t>[0-9.]+))?)?"
                      r"(?:@(?P<w>[0-9.]+))?(?:\+soft:(?P<m>\d+))?(?:\+(?P<white>white))?"
                      r"(?:\+dba:(?P<dk>\d+)(?:@(?P<da>[0-9.]+))?)?(?:\+qe:(?P<qk>\d+)(?:@(?P<qa>[0-9.]+))?)?"
                      r"(?:\+krecip:(?P<k1>\d+)/(?P<k2>\d+))?$")
FORMS = ("flat[@W], top1, topk:N[~T], fused[:N[~T]][@W], optionally followed by +soft:M, then re-ranking "
         "+white, +dba:K[@a], +qe:K[@a], +krecip:K1/K2")
QE_ALPHA = 1.0  # the expansion's weight exponent when qe:K is given without @a
# Limits on what a policy from a request may ask for (every entry point parses here): re-ranking sizes bound the
# work per query (a DBA of K neighbours, an expansion of K rows, k-reciprocal sets of K1), and decimals are finite.
MAX_RERANK_K = 100  # the largest K, K1 or K2 (auto's largest is 20; k-reciprocal's pool is 100)
MAX_DECIMAL = 10.0  # the largest W, a or T
MAX_POLICY_CHARS = 200


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
    dba: tuple[int, float] | None = None  # (K, a) of +dba:K@a
    qe: tuple[int, float] | None = None  # (K, a) of +qe:K@a
    krecip: tuple[int, int] | None = None  # (K1, K2) of +krecip:K1/K2
    white: bool = False  # +white: ranked in the learned whitened space the cache stores

    @property
    def uses_buckets(self) -> bool:
        return self.kind != "flat"

    @property
    def reranks(self) -> bool:
        """Whether candidates are scored beyond plain cosine (class term, DBA vectors, expansion, k-reciprocal)."""
        return bool(self.weight) or self.kind == "fused" or any((self.white, self.dba, self.qe, self.krecip))

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
        top1 = self.query_classes == 1 and self.nucleus is None
        text = {"flat": "flat", "topk": "top1" if top1 else f"topk:{self.query_classes}",
                "fused": f"fused:{self.query_classes}"}[self.kind]
        if self.nucleus is not None:
            text += f"~{_decimal(self.nucleus)}"
        if self.weight is not None:
            text += f"@{_decimal(self.weight)}"
        text += f"+soft:{self.gallery_classes}" if self.gallery_classes > 1 else ""
        text += "+white" if self.white else ""
        if self.dba:
            text += f"+dba:{self.dba[0]}" + (f"@{_decimal(self.dba[1])}" if self.dba[1] else "")
        if self.qe:
            text += f"+qe:{self.qe[0]}" + (f"@{_decimal(self.qe[1])}" if self.qe[1] != QE_ALPHA else "")
        return text + (f"+krecip:{self.krecip[0]}/{self.krecip[1]}" if self.krecip else "")


FLAT = BucketPolicy("flat")


def _decimal(value: float) -> str:
    """The shortest digits that read back as `value`, never in exponent form (1e-05), which the grammar lacks."""
    return np.format_float_positional(value, trim="-")


@lru_cache(maxsize=256)  # parsed once per text for every query that names it; bounded against hostile variety
def parse_policy(text: str) -> BucketPolicy:
    """Parse a policy string; ValueError naming the valid forms otherwise."""
    if len(text) > MAX_POLICY_CHARS:
        raise UserError(f"bucket policy of {len(text)} characters: the longest is {MAX_POLICY_CHARS}")
    match = _PATTERN.match(text.strip())
    if not match:
        raise UserError(f"unknown bucket policy {text!r}: use {FORMS}")
    kind, n, t, w, m = match["kind"], match["n"], match["t"], match["w"], match["m"]
    rerank = _rerank_parts(text, match)
    if kind == "flat":
        if n or m:
            raise UserError(f"bucket policy {text!r}: flat takes only a class weight (flat@W) and re-ranking")
        return BucketPolicy("flat", weight=_number(text, w, "W") if w else None, **rerank)
    if kind == "top1" and n:
        raise UserError(f"bucket policy {text!r}: write topk:{n} instead")
    if w and kind != "fused":
        raise UserError(f"bucket policy {text!r}: only fused and flat take a weight (@W)")
    if len(n or "") > 5 or len(m or "") > 5:
        raise UserError(f"bucket policy {text!r}: N and M must be at most 99999")
    query_classes = 1 if kind == "top1" else int(n or 3)
    gallery_classes = int(m or 1)
    if query_classes < 1 or gallery_classes < 1:
        raise UserError(f"bucket policy {text!r}: N and M must be at least 1")
    nucleus = _number(text, t, "T") if t else None
    if nucleus is not None and not 0 < nucleus <= 1:
        raise UserError(f"bucket policy {text!r}: the nucleus T is a probability in (0, 1]")
    return BucketPolicy("fused" if kind == "fused" else "topk", query_classes, gallery_classes,
                        _number(text, w, "W") if w else None, nucleus, **rerank)


def _rerank_parts(text: str, match: re.Match) -> dict:
    """The +white, +dba, +qe and +krecip parts of a policy as BucketPolicy fields."""
    parts = {"white": True} if match["white"] else {}
    if match["dk"]:
        parts["dba"] = (_size(text, match["dk"]), _number(text, match["da"], "a") if match["da"] else 0.0)
    if match["qk"]:
        parts["qe"] = (_size(text, match["qk"]), _number(text, match["qa"], "a") if match["qa"] else QE_ALPHA)
    if match["k1"]:
        parts["krecip"] = (_size(text, match["k1"]), _size(text, match["k2"]))
    return parts


def _size(text: str, digits: str) -> int:
    """A re-ranking size (K, K1 or K2) from 1 to MAX_RERANK_K; its digits are read only when few."""
    if len(digits) > 3 or not 1 <= int(digits) <= MAX_RERANK_K:
        raise UserError(f"bucket policy {text[:60]!r}: re-ranking sizes (K, K1, K2) must be from 1 to {MAX_RERANK_K}")
    return int(digits)


def _number(text: str, value: str, name: str) -> float:
    """A policy's decimal argument; '1.2.3' matches the pattern's digits-and-dots but is no number."""
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"bucket policy {text[:60]!r}: {name} must be a number, not '{value[:20]}'") from None
    if not 0 <= number <= MAX_DECIMAL:  # 400 nines read as infinity
        raise UserError(f"bucket policy {text[:60]!r}: {name} must be a number from 0 to {MAX_DECIMAL:g}")
    return number
