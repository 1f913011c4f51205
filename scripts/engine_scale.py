"""Local against Ray engine on one gallery, end to end and embedding phase alone, each from a fresh cache:
how Ray's fixed start-up (worker processes, each actor loading its models) amortises as the gallery grows.

    HF_HUB_OFFLINE=1 LOOKALIKE_WEIGHTS=../shared/weights python scripts/engine_scale.py \
        ../shared/data/tiny-imagenet-20.zip --classifier mobilenetv2 --embedder mobilenetv2 --runtime onnx
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click


@click.command()
@click.argument("gallery")
@click.option("--classifier", default="mobilenetv2")
@click.option("--embedder", default="mobilenetv2")
@click.option("--runtime", type=click.Choice(["torch", "onnx"]), default="onnx")
def main(gallery: str, classifier: str, embedder: str, runtime: str) -> None:
    from lookalike.models.errors import UserError, one_line

    try:
        print(json.dumps(compare(gallery, classifier, embedder, runtime), indent=1))
    except (UserError, OSError) as err:  # a bad gallery or model name: one line, exit 1
        raise click.ClickException(one_line(err)) from None


def compare(gallery: str, classifier: str, embedder: str, runtime: str) -> dict:
    """Figures of one local and one Ray build of `gallery`, each into a fresh cache."""
    from lookalike.pipeline.config import PipelineConfig
    from lookalike.pipeline.datasets import resolve_data
    from lookalike.pipeline.engines import create_engine
    from lookalike.pipeline.evaluation.speed.camera import build_figures
    from lookalike.pipeline.pipeline import build_pipeline

    root = resolve_data(gallery)
    config = PipelineConfig(classifier=classifier, embedder=embedder, device="cpu", runtime=runtime)
    pipeline = build_pipeline(config)
    ray_engine = create_engine("ray", config, None, pipeline)
    ray_engine.connect()  # Ray itself starts before the clock, as in `speed --engine ray`
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, engine in (("local", None), ("ray", ray_engine)):
            figures[name] = build_figures(root, Path(tmp) / name, config, pipeline, engine)
    figures["ray_vs_local"] = figures["ray"]["images_per_s"] / figures["local"]["images_per_s"]
    figures["ray_vs_local_embed"] = figures["ray"]["embed_images_per_s"] / figures["local"]["embed_images_per_s"]
    return figures


if __name__ == "__main__":
    main()
