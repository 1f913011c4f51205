"""lookalike command line: parse, build a pipeline, print. No model logic lives here."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

if __name__ == "__main__" and "lookalike" not in sys.modules:
    # `python cli.py` in a checkout: this folder is the package `lookalike`, whatever copy is installed elsewhere.
    import importlib.util

    _spec = importlib.util.spec_from_file_location("lookalike", Path(__file__).with_name("__init__.py"),
                                                   submodule_search_locations=[str(Path(__file__).parent)])
    sys.modules["lookalike"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["lookalike"])

import click

from lookalike import __version__
from lookalike.models.errors import UserError, message_of
from lookalike.models.files import user_cache_dir

# Heavy imports (torch, timm, faiss, ultralytics) happen inside the commands: --help stays instant.

# Problems a user can fix: bad input, missing weights or files, a refused cache. Anything else is a bug.
USER_ERRORS = (UserError, OSError)


def _traceback_file() -> Path:
    """Where an unexpected error's full traceback is written (the user cache directory, else the temp folder)."""
    folder = user_cache_dir() / "errors"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    return folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"


def one_line_errors(command):
    """User errors become one line on stderr and exit 1; Ctrl-C exit 130; any other exception one line naming
    where its full traceback was written (or the traceback itself with --debug)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        ctrl_c = StopOnceOnCtrlC()
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is saved; run the same command again to resume", err=True)
            sys.exit(130)
        except USER_ERRORS as err:
            click.echo(f"error: {message_of(err)}", err=True)
            sys.exit(1)
        except Exception as err:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            path = _traceback_file()
            path.write_text(traceback.format_exc())
            message = message_of(err)[:300]
            click.echo(f"error: unexpected {type(err).__name__}: {message} (a bug: the full traceback is in {path}; "
                       "run with --debug to see it)", err=True)
            sys.exit(1)
        finally:
            ctrl_c.restore()

    return wrapper


class StopOnceOnCtrlC:
    """While a command runs, the first Ctrl-C stops it (KeyboardInterrupt: what is finished is saved on the way out);
    later ones, while that save runs, are held with one line instead of cutting the save short or printing a
    traceback. Off the main thread (tests, embedding) signals are not ours to handle."""

    def __init__(self):
        self.received = 0
        on_main_thread = threading.current_thread() is threading.main_thread()
        self.previous = signal.signal(signal.SIGINT, self.on_ctrl_c) if on_main_thread else None

    def on_ctrl_c(self, signum, frame) -> None:
        self.received += 1
        if self.received == 1:
            raise KeyboardInterrupt
        if self.received == 2:
            os.write(2, b"lookalike: stopping; the finished work is being saved, then it exits\n")

    def restore(self) -> None:
        """The previous handler back; after a Ctrl-C the process is exiting, and the rest of a burst is ignored
        (Python's own handler would raise during the exit, and the system's would kill it)."""
        if self.previous is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN if self.received else self.previous)


def pipeline_options(defaults: bool):
    """Options shared by build-cache and benchmark-like commands; query leaves them unset (cache decides)."""
    from lookalike.pipeline.config import PipelineConfig

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
            click.option("--runtime", type=click.Choice(["auto", "torch", "onnx"]), default=default("runtime"),
                         help="auto: ONNX Runtime on a CPU for each model whose export matches torch (a query runs "
                              "the cache's checked exports without torch), torch on a GPU [default: auto]"),
            click.option("--batch-size", default=base.batch_size, show_default=True, type=click.IntRange(min=1)),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def engine_options(command):
    """--engine and --ray-address, for every command that embeds a gallery."""
    command = click.option("--ray-address", default=None,
                           help="with --engine ray: 'auto' or ray://host:port joins a cluster [default: a local Ray]")(command)
    return click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                        help="ray: decode in Ray tasks and run the models in a Ray actor pool (pip install -e '.[ray]')")(command)


def milvus_options(command):
    """--milvus, --collection and --milvus-token: search the cache's rows in Milvus (written by export-milvus)."""
    command = click.option("--milvus-token", envvar="LOOKALIKE_MILVUS_TOKEN", default="",
                           help="Milvus credentials: user:password or an API key [env: LOOKALIKE_MILVUS_TOKEN]")(command)
    command = click.option("--collection", default="lookalike", show_default=True,
                           help="with --milvus: the collection export-milvus wrote")(command)
    return click.option("--milvus", "milvus_uri", help="search the rows in Milvus instead of locally: a Milvus Lite "
                        "file (rows.db) or a server (http://host:19530); pip install -e '.[milvus]'")(command)


def _milvus_target(uri: str | None, collection: str, token: str):
    """The Milvus collection a command searches, or None (the cache's own rows)."""
    if uri is None:
        return None
    from lookalike.cache.milvus import MilvusTarget

    return MilvusTarget(uri, collection, token)


class UsageLine(click.UsageError):
    """A usage error shown as one line naming the command, like every other lookalike error (exit 2)."""

    def show(self, file=None) -> None:
        where = f"{self.ctx.command_path}: " if self.ctx else ""
        click.echo(f"error: {where}{self.format_message()} (see --help)", err=True)


@contextlib.contextmanager
def usage_in_one_line():
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # the help text itself, not an error
    except click.UsageError as err:
        raise UsageLine(err.format_message(), err.ctx) from None


class OneLineGroup(click.Group):
    """Click's usage errors (three lines: usage, hint, error) become one line, in the group and its commands."""

    def make_context(self, *args, **kwargs):
        with usage_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with usage_in_one_line():
            return super().invoke(ctx)


class DropErrorRecords(logging.Filter):
    """Libraries (open_clip) log an error and then raise it: the raised one is reported, once, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


exact_max_rows_option = click.option(
    "--exact-max-rows", type=click.IntRange(min=1), default=None,
    help="above this many images (default 32,768) searches take an index's candidates and `auto` is validated "
         "through them, with DBA from an approximate k-NN graph; lower it to use that large-gallery path on a small set")


@click.group(cls=OneLineGroup)
@click.version_option(__version__, prog_name="lookalike")
@click.option("--debug", is_flag=True, help="show the full traceback of an unexpected error")
def cli(debug):
    """lookalike: find the five most similar images in a gallery."""
    logging.basicConfig(format="%(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(DropErrorRecords())


@cli.command("build-cache")
@click.option("--gallery", required=True, type=click.Path(file_okay=False), help="folder of images")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), help='JSON {"file": "label"}')
@click.option("--out", required=True, type=click.Path(file_okay=False), help="cache folder")
@click.option("--bucket-by", type=click.Choice(["classifier", "label"]), default="classifier", show_default=True)
@click.option("--rebuild", is_flag=True,
              help="embed every image again and replace the cache (one built with another pipeline, or damaged)")
@click.option("--index", default="auto", show_default=True,
              help="the index for large searches: auto (exact up to 32,768 images, then IVF, then IVF-PQ under "
                   "--index-memory), exact, ivf or ivfpq[:MEMORY]")
@click.option("--index-memory", default="4GB", show_default=True, help="RAM the index may take (auto, ivfpq)")
@click.option("--float16", is_flag=True, help="store the vectors as float16: half the disk and page cache (scores "
              "within ~1e-3 of float32's)")
@exact_max_rows_option
@engine_options
@pipeline_options(defaults=True)
@one_line_errors
def build_cache_command(gallery, labels_file, out, bucket_by, rebuild, index, index_memory, float16, exact_max_rows,
                        engine, ray_address, **options):
    """Embed every image of a gallery into a cache (resumable, incremental)."""
    import lookalike
    from lookalike.pipeline.build import ProgressBar

    with ProgressBar() as progress:
        report = lookalike.build(gallery, out, labels=labels_file, bucket_by=bucket_by, rebuild=rebuild,
                                 engine=engine, ray_address=ray_address, progress=progress, index=index,
                                 index_memory=index_memory, float16=float16, exact_max_rows=exact_max_rows,
                                 **options)
    for skipped in report.skipped:
        click.echo(f"skipped {skipped['path']}: {skipped['reason']}", err=True)
    click.echo(report.line())


def _check_sheet_folder(sheet: str | None) -> None:
    """--sheet's folder must exist, checked before any work: lookalike never creates folders where a typo points."""
    if sheet is not None and not Path(sheet).expanduser().parent.is_dir():
        raise UserError(f"--sheet {sheet}: the folder {Path(sheet).expanduser().parent} does not exist")


def _print_table(answer) -> None:
    predicted = ", ".join(f"{p.name} {p.prob:.2f}" for p in answer.predicted[:3])
    click.echo(f"\n{answer.query}" + (f"  [predicted: {predicted}]" if predicted else ""))
    click.echo(f"  buckets {answer.policy}: {answer.candidates} gallery images compared")
    if answer.note:
        click.echo(f"  note: {answer.note}")
    ranked = any(r.rank_score is not None for r in answer.results)  # fused: ranked by more than the cosine
    click.echo(f"  {'rank':>4}  {'cosine':>6}" + (f"  {'ranked by':>9}" if ranked else "")
               + f"  {'label':<16} {'bucket':<18} path (under {answer.gallery_root})")
    for r in answer.results:
        rank_score = f"  {r.rank_score:9.3f}" if ranked else ""
        click.echo(f"  {r.rank:>4}  {r.score:6.3f}{rank_score}  {(r.label or '-')[:16]:<16} "
                   f"{(r.bucket or '-')[:18]:<18} {r.path}")


@cli.command()
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--text", "texts", multiple=True, help="a text query (CLIP caches only); repeat for more")
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False))
@click.option("--buckets", default=None,
              help="auto (the cache's choice), flat, top1, topk:N, fused[:N][@W], optionally +soft:M")
@click.option("-k", "k", default=5, show_default=True, type=int, help="results per query")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--sheet", type=click.Path(dir_okay=False), help="write a contact sheet PNG")
@milvus_options
@pipeline_options(defaults=False)
@one_line_errors
def query(images, texts, cache_dir, buckets, k, as_json, sheet, milvus_uri, collection, milvus_token, **options):
    """Find the k most similar gallery images for each query image (or text, with a CLIP cache)."""
    _check_sheet_folder(sheet)
    import lookalike
    from lookalike.pipeline.sheets import Tile, contact_sheet

    if bool(images) == bool(texts):
        raise UserError("give query images or --text, not both and not neither")
    if texts and sheet:
        raise UserError("--sheet shows query images; it cannot be used with --text")
    index = lookalike.open(cache_dir, _milvus_target(milvus_uri, collection, milvus_token), **options)
    if texts:
        answers = index.query_text(list(texts), k)
    else:
        answers = index.query(list(images), k, buckets)
    failed = [answer for answer in answers if answer.error]
    for answer in failed:
        click.echo(f"error: {answer.query}: {answer.error}", err=True)
    done = [answer for answer in answers if not answer.error]
    if as_json:
        click.echo(json.dumps([answer.to_json() for answer in done], indent=1))
    else:
        for answer in done:
            _print_table(answer)
    if sheet and done:
        rows = [[Tile(answer.query, "query\n" + (answer.predicted[0].name if answer.predicted else ""))]
                + [Tile(answer.gallery_root / r.path, f"{r.rank}. {r.score:.3f}\n{r.label or r.bucket or ''}")
                   for r in answer.results]
                for answer in done]
        click.echo(f"contact sheet: {contact_sheet(rows, sheet)}", err=True)
    if failed:
        sys.exit(1)


@cli.command()
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 lets other machines in")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnx"]), default=None,
              help="auto: the cache's checked ONNX exports on the CPU, else torch [default: auto]")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="a host name the server answers to besides loopback and --host (repeat for more)")
@click.option("--token", envvar="LOOKALIKE_TOKEN", help="an access token every request must carry (the page asks "
              "for it once); needed to listen beyond loopback [env: LOOKALIKE_TOKEN]")
@click.option("--no-auth", is_flag=True, help="listen beyond loopback without a token (anyone who can reach it "
              "may query it)")
@click.option("--show-paths", is_flag=True,
              help="answer with absolute file paths (for a trusted local user; by default rows and gallery-relative "
                   "paths only)")
@milvus_options
@one_line_errors
def serve(cache_dir, host, port, device, runtime, allowed_hosts, token, no_auth, show_paths, milvus_uri, collection,
          milvus_token):
    """Search a cache from a web page (and an HTTP API) at http://HOST:PORT/."""
    try:
        from lookalike.pipeline.serve.app import create_app
        from lookalike.pipeline.serve.connections import run_server
    except ImportError as err:
        raise UserError(f"serve needs {err.name}, one of lookalike's dependencies: pip install lookalike") from None
    from lookalike.pipeline.serve.guard import is_loopback

    if not is_loopback(host) and not token and not no_auth:
        raise UserError(f"--host {host}: other machines could query this gallery; give --token TOKEN (the page "
                        "asks for it once) or --no-auth")
    app = create_app(cache_dir, {"device": device, "runtime": runtime}, show_paths=show_paths, host=host,
                     extra_hosts=allowed_hosts, token=token or None,
                     milvus=_milvus_target(milvus_uri, collection, milvus_token))
    click.echo(f"lookalike: {len(app.state.live.index)} gallery images; open http://{host}:{port}/", err=True)
    run_server(app, host, port)


@cli.command("export-milvus")
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False))
@click.option("--uri", required=True, help="a Milvus Lite file (rows.db) or a server (http://host:19530)")
@click.option("--collection", default="lookalike", show_default=True)
@click.option("--milvus-token", envvar="LOOKALIKE_MILVUS_TOKEN", default="",
              help="Milvus credentials: user:password or an API key [env: LOOKALIKE_MILVUS_TOKEN]")
@click.option("--index", "index_type", default="FLAT", show_default=True,
              help="made with the collection: FLAT (exact, the local search's answers), or an approximate one of "
                   "Milvus's: IVF_FLAT, HNSW, AUTOINDEX")
@click.option("--replace", is_flag=True, help="overwrite a collection that holds another pipeline's rows")
@one_line_errors
def export_milvus(cache_dir, uri, collection, milvus_token, index_type, replace):
    """Write a cache's rows to a Milvus collection (resumable; repeating it writes nothing), for query/serve --milvus."""
    import lookalike
    from lookalike.pipeline.build import ProgressBar

    with ProgressBar("exporting") as progress:
        report = lookalike.export_milvus(cache_dir, _milvus_target(uri, collection, milvus_token), replace, index_type,
                                         progress)
    click.echo(report.line())


@cli.command()
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False))
@click.option("--threshold", type=float, help="locally scaled similarity (2 cos - each image's mean cosine to its 5 "
              "nearest) above which images are near-duplicates [default: measured for the cache's embedder]")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--sheet", type=click.Path(dir_okay=False), help="write a contact sheet PNG of the groups")
@one_line_errors
def duplicates(cache_dir, threshold, as_json, sheet):
    """Find groups of near-duplicate images (re-encodes, resizes, crops, small edits) in a cache."""
    _check_sheet_folder(sheet)
    import lookalike
    from lookalike.pipeline.duplicates import duplicate_sheet

    report = lookalike.open(cache_dir).duplicates(threshold)
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
@click.option("--index", default="auto", show_default=True,
              help="build-cache's gallery index for every cache: auto, exact, ivf or ivfpq[:MEMORY] (ivf or ivfpq "
                   "search every gallery above 1,024 images through it)")
@exact_max_rows_option
@engine_options
@one_line_errors
def benchmark(data, query_fraction, seed, gallery, queries, gallery_labels, query_labels, classifier, embedder,
              buckets, crop, grid_file, device, out, index, exact_max_rows, engine, ray_address):
    """Compare configurations on a labelled image set: metrics, costs, report and plots."""
    from lookalike.pipeline.evaluation.benchmark import make_grid, read_grid_file, run_benchmark

    lists = {"classifier": _split(classifier), "embedder": _split(embedder), "buckets": _split(buckets),
             "crop": _split(crop)}
    if grid_file:
        lists.update(read_grid_file(grid_file))
    cells = make_grid(lists["classifier"], lists["embedder"], lists["buckets"], lists["crop"])
    report = run_benchmark(cells, out, data, query_fraction, seed, gallery, queries, gallery_labels, query_labels,
                           device, engine=engine, ray_address=ray_address, index=index,
                           exact_max_rows=exact_max_rows)
    from lookalike.pipeline.evaluation.reports import markdown_table

    click.echo(markdown_table(report))
    click.echo(f"report: {Path(out) / 'report.md'}, {Path(out) / 'report.json'}, pictures in {out}")


def train_options(command):
    """The training options, with TrainConfig's defaults (pipeline.training.config imports no torch)."""
    from dataclasses import fields

    from lookalike.pipeline.training.config import AUGMENTS, LOSSES, MINERS, TrainConfig

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

    from lookalike.pipeline.training.config import TrainConfig, parse_size
    from lookalike.pipeline.training.loop import train as run_training

    options["image_size"] = parse_size(options["image_size"])
    echo = functools.partial(click.echo, err=True)
    if resume:
        context = click.get_current_context()
        given = {name: value for name, value in options.items()
                 if name != "out" and context.get_parameter_source(name) == ParameterSource.COMMANDLINE}
        result = run_training(resume_dir=Path(options["out"]), overrides=given, echo=echo)
    else:
        if not options["loss"] or not options["data"]:
            raise UserError("--loss and --data are required (or --resume to continue a run)")
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
@click.option("--camera-images", default=100, show_default=True, type=int,
              help="gallery photos re-encoded at 4000x3000 for the camera-photo build (0 to skip)")
@engine_options
@pipeline_options(defaults=True)
@one_line_errors
def speed(gallery, as_json, queries, naive_images, cold_runs, search_sizes, forward_seconds, camera_images, engine,
          ray_address, **options):
    """Measure forward-only, build-cache, naive build, query and search speed on this machine."""
    from lookalike.pipeline.config import PipelineConfig
    from lookalike.pipeline.evaluation.speed import format_report, run_speed

    sizes = tuple(int(n) for n in _split(search_sizes) or [] if n != "none")
    echo = functools.partial(click.echo, err=True)
    report = run_speed(gallery, PipelineConfig(**options), queries, naive_images, cold_runs,
                       search_sizes=sizes, forward_seconds=forward_seconds, echo=echo, engine=engine,
                       ray_address=ray_address, camera_images=camera_images)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(format_report(report, " ".join(["python", "cli.py", *sys.argv[1:]])))


def main() -> None:
    """The `lookalike` console script and `python cli.py`."""
    cli()


if __name__ == "__main__":
    main()
