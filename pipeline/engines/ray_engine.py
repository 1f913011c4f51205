"""RayEngine: build-cache's embedding on Ray Data, over this machine's cores or a cluster's nodes and GPUs.

Paths go out as a dataset; Ray tasks (processes, no GIL ceiling) decode each image and apply the stages'
per-image transforms, so every row holds fixed-size tensors; an actor pool runs the models, each actor loading
them once (one GPU per actor where there are GPUs). Finished batches stream back to the driver as Items and the
driver writes the cache, so workers need no write access, but every node must read the gallery at the same path.
A killed worker's batch is retried on a restarted actor (at most RETRIES times); a file that cannot be decoded
comes back with its reason, as in the local engine, and is never retried.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np

from lookalike.models.errors import UserError
from lookalike.models.files import user_cache_dir
from lookalike.pipeline.config import PipelineConfig
from lookalike.pipeline.items import Item
from lookalike.pipeline.pipeline import Pipeline, build_pipeline, load_item, output_shape

RETRIES = 3  # per batch, after its worker or actor process died (Ray Data's default: for ever); a decode error
# is an answer (the Item's `error`), not a failure
READ_BLOCK_BYTES = 64 << 20  # decoded bytes per decode task at most (~110 images of 224 px float tensors): per-task
# overhead made blocks of 16 images decode at 90 images/s and 128 at 125 (caltech101-22 on 2 cores, the local
# engine's rate), so blocks are as big as this allows ...
BLOCKS_PER_CPU = 4  # ... while every cluster CPU still gets this many blocks to decode
THREADS_PER_CPU_ACTOR = 4  # model threads of a CPU actor; the pool has one actor per this many cluster CPUs
ENV_PREFIXES = ("LOOKALIKE_", "HF_HUB_OFFLINE", "YOLO_OFFLINE")  # the driver's model settings, sent to workers


def _decode(batch: dict[str, np.ndarray], root: str, side: int, transforms: dict[str, Callable],
            shapes: dict[str, tuple[int, ...]], keep_pixels: bool) -> dict[str, np.ndarray]:
    """Ray task: decode paths and preprocess them as the local pipeline's loader threads do."""
    import torch

    torch.set_num_threads(1)
    items = [load_item(str(path), Path(root), side, transforms) for path in batch["path"]]
    out = {"path": batch["path"], "error": np.array([item.error or "" for item in items], dtype=object)}
    for name in transforms:
        blank = np.zeros(shapes[name], np.float32)  # an unreadable file's row: every block has one schema
        out[name] = np.stack([item.inputs[name].numpy() if item.error is None else blank for item in items])
    if keep_pixels:  # a crop stage needs the whole image: variable sizes travel as raw RGB bytes
        out["pixels"] = np.array([item.image.tobytes() if item.image else b"" for item in items], dtype=object)
        out["size"] = np.array([item.image.size if item.image else (0, 0) for item in items], np.int64)
    return out


def _bytes(array: np.ndarray | None) -> bytes:
    return b"" if array is None else np.ascontiguousarray(array).tobytes()


@contextmanager
def native_stderr_to(log: Path):
    """What C and C++ code writes to the process's stderr (Ray's core worker logs there) goes to `log` meanwhile;
    Python's sys.stderr (progress bars, lookalike's lines) still reaches the terminal."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(log, "ab") as handle:
        os.dup2(handle.fileno(), 2)
    python_stderr, sys.stderr = sys.stderr, os.fdopen(os.dup(terminal), "w", buffering=1)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = python_stderr
        os.dup2(terminal, 2)
        os.close(terminal)


class _Models:
    """Ray actor: the pipeline's stages, loaded once, run over decoded batches."""

    def __init__(self, config: dict, expected: dict, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.pipeline = build_pipeline(PipelineConfig.from_dict(config))
        found = self.pipeline.describe()
        if found != expected:
            from lookalike.cache.manifest import differences

            raise UserError(f"a Ray worker's models differ from the driver's ({'; '.join(differences(expected, found)[:3])}); "
                            "install the same lookalike and weights on every node")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        items = []
        for i, path in enumerate(batch["path"]):
            item = Item(str(path), error=str(batch["error"][i]) or None)
            if item.error is None:
                item.inputs = {name: torch.from_numpy(np.array(batch[name][i]))
                               for name in self.pipeline.transforms}
                if "pixels" in batch:
                    item.image = Image.frombytes("RGB", tuple(batch["size"][i]), batch["pixels"][i])
            items.append(item)
        self.pipeline.process(items)
        return {
            "path": batch["path"], "error": batch["error"],
            "box": np.array([item.box or (np.nan,) * 4 for item in items], np.float32),
            "embedding": np.array([_bytes(item.embedding) for item in items], dtype=object),
            "classes": np.array([_bytes(item.classes) for item in items], dtype=object),
            "probs": np.array([_bytes(item.probs) for item in items], dtype=object),
        }


def _items(batch: dict[str, np.ndarray]) -> list[Item]:
    """The actor's columns back as Items, as the local engine delivers them."""
    items = []
    for i, path in enumerate(batch["path"]):
        item = Item(str(path), error=str(batch["error"][i]) or None)
        if item.error is None:
            box = batch["box"][i]
            item.box = None if np.isnan(box).any() else tuple(float(v) for v in box)
            item.embedding = np.frombuffer(batch["embedding"][i], np.float32)
            if batch["classes"][i]:
                item.classes = np.frombuffer(batch["classes"][i], np.int32)
                item.probs = np.frombuffer(batch["probs"][i], np.float32)
        items.append(item)
    return items


class RayEngine:
    """Embeds images on Ray Data: a local Ray on this machine's cores (`address` None), or a running cluster
    (`address` 'auto' or 'ray://host:port'). Same Items, hence the same cache, as the local engine."""

    def __init__(self, config: PipelineConfig, address: str | None = None, pipeline: Pipeline | None = None,
                 actors: int | None = None, read_batch: int | None = None):
        self.config = config
        self.address = address
        self.actors = actors
        self.read_batch = read_batch
        if pipeline is not None:
            self.pipeline = pipeline  # the caller's, built from `config`

    @cached_property
    def pipeline(self) -> Pipeline:
        """The driver's copy of the pipeline (CPU, torch): the fingerprint, transforms and class names; it runs no
        forward here."""
        return build_pipeline(dataclasses.replace(self.config, device="cpu", runtime="torch"))

    def describe(self) -> dict:
        return self.pipeline.describe()

    def connect(self):
        """Start a local Ray, or join the cluster at `address`, unless this process is connected already. Ray's own
        messages stay in its log folder (/tmp/ray/session_*/logs): stderr is lookalike's, one line per problem."""
        import ray

        if not ray.is_initialized():
            env = {key: value for key, value in os.environ.items() if key.startswith(ENV_PREFIXES)}
            try:
                ray.init(address=self.address or "local", runtime_env={"env_vars": env}, logging_level="ERROR",
                         log_to_driver=False, include_dashboard=False if not self.address else None)
            except (ConnectionError, ValueError) as err:
                raise UserError(f"--ray-address {self.address}: cannot join a Ray cluster ({err})") from None
        ray.data.DataContext.get_current().enable_progress_bars = False
        for handler in logging.getLogger("ray.data").handlers:  # its file handler keeps everything
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.CRITICAL + 1)
        return ray

    def _actor_options(self, ray) -> dict:
        """One actor per GPU; without GPUs one per THREADS_PER_CPU_ACTOR cluster CPUs, leaving cores to decoding."""
        from ray.data import ActorPoolStrategy

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if gpus and self.config.device != "cpu":
            return {"compute": ActorPoolStrategy(min_size=1, max_size=self.actors or gpus), "num_gpus": 1,
                    "num_cpus": 1, "fn_constructor_kwargs": {"threads": 1}}
        if self.config.device.startswith("cuda"):
            raise UserError(f"--device {self.config.device}: the Ray cluster has no GPU")
        size = self.actors or max(1, cpus // THREADS_PER_CPU_ACTOR)
        threads = max(1, min(THREADS_PER_CPU_ACTOR, cpus // size))
        return {"compute": ActorPoolStrategy(min_size=1, max_size=size), "num_cpus": 1,
                "fn_constructor_kwargs": {"threads": threads}}

    def _read_batch(self, images: int, shapes: dict[str, tuple[int, ...]], ray) -> int:
        """Images per decode task: READ_BLOCK_BYTES of decoded rows, fewer when the cluster's CPUs would not each
        get BLOCKS_PER_CPU blocks."""
        row_bytes = sum(4 * int(np.prod(shape)) for shape in shapes.values()) or 3 * self.pipeline.decode_side ** 2
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return max(1, min(READ_BLOCK_BYTES // row_bytes, -(-images // (BLOCKS_PER_CPU * cpus))))

    def run(self, paths: list[str], root: Path, on_batch: Callable[[list[Item]], None]) -> None:
        """Deliver every path once as an Item (embedded, or with `error`), batch by batch as they finish."""
        if not paths:
            return
        ray = self.connect()
        expected = self.describe()
        options = self._actor_options(ray)
        options["fn_constructor_kwargs"].update(config=self.config.to_dict(), expected=expected)
        shapes = {name: output_shape(t) for name, t in self.pipeline.transforms.items()}
        read_batch = self.read_batch or self._read_batch(len(paths), shapes, ray)
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")  # retry limits: pinned below 2.64
        dataset = ray.data.from_items([{"path": path} for path in paths],
                                      override_num_blocks=max(1, -(-len(paths) // read_batch)))
        decoded = dataset.map_batches(
            _decode, batch_size=read_batch, num_cpus=1, max_retries=RETRIES,
            fn_kwargs={"root": str(root), "side": self.pipeline.decode_side, "transforms": self.pipeline.transforms,
                       "shapes": shapes,
                       "keep_pixels": not self.pipeline.transforms})
        embedded = decoded.map_batches(_Models, batch_size=self.config.batch_size, max_task_retries=RETRIES,
                                       **options)
        try:
            with native_stderr_to(user_cache_dir() / "ray-driver.log"):
                for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
                    on_batch(_items(batch))
        except ray.exceptions.RayError as err:  # one line: a worker's UserError as itself, else the last line
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            told = [line.split("UserError: ", 1)[1] for line in lines if "UserError: " in line]
            if told:
                raise UserError(told[-1]) from None
            raise RuntimeError(f"Ray build failed: {lines[-1] if lines else type(err).__name__}") from None
