"""Re-ranking study (issue 11): flat, DBA, aQE, DBA+aQE and k-reciprocal re-ranking, alone and with the `auto`
policy's candidates and class-probability term, on the benchmark's split of a shared dataset; plus a choice made
by leave-one-out on the gallery alone, and the extra cost per query.

The dataset is embedded once into a cache holding every image (build-cache over the whole set); the benchmark's
split (split_queries, 20 % of each label, seed 0) is re-made by path, so test queries never touch the choice.

  python scripts/rerank_study.py --data ../shared/data/caltech101-22.zip --cache runs/cache-cal --out runs/rerank/cal.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from lookalike.cache.autopolicy import Score, choose_policy, not_worse, validation_split
from lookalike.cache.buckets import class_agreement
from lookalike.cache.metrics import map_at_r, precision_at_k
from lookalike.cache.policies import BucketPolicy
from lookalike.cache.rerank import POOL, LeaveOneOutDBA, alpha_qe, k_reciprocal, nearest
from lookalike.cache.reranking import FixedGallery, HeldOutGallery, Reranked, RerankGallery, rerank
from lookalike.cache.columns import COLUMNS
from lookalike.cache.store import load_cache
from lookalike.pipeline.datasets import load_labelled, split_queries

DBA = ((1, 0.0), (2, 0.0), (3, 0.0), (5, 0.0), (10, 0.0), (5, 3.0), (10, 3.0), (20, 3.0))  # (k, alpha); k 1: none
QE = ((0, 0.0), (2, 1.0), (3, 1.0), (5, 1.0), (5, 3.0), (10, 1.0), (10, 3.0))  # (k, alpha); k 0: no expansion
K_RECIPROCAL = ((5, 2), (10, 4), (20, 6))  # (k1, k2), lambda 0.3


def select_rows(columns: dict, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The given rows of every cache column, in memory."""
    return {name: np.asarray(columns[name][rows]) for name in COLUMNS}


@dataclass(frozen=True)
class Method:
    dba_k: int = 1
    dba_alpha: float = 0.0
    qe_k: int = 0
    qe_alpha: float = 0.0
    k1: int = 0  # k-reciprocal re-ranking of the top POOL (0: none)
    k2: int = 0
    classes: str = ""  # '': cosine alone; 'term': + W * class agreement over the whole gallery; 'auto': the auto
    # policy's candidates and class term (W: the auto policy's weight)

    def __str__(self) -> str:
        parts = [f"dba:{self.dba_k}" + (f"@{self.dba_alpha:g}" if self.dba_alpha else "")] if self.dba_k > 1 else []
        parts += [f"qe:{self.qe_k}@{self.qe_alpha:g}"] if self.qe_k else []
        parts += [f"krecip:{self.k1},{self.k2}"] if self.k1 else []
        if self.classes:
            parts.insert(0, self.classes)
        return "+".join(parts) or "flat"


def methods() -> list[Method]:
    grid = [Method(k, a, qk, qa) for k, a in DBA for qk, qa in QE]
    grid += [Method(k, 0.0, 0, 0.0, k1, k2) for k in (1, 5) for k1, k2 in K_RECIPROCAL]
    return [Method(**dict(asdict(m), classes=c)) for c in ("", "term", "auto") for m in grid]


class Setting:
    """One gallery (vectors, labels, classes) and a set of queries, in test mode or leave-one-out mode."""

    def __init__(self, gallery: dict, queries: dict, policy: BucketPolicy, held_out: np.ndarray | None):
        self.g = np.asarray(gallery["embeddings"], np.float32)
        self.q = np.asarray(queries["embeddings"], np.float32)
        self.g_labels, self.q_labels = np.asarray(gallery["labels"]), np.asarray(queries["labels"])
        self.held_out = held_out
        self.n_relevant = (self.g_labels[None, :] == self.q_labels[:, None]).sum(axis=1) - (held_out is not None)
        self.policy = policy
        self.weight = policy.weight or 0.0
        g_classes, g_probs = np.asarray(gallery["classes"]), np.asarray(gallery["probs"])
        q_classes, q_probs = np.asarray(queries["classes"]), np.asarray(queries["probs"])
        self.agreement = class_agreement(q_classes, q_probs, g_classes, g_probs)
        if policy.uses_buckets:  # a gallery row is a candidate when one of its top M classes is among the query's
            used = np.broadcast_to(policy.classes_used(q_probs), len(q_classes))
            members = g_classes[:, :policy.gallery_classes]
            self.candidates = np.stack([np.isin(members, c[:u]).any(axis=1) for c, u in zip(q_classes, used)])
        else:
            self.candidates = np.ones((len(self.q), len(self.g)), bool)
        self._dba: dict[tuple, LeaveOneOutDBA] = {}

    def dba(self, k: int, alpha: float) -> LeaveOneOutDBA:
        if (k, alpha) not in self._dba:
            self._dba[(k, alpha)] = LeaveOneOutDBA(self.g, k, alpha)
        return self._dba[(k, alpha)]

    def _gallery(self, base: LeaveOneOutDBA) -> RerankGallery:
        return FixedGallery(base.augmented) if self.held_out is None else HeldOutGallery(base, self.held_out)

    def reranked(self, method: Method) -> Reranked:
        """The queries ranked under `method` by the search's re-ranking pipeline (without its copies-first step);
        -inf scores for rows that are not candidates."""
        gallery = self._gallery(self.dba(method.dba_k, method.dba_alpha))
        bonus = self.weight * self.agreement if method.classes else np.zeros_like(self.agreement)
        if method.classes == "auto":
            bonus = np.where(self.candidates, bonus, -np.inf)
        qe = (method.qe_k, method.qe_alpha) if method.qe_k else None
        krecip = (method.k1, method.k2) if method.k1 else None
        return rerank(gallery, self.q, gallery.similarities(self.q, np.arange(len(self.q))), bonus, qe, krecip)

    def score(self, method: Method) -> Score:
        final, ranked = self.reranked(method)
        relevance = (self.g_labels[ranked] == self.q_labels[:, None]) & np.isfinite(np.take_along_axis(final, ranked, 1))
        return Score(map_at_r(relevance, self.n_relevant), precision_at_k(relevance, self.n_relevant, 1),
                     relevance[:, 0], float(np.isfinite(final).mean()))


def per_query_ms(gallery: np.ndarray, queries: np.ndarray, method: Method, repeats: int = 200) -> float:
    """Median wall time of one query's search and re-ranking over the whole (augmented) gallery, in ms: a faiss
    search for the top 5, plus the expansion's second search, plus k-reciprocal over the pool."""
    times = []
    for query in queries[:repeats]:
        query = query[None]
        started = time.perf_counter()
        if method.qe_k:
            sims, ids = nearest(gallery, query, method.qe_k)
            query = alpha_qe(query, gallery[ids], sims, method.qe_alpha, method.qe_k)
        if method.k1:
            _, ids = nearest(gallery, query, POOL)
            k_reciprocal(query[0], gallery[ids[0]], method.k1, method.k2)
        else:
            nearest(gallery, query, 5)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def study(data: str, cache: str) -> dict:
    gallery_set, query_set = split_queries(load_labelled(data), 0.2, 0)
    columns = load_cache(cache, mmap=False).columns
    row_of = {str(p): i for i, p in enumerate(columns["paths"])}
    gallery = select_rows(columns, np.array([row_of[p] for p in gallery_set.paths]))
    queries = select_rows(columns, np.array([row_of[p] for p in query_set.paths]))
    started = time.perf_counter()
    policy = choose_policy(gallery, seed=0, rerank=False)  # the bucketed step: the baseline re-ranking builds on
    choose_seconds = time.perf_counter() - started
    _, loo_rows = validation_split(gallery["labels"], 0)
    test = Setting(gallery, queries, policy, None)
    loo = Setting(gallery, select_rows(gallery, loo_rows), policy, loo_rows)
    rows = []
    for method in methods():
        rows.append({"method": str(method), "config": asdict(method), "test": test.score(method),
                     "loo": loo.score(method)})
        print(f"{method}: test MAP@R {rows[-1]['test'].map_at_r:.3f} P@1 {rows[-1]['test'].p_at_1:.3f}"
              f"  loo {rows[-1]['loo'].map_at_r:.3f} / {rows[-1]['loo'].p_at_1:.3f}", flush=True)
    flat = next(r for r in rows if r["method"] == "flat")
    # Leave-one-out choice on the gallery alone: the best MAP@R among methods not worse than flat there.
    chosen = max((r for r in rows if not_worse(r["loo"], flat["loo"])), key=lambda r: r["loo"].map_at_r)
    timing = {}
    for method in {Method(), Method(**chosen["config"]), Method(qe_k=5, qe_alpha=3.0), Method(k1=20, k2=6)}:
        base = test.dba(method.dba_k, method.dba_alpha).augmented
        timing[str(method)] = per_query_ms(base, test.q, method)
    started = time.perf_counter()
    LeaveOneOutDBA(test.g, 5)
    dba_seconds = time.perf_counter() - started
    return {"data": data, "gallery": len(gallery_set), "queries": len(query_set), "loo_queries": len(loo_rows),
            "auto": str(policy), "auto_seconds": choose_seconds, "dba5_build_seconds": dba_seconds,
            "chosen": chosen["method"], "ms_per_query": timing,
            "rows": [dict(r, test=_plain(r["test"]), loo=_plain(r["loo"])) for r in rows]}


def _plain(score: Score) -> dict:
    return {"MAP@R": score.map_at_r, "P@1": score.p_at_1, "searched": score.candidates}


def markdown(result: dict, top: int = 8) -> str:
    """Per dataset: flat, auto, the leave-one-out choice, and the best test MAP@R of each family among the
    methods with test P@1 at least flat's (figures on the test queries; LOO on the gallery)."""
    rows = {r["method"]: r for r in result["rows"]}
    flat = rows["flat"]["test"]

    def family(r: dict) -> str:
        c = r["config"]
        parts = [p for p, on in (("DBA", c["dba_k"] > 1), ("aQE", c["qe_k"]), ("k-recip", c["k1"])) if on]
        return (c["classes"] + " " if c["classes"] else "") + ("+".join(parts) or "none")

    keeping = [r for r in result["rows"] if r["test"]["P@1"] >= flat["P@1"]]
    best: dict[str, dict] = {}
    for r in sorted(keeping, key=lambda r: -r["test"]["MAP@R"]):
        best.setdefault(family(r), r)
    lines = ["| method | why listed | test P@1 | test MAP@R | LOO P@1 | LOO MAP@R | searched |", "|---|---|---|---|---|---|---|"]
    shown = [(rows["flat"], "flat"), (rows["auto"], f"auto = {result['auto']}"),
             (rows[result["chosen"]], "leave-one-out choice")]
    shown += [(r, f"best {name} keeping P@1") for name, r in list(best.items())[:top]]
    for r, why in shown:
        t, l = r["test"], r["loo"]
        lines.append(f"| {r['method']} | {why} | {t['P@1']:.3f} | {t['MAP@R']:.3f} | {l['P@1']:.3f} | {l['MAP@R']:.3f} "
                     f"| {t['searched']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the labelled set (as benchmark --data)")
    parser.add_argument("--cache", help="a cache built over every image of that set")
    parser.add_argument("--out", help="JSON results")
    parser.add_argument("--markdown", nargs="+", help="print the tables of earlier JSON results instead")
    args = parser.parse_args()
    if args.markdown:
        for path in args.markdown:
            print(f"\n{path}\n\n" + markdown(json.loads(Path(path).read_text())))
        return
    result = study(args.data, args.cache)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"auto = {result['auto']}; leave-one-out choice: {result['chosen']}; ms/query {result['ms_per_query']}")


if __name__ == "__main__":
    main()
