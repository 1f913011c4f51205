"""\"Camera photos\": a gallery sample re-encoded as 12 MP JPEGs, built against the same photos at their own size."""
from __future__ import annotations

from pathlib import Path

CAMERA_SIZE = (4000, 3000)


def camera_galleries(root: Path, relpaths: list[str], folder: Path) -> tuple[Path, Path]:
    """(the photos as they are, the same photos as 12 MP camera JPEGs): two galleries of the same images and labels.

    The camera copies are upscaled and saved at quality 90, as a phone saves them; they are made here, never
    committed."""
    from PIL import Image

    small, camera = folder / "small", folder / "camera"
    for rel in relpaths:
        (small / rel).parent.mkdir(parents=True, exist_ok=True)
        (small / rel).symlink_to(root / rel)
        target = (camera / rel).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(root / rel) as image:
            image.convert("RGB").resize(CAMERA_SIZE, Image.BICUBIC).save(target, quality=90)
    return small, camera


def build_figures(gallery: Path, cache: Path, config, pipeline, engine=None) -> dict:
    """One build-cache of `gallery` into `cache`, timed: end to end, its phases and the embedding phase alone."""
    from lookalike.pipeline.build import build_cache

    summary = build_cache(gallery, cache, config, pipeline=pipeline, engine=engine)
    return {"images": summary.embedded, "seconds": summary.seconds, "images_per_s": summary.images_per_s,
            "skipped": len(summary.skipped), "phases_s": summary.phases,
            "embed_images_per_s": summary.embedded / summary.phases["embed"]}


def camera_figures(root: Path, relpaths: list[str], config, pipeline, engines: dict, folder: Path,
                   budget: dict | None = None) -> dict:
    """Build images/s of camera photos against the same photos at their own size, for each engine; on a CPU
    (`budget`: cpu_budget of the small photos) also each kind's preprocessing core-ms and the ratio the CPU allows."""
    from lookalike.pipeline.evaluation.speed.measure import preprocess_core_ms

    small, camera = camera_galleries(root, relpaths, folder)
    figures = {"images": len(relpaths), "size": list(CAMERA_SIZE)}
    if budget:
        sample = [str(Path(rel).with_suffix(".jpg")) for rel in relpaths[:30]]
        costs = {"small": preprocess_core_ms(pipeline, small, relpaths[:30]),
                 "camera": preprocess_core_ms(pipeline, camera, sample)}
        forward = budget["forward_core_ms"]
        figures["cpu_budget"] = {"preprocess_core_ms": costs,
                                 "camera_vs_small_bound": (forward + costs["small"]) / (forward + costs["camera"])}
    for name, engine in engines.items():
        built = {kind: build_figures(gallery, folder / f"cache-{name}-{kind}", config, pipeline, engine)
                 for kind, gallery in (("small", small), ("camera", camera))}
        figures[name] = dict(built, camera_vs_small=built["camera"]["images_per_s"] / built["small"]["images_per_s"])
    return figures
