"""Benchmark reports: the markdown table and the pictures (CMC, PR/ROC, score histograms, t-SNE, confusion, sheets)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lookalike.cache.policies import REFERENCE_POLICY  # noqa: E402
from lookalike.pipeline.sheets import Tile, contact_sheet  # noqa: E402

TABLE_METRICS = ("P@1", "P@5", "MAP@R", "mAP@10", "R-precision", "recall@5", "mean_rank", "MRR",
                 "bucket_hit_rate", "candidate_fraction")
TSNE_POINTS = 1000


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def markdown_table(report: dict) -> str:
    """One row per cell, best MAP@R first; the reference policy (top1) is marked with *."""

    head = ["classifier", "embedder", "buckets", "crop", *TABLE_METRICS, "query ms p50", "build img/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in report["cells"]:
        config = cell["config"]
        buckets = cell.get("policy", config["buckets"])
        if config["buckets"] == "auto" and "policy" in cell:
            buckets = f"auto = {buckets}"
        if config["buckets"] == REFERENCE_POLICY:
            buckets += " *"
        if cell["status"] != "ok":
            row = [config["classifier"], config["embedder"], buckets, config["crop"],
                   f"{cell['status']}: {cell['error'][:120]}"] + [""] * (len(head) - 5)
        else:
            metrics, cost = cell["metrics"], cell["cost"]
            row = [config["classifier"], config["embedder"], buckets, config["crop"],
                   *(_number(metrics[m]) for m in TABLE_METRICS), _number(cost["query_ms_p50"]),
                   _number(cost["build_images_per_s"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_markdown(report: dict, path: Path) -> None:
    data, env = report["data"], report["environment"]
    text = (f"# lookalike benchmark\n\n{data['gallery']} gallery images, {data['queries']} queries, "
            f"{data['labels']} labels (source: {data['source']}, seed {data['seed']}).\n"
            f"torch {env['torch']}, timm {env['timm']}, faiss {env['faiss']}, {env['torch_threads']} threads, "
            f"device {env['device']}.\n\n{markdown_table(report)}\n\n"
            "`*` marks the reference policy (search only the query's top-1 class bucket). build img/s is empty "
            "when the cache was reused.\n\n" + auto_lines(report))
    path.write_text(text)


def auto_lines(report: dict) -> str:
    """How each cache's `auto` was validated (exact score matrices, or the search path with an approximate k-NN
    graph above exact_max_rows) and what choosing it cost the build."""
    seen = {}
    for cell in report["cells"]:
        cost, config = cell.get("cost") or {}, cell["config"]
        if cost.get("auto_validated_on") or cost.get("cache_kept"):
            seen["/".join((config["classifier"], config["embedder"], f"crop-{config['crop']}"))] = cost
    return "".join(f"- `auto` of {group}: {_how_chosen(cost)}\n" for group, cost in seen.items())


def _how_chosen(cost: dict) -> str:
    if cost.get("cache_kept"):
        return "the cache of an earlier run, unchanged: not validated again"
    return f"validated on {cost['auto_validated_on']}, {cost['choose_policy_s']:.1f} s of the build"


def cmc_chart(curves: dict[str, np.ndarray], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab20")
    for i, (name, curve) in enumerate(sorted(curves.items(), key=lambda kv: -kv[1][0])):
        axis.plot(np.arange(1, len(curve) + 1), curve, marker=".", label=name, color=colours(i % 20),
                  linestyle="--" if "crop-on" in name else "-")
    axis.set(xlabel="rank k", ylabel="CMC@k (a relevant image within the top k)", title="CMC curves")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def group_pictures(run, cell, out: Path) -> None:
    """PR and ROC of pairwise query-gallery similarity, score histograms and a t-SNE of the gallery."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    columns = run.searcher.data.columns
    gallery = np.asarray(columns["embeddings"], np.float32)
    labels = np.asarray(columns["labels"])
    queries = np.stack([item.embedding for item in run.items]).astype(np.float32)
    similarity = (queries @ gallery.T).ravel()
    positive = (run.query_labels[:, None] == labels[None, :]).ravel()
    prefix = "-".join(cell.group).replace(":", "_").replace("/", "_").replace("@", "_")

    figure, (pr_axis, roc_axis) = plt.subplots(1, 2, figsize=(10, 4.5))
    precision, recall, _ = precision_recall_curve(positive, similarity)
    false_rate, true_rate, _ = roc_curve(positive, similarity)
    pr_axis.plot(recall, precision)
    pr_axis.set(xlabel="recall", ylabel="precision", title=f"PR of pair similarity (AUC {auc(recall, precision):.3f})")
    roc_axis.plot(false_rate, true_rate)
    roc_axis.plot([0, 1], [0, 1], ls="--", c="grey")
    roc_axis.set(xlabel="false positive rate", ylabel="true positive rate",
                 title=f"ROC (AUC {auc(false_rate, true_rate):.3f})")
    figure.suptitle(prefix)
    figure.tight_layout()
    figure.savefig(out / f"{prefix}-pr_roc.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(similarity[~positive], bins=80, alpha=0.6, density=True, label="different label")
    axis.hist(similarity[positive], bins=80, alpha=0.6, density=True, label="same label")
    axis.set(xlabel="cosine similarity", ylabel="density", title=f"{prefix}: positive vs negative pairs")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / f"{prefix}-scores.png", dpi=110)
    plt.close(figure)

    rows = np.random.default_rng(0).permutation(len(gallery))[:TSNE_POINTS]
    points = TSNE(init="pca", perplexity=min(30, max(2, len(rows) // 4)), random_state=0).fit_transform(gallery[rows])
    figure, axis = plt.subplots(figsize=(8, 7))
    names = sorted(set(labels[rows].tolist()))
    colours = plt.get_cmap("tab20", max(len(names), 1))
    for i, name in enumerate(names):
        chosen = labels[rows] == name
        axis.scatter(points[chosen, 0], points[chosen, 1], s=6, color=colours(i), label=name if len(names) <= 25 else None)
    if len(names) <= 25:
        axis.legend(fontsize=6, markerscale=2, loc="best")
    axis.set(title=f"{prefix}: t-SNE of {len(rows)} gallery embeddings", xticks=[], yticks=[])
    figure.tight_layout()
    figure.savefig(out / f"{prefix}-tsne.png", dpi=110)
    plt.close(figure)


def confusion_matrix(run, top_rows: list[np.ndarray], path: Path) -> None:
    """Query label vs the label of its top-1 result, rows normalised."""
    labels = np.asarray(run.searcher.data.columns["labels"])
    names = sorted(set(run.query_labels.tolist()) | set(labels.tolist()))
    index = {name: i for i, name in enumerate(names)}
    counts = np.zeros((len(names), len(names)))
    for query_label, rows in zip(run.query_labels, top_rows):
        if len(rows):
            counts[index[query_label], index[labels[rows[0]]]] += 1
    counts = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(5, 0.3 * len(names))
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(counts, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 40:
        axis.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        axis.set_yticks(range(len(names)), names, fontsize=6)
    axis.set(xlabel="label of the top-1 result", ylabel="query label", title="top-1 confusion")
    figure.colorbar(image)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def result_sheets(run, top_rows: list[np.ndarray], count: int, seed: int, path: Path) -> None:
    """A few random queries with their top 5, framed green (relevant) or red."""
    columns = run.searcher.data.columns
    root = run.searcher.data.gallery_root
    picks = np.random.default_rng(seed).permutation(len(run.items))[:count]
    rows = []
    for i in picks:
        item, label = run.items[i], run.query_labels[i]
        tiles = [Tile(item.path, f"query\n{label}")]
        for rank, row in enumerate(top_rows[i], start=1):
            result_label = str(columns["labels"][row])
            tiles.append(Tile(root / str(columns["paths"][row]), f"{rank}. {result_label}", result_label == label))
        rows.append(tiles)
    if rows:
        contact_sheet(rows, path)
