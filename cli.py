"""lookalike command line: parse, build a pipeline, print. No model logic lives here."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

# Heavy imports (torch, timm, faiss, ultralytics) happen inside the commands: --help stays instant.

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, RuntimeError)


def one_line_errors(command):
    """Turn user errors into one line on stderr and exit 1; Ctrl-C into exit 130. Never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is saved; run the same command again to resume", err=True)
            sys.exit(130)
        except USER_ERRORS as err:
            message = " ".join(str(err).split()) or type(err).__name__
            click.echo(f"error: {message}", err=True)
            sys.exit(1)

    return wrapper


def pipeline_options(defaults: bool):
    """Options shared by build-cache and benchmark-like commands; query leaves them unset (cache decides)."""
    from pipeline.config import PipelineConfig

    base = PipelineConfig()

    def default(name):
        return getattr(base, name) if defaults else None

    def decorate(command):
        options = [
            click.option("--classifier", default=default("classifier"),
                         help="effnet-b7, eva02, mobilenetv2, none, or timm:<model>[@weights]"),
            click.option("--embedder", default=default("embedder"),
                         help="clip, mobilenetv2, clip:<arch>/<tag>, timm:<model>, ckpt:<run_dir>"),
            click.option("--crop/--no-crop", default=default("crop"), help="crop to the main object (YOLO)"),
            click.option("--detector", default=default("detector"), help="yolov8n or a .pt path"),
            click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda"),
            click.option("--runtime", type=click.Choice(["torch", "onnx"]), default=default("runtime"),
                         help="onnx: ONNX Runtime on the CPU, used where it matches torch [default: torch]"),
            click.option("--batch-size", default=base.batch_size, show_default=True, type=int),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@click.group()
def cli():
    """lookalike: find the five most similar images in a gallery."""


@cli.command("build-cache")
@click.option("--gallery", required=True, type=click.Path(file_okay=False), help="folder of images")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), help='JSON {"file": "label"}')
@click.option("--out", required=True, type=click.Path(file_okay=False), help="cache folder")
@click.option("--bucket-by", type=click.Choice(["classifier", "label"]), default="classifier", show_default=True)
@click.option("--rebuild", is_flag=True, help="replace a cache built with another pipeline")
@pipeline_options(defaults=True)
@one_line_errors
def build_cache_command(gallery, labels_file, out, bucket_by, rebuild, **options):
    """Embed every image of a gallery into a cache (resumable, incremental)."""
    from cache.builder import build_cache
    from pipeline.config import PipelineConfig

    config = PipelineConfig(**options)
    summary = build_cache(gallery, out, config, labels_file, bucket_by, rebuild)
    for skipped in summary.skipped:
        click.echo(f"skipped {skipped['path']}: {skipped['reason']}", err=True)
    click.echo(summary.line())


def _print_table(item, gallery_root: Path, buckets: str) -> None:
    predicted = ", ".join(f"{p['name']} {p['prob']:.2f}" for p in item.predicted(3))
    click.echo(f"\n{item.path}" + (f"  [predicted: {predicted}]" if predicted else ""))
    click.echo(f"  buckets {buckets}: {item.candidates} gallery images compared")
    if item.note:
        click.echo(f"  note: {item.note}")
    click.echo(f"  {'rank':>4}  {'score':>6}  {'label':<16} {'bucket':<18} path (under {gallery_root})")
    for r in item.results:
        click.echo(f"  {r.rank:>4}  {r.score:6.3f}  {(r.label or '-')[:16]:<16} {(r.bucket or '-')[:18]:<18} {r.path}")


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False))
@click.option("--buckets", default=None,
              help="auto (the cache's choice), flat, top1, topk:N, fused[:N][@W], optionally +soft:M")
@click.option("-k", "k", default=5, show_default=True, type=int, help="results per query")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--sheet", type=click.Path(dir_okay=False), help="write a contact sheet PNG")
@pipeline_options(defaults=False)
@one_line_errors
def query(images, cache_dir, buckets, k, as_json, sheet, **options):
    """Find the k most similar gallery images for each query image."""
    from pipeline.query import open_query_pipeline
    from pipeline.sheets import Tile, contact_sheet

    if k < 1:
        raise ValueError(f"-k {k}: must be at least 1")
    overrides = dict(options, buckets=buckets, k=k)
    pipeline, config = open_query_pipeline(cache_dir, overrides)
    root = pipeline.stage("retrieve").searcher.data.gallery_root
    items = list(pipeline.run(list(images)))
    failed = [item for item in items if item.error]
    for item in failed:
        click.echo(f"error: {item.path}: {item.error}", err=True)
    done = [item for item in items if not item.error]
    if as_json:
        click.echo(json.dumps([{
            "query": item.path, "predicted": item.predicted(), "buckets": config.buckets,
            "candidates": item.candidates, "note": item.note,
            "results": [dict(r.to_dict(), path=str(root / r.path)) for r in item.results],
        } for item in done], indent=1))
    else:
        for item in done:
            _print_table(item, root, config.buckets)
    if sheet and done:
        rows = [[Tile(item.path, "query\n" + (item.class_names[0] if item.class_names else ""))]
                + [Tile(root / r.path, f"{r.rank}. {r.score:.3f}\n{r.label or r.bucket or ''}") for r in item.results]
                for item in done]
        click.echo(f"contact sheet: {contact_sheet(rows, sheet)}", err=True)
    if failed:
        sys.exit(1)


@cli.command()
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False))
@click.option("--threshold", type=float, help="locally scaled similarity (2 cos - each image's mean cosine to its 5 "
              "nearest) above which images are near-duplicates [default: measured for the cache's embedder]")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--sheet", type=click.Path(dir_okay=False), help="write a contact sheet PNG of the groups")
@one_line_errors
def duplicates(cache_dir, threshold, as_json, sheet):
    """Find groups of near-duplicate images (re-encodes, resizes, crops, small edits) in a cache."""
    from pipeline.duplicates import cache_duplicates, duplicate_sheet

    report = cache_duplicates(cache_dir, threshold)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        groups = report.to_dict()["groups"]
        rule = report.rule
        floor = f" and cosine > {rule.floor:g}" if rule.floor > -1 else ""
        sure = f", or cosine > {rule.sure:g}" if rule.sure is not None else ""
        click.echo(f"{len(groups)} groups of near-duplicates (scaled similarity > {rule.threshold:g}{floor}{sure}) "
                   f"under {report.data.gallery_root}")
        for number, group in enumerate(groups, 1):
            click.echo(f"\ngroup {number}: {len(group['members'])} images")
            for member in group["members"]:
                click.echo(f"  {member['best_cosine']:6.3f}  {member['path']}")
    if sheet:
        click.echo(f"contact sheet: {duplicate_sheet(report, sheet)}", err=True)


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


@cli.command()
@click.option("--data", help="labelled folder or zip (zip::inner/folder), split into gallery and queries")
@click.option("--query-fraction", default=0.2, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--gallery", help="explicit gallery folder/zip (with --queries)")
@click.option("--queries", help="explicit query folder/zip")
@click.option("--gallery-labels", type=click.Path(dir_okay=False), help='JSON {"file": "label"} for --gallery')
@click.option("--query-labels", type=click.Path(dir_okay=False), help='JSON {"file": "label"} for --queries')
@click.option("--classifier", default="none,mobilenetv2,effnet-b7,eva02", show_default=True, help="comma list")
@click.option("--embedder", default="mobilenetv2,clip", show_default=True, help="comma list")
@click.option("--buckets", default="flat,top1,topk:3,top1+soft:3,fused:10+soft:3,auto", show_default=True,
              help="comma list")
@click.option("--crop", default="off", show_default=True, help="off, on or off,on")
@click.option("--grid", "grid_file", type=click.Path(dir_okay=False), help="YAML/JSON grid instead of the lists")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@one_line_errors
def benchmark(data, query_fraction, seed, gallery, queries, gallery_labels, query_labels, classifier, embedder,
              buckets, crop, grid_file, device, out):
    """Compare configurations on a labelled image set: metrics, costs, report and plots."""
    from pipeline.benchmark import make_grid, read_grid_file, run_benchmark

    lists = {"classifier": _split(classifier), "embedder": _split(embedder), "buckets": _split(buckets),
             "crop": _split(crop)}
    if grid_file:
        lists.update(read_grid_file(grid_file))
    cells = make_grid(lists["classifier"], lists["embedder"], lists["buckets"], lists["crop"])
    report = run_benchmark(cells, out, data, query_fraction, seed, gallery, queries, gallery_labels, query_labels,
                           device)
    from pipeline.reports import markdown_table

    click.echo(markdown_table(report))
    click.echo(f"report: {Path(out) / 'report.md'}, {Path(out) / 'report.json'}, pictures in {out}")


def train_options(command):
    """The training options, with TrainConfig's defaults (pipeline.training.config imports no torch)."""
    from dataclasses import fields

    from pipeline.training.config import AUGMENTS, LOSSES, MINERS, TrainConfig

    default = {f.name: f.default for f in fields(TrainConfig)}
    options = [
        click.option("--loss", type=click.Choice(LOSSES), help="contrastive (siamese pairs) or triplet"),
        click.option("--data", help="labelled images: a folder, a .zip, or archive.zip::inner/folder"),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="run directory"),
        click.option("--val-data", help="validation images from another folder/zip (e.g. a val/ split)"),
        click.option("--labels", "labels_file", type=click.Path(dir_okay=False), help='JSON {"file": "label"}'),
        click.option("--backbone", default=default["backbone"], show_default=True,
                     help="mobilenetv2 (ImageNet, fine-tuned), small-cnn (greyscale, from scratch), pixels (baseline),"
                          " or timm:<model>[@weights.safetensors|@random]"),
        click.option("--embedding-size", default=default["embedding_size"], show_default=True, type=int,
                     help="projection size; 0 = the backbone's own features"),
        click.option("--image-size", help="SIZE or HEIGHTxWIDTH [default: the backbone's own]"),
        click.option("--margin", type=float, help="[default: 0.2 triplet, 0.5 contrastive negatives]"),
        click.option("--miner", type=click.Choice(MINERS), default=default["miner"], show_default=True,
                     help="batch-hard: hardest positive and negative per anchor; semi-hard: triplets (pairs, for"
                          " contrastive) inside the margin; all: every triplet or pair in the batch"),
        click.option("--pair-ratio", default=default["pair_ratio"], show_default=True,
                     help="contrastive: positive:negative pairs kept per batch"),
        click.option("--classes-per-batch", "-P", default=default["classes_per_batch"], show_default=True,
                     type=int, help="P labels per batch"),
        click.option("--images-per-class", "-K", default=default["images_per_class"], show_default=True,
                     type=int, help="K images per label"),
        click.option("--epochs", default=default["epochs"], show_default=True, type=int),
        click.option("--patience", default=default["patience"], show_default=True, type=int,
                     help="stop after this many epochs without a better validation MAP@R"),
        click.option("--lr", type=float, help="[default: 1e-4 for a pretrained backbone, 1e-3 from scratch]"),
        click.option("--weight-decay", default=default["weight_decay"], show_default=True, type=float),
        click.option("--augment", type=click.Choice(AUGMENTS), default=default["augment"], show_default=True,
                     help="trivial = horizontal flip + TrivialAugmentWide"),
        click.option("--seed", default=default["seed"], show_default=True, type=int),
        click.option("--holdout-labels", type=int, help="validate on N labels never trained on (chosen with --seed)"),
        click.option("--holdout-images", type=float, help="validate on this fraction of each label's images [0.2]"),
        click.option("--device", default=default["device"], show_default=True, help="auto, cpu or cuda"),
        click.option("--resume", is_flag=True, help="continue the interrupted run in --out"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@train_options
@one_line_errors
def train(resume, **options):
    """Fine-tune an embedder (contrastive or triplet loss); use it with --embedder ckpt:RUN_DIR."""
    from click.core import ParameterSource

    from pipeline.training.config import TrainConfig, parse_size
    from pipeline.training.loop import train as run_training

    options["image_size"] = parse_size(options["image_size"])
    echo = functools.partial(click.echo, err=True)
    if resume:
        context = click.get_current_context()
        given = {name: value for name, value in options.items()
                 if name != "out" and context.get_parameter_source(name) == ParameterSource.COMMANDLINE}
        result = run_training(resume_dir=Path(options["out"]), overrides=given, echo=echo)
    else:
        if not options["loss"] or not options["data"]:
            raise ValueError("--loss and --data are required (or --resume to continue a run)")
        result = run_training(TrainConfig(**options), echo=echo)
    shown = "  ".join(f"{key[4:]} {value:.3f}" for key, value in result.best.items() if key.startswith("val_"))
    click.echo(f"{result.run_dir}: best epoch {result.best_epoch} of {result.epochs_done}: {shown}"
               f"\nuse it with --embedder ckpt:{result.run_dir}")


@cli.command()
@click.option("--gallery", required=True, help="folder or .zip of images (a benchmark, not a test)")
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
@click.option("--queries", default=50, show_default=True, type=int, help="warm queries timed")
@click.option("--naive-images", default=200, show_default=True, type=int, help="images of the naive build")
@click.option("--cold-runs", default=3, show_default=True, type=int, help="cold query processes timed")
@click.option("--search-sizes", default="10000,100000,1000000", show_default=True,
              help="synthetic gallery sizes for search alone (comma list; 'none' to skip)")
@click.option("--forward-seconds", default=4.0, show_default=True, type=float, help="time per forward-only figure")
@click.option("--workers", default=2, show_default=True, type=int, help="decoding threads")
@pipeline_options(defaults=True)
@one_line_errors
def speed(gallery, as_json, queries, naive_images, cold_runs, search_sizes, forward_seconds, **options):
    """Measure forward-only, build-cache, naive build, query and search speed on this machine."""
    from pipeline.config import PipelineConfig
    from pipeline.speed import format_report, run_speed

    sizes = tuple(int(n) for n in _split(search_sizes) or [] if n != "none")
    echo = functools.partial(click.echo, err=True)
    report = run_speed(gallery, PipelineConfig(**options), queries, naive_images, cold_runs,
                       search_sizes=sizes, forward_seconds=forward_seconds, echo=echo)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(format_report(report, " ".join(["python", "cli.py", *sys.argv[1:]])))


if __name__ == "__main__":
    cli()
