"""Near-duplicate benchmark (issue 11): lookalike's embeddings against imagededup's hashes (and its CNN where it
runs offline) on near-duplicates generated from real photos, with distinct photos of the same classes as hard
negatives. Pair precision, recall and F1 at each method's default threshold and its best one, and time per 1,000
images.

Two disjoint sets are generated from caltech101-22 with seeded transformations: `tune` (seed 0) picks lookalike's
default threshold (best F1 there), `test` (seed 1, other photos) reports every figure.

  python scripts/dedup_benchmark.py --data ../shared/data/caltech101-22.zip --out runs/dedup
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from lookalike.cache.duplicates import find_duplicates, similar_pairs
from lookalike.cache.store import load_cache
from lookalike.pipeline.build import build_cache
from lookalike.pipeline.config import PipelineConfig
from lookalike.pipeline.datasets import load_labelled
from lookalike.pipeline.images import load_image

TRANSFORMS = ("resize", "jpeg", "crop", "rotate", "brightness_contrast", "text", "flip")
SETS = {"tune": (0, 100, 1000), "test": (1, 200, 900)}  # seed, originals (x3 versions), distinct photos
HASH_DEFAULT = 10  # imagededup's default max_distance_threshold (bits of 64)
FLOORS = (0.0, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)  # cosine floors tuned jointly with the scaled threshold
SURE = 0.95  # cosine above which every tune-set pair was a true one (precision 1.000 from 0.90 up): always a pair


def transform(image: Image.Image, name: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """One seeded edit; returns the image and the JPEG quality to save it with."""
    w, h = image.size
    quality = 95
    if name == "resize":
        scale = rng.uniform(0.3, 0.9)
        image = image.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.BILINEAR)
    elif name == "jpeg":
        quality = int(rng.integers(15, 91))
    elif name == "crop":
        fw, fh = rng.uniform(0.7, 0.95, 2)
        cw, ch = round(w * fw), round(h * fh)
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = image.crop((left, top, left + cw, top + ch))
    elif name == "rotate":
        image = image.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    elif name == "brightness_contrast":
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    elif name == "text":
        draw = ImageDraw.Draw(image)
        size = max(10, h // 8)
        font = ImageFont.load_default(size=size)
        text = str(rng.choice(["© lookalike", "SAMPLE", "2024-05-17", "photo: caltech"]))
        draw.text((int(rng.integers(0, max(1, w // 3))), int(rng.integers(0, max(1, h - size)))), text,
                  fill=tuple(int(v) for v in rng.integers(0, 256, 3)), font=font)
    elif name == "flip":
        image = ImageOps.mirror(image)
    return image, quality


def generate(data: str, out: Path, seed: int, originals: int, distinct: int, skip: set[str]) -> dict:
    """Write originals, two edited versions of each (one edit; two or three edits) and distinct photos into
    `out`; return the truth {file: family or None} and the source photos used."""
    photos = load_labelled(data)
    rng = np.random.default_rng(seed)
    order = [i for i in rng.permutation(len(photos)) if photos.paths[i] not in skip]
    chosen = order[:originals + distinct]
    out.mkdir(parents=True, exist_ok=True)
    truth, edits = {}, {}
    for n, index in enumerate(chosen):
        source = photos.root / photos.paths[index]
        image = load_image(source).convert("RGB")
        if n >= originals:
            name = f"distinct_{n:04d}.jpg"
            image.save(out / name, quality=95)
            truth[name] = None
            continue
        name = f"family{n:04d}_0.jpg"
        image.save(out / name, quality=95)
        truth[name] = n
        plans = [[TRANSFORMS[n % len(TRANSFORMS)]],
                 list(rng.choice(TRANSFORMS, size=int(rng.integers(2, 4)), replace=False))]
        for v, plan in enumerate(plans, 1):
            edited, quality = image.copy(), 95
            for step in plan:
                edited, q = transform(edited, step, rng)
                quality = min(quality, q)
            name = f"family{n:04d}_{v}.jpg"
            edited.save(out / name, quality=quality)
            truth[name] = n
            edits[name] = plan
    return {"truth": truth, "edits": edits, "sources": [photos.paths[i] for i in chosen]}


def true_pairs(files: list[str], truth: dict) -> set[tuple[str, str]]:
    families: dict[int, list[str]] = {}
    for f in files:
        if truth[f] is not None:
            families.setdefault(truth[f], []).append(f)
    return {tuple(sorted(p)) for members in families.values() for p in itertools.combinations(members, 2)}


@dataclass
class Scored:
    """Candidate pairs with a score: higher is more alike (cosine, or minus the Hamming distance)."""

    pairs: list[tuple[str, str]]
    scores: np.ndarray


def prf(found: set, truth: set) -> dict:
    hit = len(found & truth)
    precision = hit / len(found) if found else 0.0
    recall = hit / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "pairs": len(found)}


def at(scored: Scored, threshold: float, truth: set) -> dict:
    """Pairs scoring above `threshold` (as the duplicates command counts them)."""
    return prf({p for p, s in zip(scored.pairs, scored.scores) if s > threshold}, truth)


def best(scored: Scored, thresholds, truth: set) -> tuple[float, dict]:
    results = [(t, at(scored, t, truth)) for t in thresholds]
    return max(results, key=lambda r: r[1]["f1"])


def embed(folder: Path, cache: Path) -> tuple[list[str], np.ndarray, float]:
    """Embed the folder (mobilenetv2, ONNX Runtime) into a fresh cache: (files, vectors, seconds)."""
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    build_cache(folder, cache, PipelineConfig(classifier="mobilenetv2", embedder="mobilenetv2", runtime="onnx"))
    seconds = time.perf_counter() - started
    data = load_cache(cache, mmap=False)
    return [str(p) for p in data.columns["paths"]], np.asarray(data.columns["embeddings"], np.float32), seconds


def lookalike_scored(files: list[str], vectors: np.ndarray, sure: float, floor: float) -> Scored:
    """Every candidate pair with its locally scaled score (pairs above `sure` cosine always pass, pairs below
    `floor` never)."""
    i, j, cosine, score = similar_pairs(vectors, -np.inf, sure=sure)
    score = np.where(cosine > floor, score, -np.inf)
    return Scored([tuple(sorted((files[a], files[b]))) for a, b in zip(i, j)], np.where(cosine > sure, np.inf, score))


def cosine_scored(files: list[str], vectors: np.ndarray) -> Scored:
    """Every pair with its plain cosine (the rule before local scaling, for comparison)."""
    i, j = np.triu_indices(len(files), 1)
    cosine = np.einsum("nd,nd->n", vectors[i], vectors[j])
    return Scored([(files[a], files[b]) for a, b in zip(i, j)], cosine)


def hamming_scored(encodings: dict[str, str]) -> Scored:
    """Every pair with -(Hamming distance) as its score."""
    files = sorted(encodings)
    bits = np.array([[int(c, 16) >> k & 1 for c in encodings[f] for k in (3, 2, 1, 0)] for f in files], np.uint8)
    distance = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    i, j = np.triu_indices(len(files), 1)
    return Scored([(files[a], files[b]) for a, b in zip(i, j)], -distance[i, j].astype(np.float32))


def within_buckets(cache: Path, files: list[str], threshold: float, floor: float, truth: set) -> dict:
    """Pair P/R/F1 when pairs are searched only within the buckets of each image's top-M classes."""
    data = load_cache(cache, mmap=False)
    vectors = np.asarray(data.columns["embeddings"], np.float32)
    results = {}
    for m in (1, 3, 10):
        i, j, _, _ = similar_pairs(vectors, threshold, np.asarray(data.columns["classes"])[:, :m], SURE, floor)
        results[f"soft:{m}"] = prf({tuple(sorted((files[a], files[b]))) for a, b in zip(i, j)}, truth)
    return results


def imagededup_hash(method: str, folder: Path, truth: set) -> dict:
    from imagededup import methods

    hasher = getattr(methods, method)(verbose=False)
    started = time.perf_counter()
    encodings = hasher.encode_images(image_dir=str(folder))
    found = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=HASH_DEFAULT)
    seconds = time.perf_counter() - started
    default_pairs = {tuple(sorted((a, b))) for a, dups in found.items() for b in dups}
    scored = hamming_scored(encodings)
    threshold, best_result = best(scored, [-t - 0.5 for t in range(33)], truth)  # -d > -t-0.5: d <= t
    return {"default_threshold": f"distance <= {HASH_DEFAULT}", "default": prf(default_pairs, truth),
            "best_threshold": f"distance <= {round(-threshold - 0.5)}", "best": best_result,
            "seconds_per_1000": seconds / len(encodings) * 1000}


def imagededup_cnn_available() -> str | None:
    """None when imagededup's CNN can run offline, else why not (its torchvision weights are not on disk)."""
    import torch

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(folder.glob("mobilenet_v3_small-*.pth")) if folder.is_dir() else []
    return None if found else f"torchvision mobilenet_v3_small weights not in {folder}; CNN() would download them"


def run(data: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report, used = {}, set()
    results = {}
    for split, (seed, originals, distinct) in SETS.items():
        folder = out / split / "images"
        shutil.rmtree(folder, ignore_errors=True)
        made = generate(data, folder, seed, originals, distinct, used)
        used |= set(made["sources"])
        (out / split / "truth.json").write_text(json.dumps(made, indent=1))
        files, vectors, embed_seconds = embed(folder, out / split / "cache")
        truth = true_pairs(files, made["truth"])
        results[split] = (files, vectors, embed_seconds, truth, made)
    thresholds = np.round(np.arange(0.0, 0.5, 0.005), 3)
    tuning = {floor: best(lookalike_scored(*results["tune"][:2], SURE, floor), thresholds, results["tune"][3])
              for floor in FLOORS}
    floor = max(FLOORS, key=lambda f: tuning[f][1]["f1"])
    tuned, tune_result = tuning[floor]
    files, vectors, embed_seconds, truth, made = results["test"]
    scored = lookalike_scored(files, vectors, SURE, floor)
    started = time.perf_counter()
    groups = find_duplicates(vectors, float(tuned), sure=SURE, floor=floor)
    search_seconds = time.perf_counter() - started
    plain = {split: cosine_scored(results[split][0], results[split][1]) for split in SETS}
    cosines = np.round(np.arange(0.5, 0.991, 0.01), 2)
    plain_tuned, plain_tune = best(plain["tune"], cosines, results["tune"][3])
    plain_best_threshold, plain_best = best(plain["test"], cosines, truth)
    report["lookalike, cosine only"] = {
        "default_threshold": f"cosine > {plain_tuned:.2f} (best F1 on the tune set: {plain_tune['f1']:.3f})",
        "default": at(plain["test"], plain_tuned, truth), "best_threshold": f"cosine > {plain_best_threshold:.2f}",
        "best": plain_best, "seconds_per_1000": embed_seconds / len(files) * 1000}
    grouped = {tuple(sorted((files[a], files[b]))) for g in groups for a, b in itertools.combinations(g.rows, 2)}
    oracle_threshold, oracle = best(scored, thresholds, truth)
    per_edit = {}
    found = {p for p, s in zip(scored.pairs, scored.scores) if s >= tuned}
    for name in TRANSFORMS:  # recall of (original, single-edit version) pairs by edit
        pairs = {(f[:-5] + "0.jpg", f) for f, plan in made["edits"].items() if plan == [name] and f.endswith("_1.jpg")}
        per_edit[name] = {"pairs": len(pairs), "recall": len(pairs & found) / max(1, len(pairs))}
    report["lookalike"] = {
        "default_threshold": f"scaled > {tuned:.3f} and cosine > {floor} or cosine > {SURE} (best F1 on the tune set: "
                             f"{tune_result['f1']:.3f})",
        "tuning": {str(f): {"threshold": float(t), "f1": r["f1"]} for f, (t, r) in tuning.items()},
        "default": at(scored, tuned, truth), "default_groups": prf(grouped, truth),
        "best_threshold": f"scaled > {oracle_threshold:.3f} and cosine > {floor} or cosine > {SURE}", "best": oracle,
        "seconds_per_1000": (embed_seconds + search_seconds) / len(files) * 1000,
        "embed_seconds_per_1000": embed_seconds / len(files) * 1000, "per_edit_recall": per_edit,
        "within_buckets": within_buckets(out / "test" / "cache", files, float(tuned), floor, truth)}
    folder = out / "test" / "images"
    for method in ("PHash", "DHash", "WHash"):
        report[method] = imagededup_hash(method, folder, truth)
    reason = imagededup_cnn_available()
    report["CNN"] = {"skipped": reason} if reason else {"skipped": "available but not run by this script"}
    report["sets"] = {split: {"images": len(results[split][0]), "true_pairs": len(results[split][3]),
                              "seed": SETS[split][0]} for split in SETS}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="labelled photos (caltech101-22.zip)")
    parser.add_argument("--out", required=True, help="work folder (generated images, caches, report.json)")
    args = parser.parse_args()
    report = run(args.data, Path(args.out))
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=1))
    for method, result in report.items():
        if "default" in result:
            print(f"{method:10s} default {result['default_threshold']}: P {result['default']['precision']:.3f} "
                  f"R {result['default']['recall']:.3f} F1 {result['default']['f1']:.3f} | best "
                  f"{result['best_threshold']}: F1 {result['best']['f1']:.3f} | {result['seconds_per_1000']:.1f} s/1000")
        else:
            print(method, result)


if __name__ == "__main__":
    main()
