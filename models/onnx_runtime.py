"""`--runtime onnx` (and `auto` on a CPU): a model's forward exported once to ONNX and run by ONNX Runtime.

Why: on this project's 2-core CPU, ONNX Runtime forwards mobilenetv2 about 4x as fast as eager torch
(102-114 vs 27 images/s batched in two runs; BENCHMARKS.md, Speed). Used only where it gives the same
answers: the export is checked against the eager fp32 forward on the first real batch (models/runtime.py
`outputs_match`: cosine >= 0.999 for every output vector, same top-1 for logits; a noise probe is not enough,
a planted export may agree on noise and not on photos); a model that fails the check, or cannot be exported,
runs in torch and says why on stderr.
Exports are kept in $LOOKALIKE_CACHE_DIR/onnx (default ~/.cache/lookalike/onnx), keyed by the model's
identity (spec, weight hash, preprocessing), so a process exports a model once per weight file. An export is
data, never trusted as such: it is written atomically with its sha256 beside it (`<key>.onnx.sha256`), and one
whose bytes no longer match that hash, or that fails the check, is exported again from the model. A checked
export's sha256 (of the bytes the session was made from) goes into the cache's manifest (`record`), and a query
runs that export alone, without torch (models/recorded.py).
"""
from __future__ import annotations

import hashlib
import json
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from lookalike.models import runtime as _runtime
from lookalike.models.errors import UserError, one_line
from lookalike.models.files import atomic_write, write_text_atomic
from lookalike.models.files import read_hashed
from lookalike.models.onnx_session import export_dir, session_from_bytes
from lookalike.models.outputs import l2_normalize
from lookalike.models.weights import file_sha256

RUNTIMES = ("auto", "torch", "onnx")


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """'torch' or 'onnx' for `runtime` on `device`: 'auto' is ONNX Runtime on a CPU (each model still checked
    against eager fp32, falling back to torch by itself) and torch on a GPU (half precision where it matches).
    UserError for an unknown runtime, or onnx on a GPU (ONNX Runtime here is the CPU build)."""
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime}: use {', '.join(RUNTIMES)}")
    if runtime == "onnx" and device.type != "cpu":
        raise UserError(f"--runtime onnx runs on the CPU; on {device.type} use --runtime torch "
                         "(half-precision autocast)")
    if runtime == "auto":
        return "onnx" if device.type == "cpu" else "torch"
    return runtime


class OnnxSession:
    """An ONNX Runtime session that takes a float32 NCHW batch and returns float32 CPU tensors. `sha256` is that of
    the bytes the session was made from."""

    def __init__(self, path: Path, threads: int):
        data, self.sha256 = read_hashed(path)
        self.session = session_from_bytes(data, threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        array = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        return tuple(torch.from_numpy(out) for out in self.session.run(None, {self.input_name: array}))


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, outputs: int) -> None:
    """Export with a dynamic batch axis, written atomically, then its sha256 beside it.

    The exporter switches the module to eval and afterwards calls `train(<the top module's old mode>)`, which
    is recursive: a wrapper left in training mode put every BatchNorm of the wrapped net into training mode,
    and the eager model then returned zero vectors. Each submodule's own mode is restored here.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"out{i}" for i in range(outputs)]
    modes = {submodule: submodule.training for submodule in module.modules()}
    try:
        with warnings.catch_warnings():  # the tracer's warnings say nothing a user can act on: the check decides
            warnings.simplefilter("ignore")
            atomic_write(path, lambda tmp: torch.onnx.export(
                module, (example,), str(tmp), input_names=["images"], output_names=names,
                dynamic_axes={name: {0: "batch"} for name in ["images", *names]}, opset_version=17, dynamo=False))
    finally:
        for submodule, training in modes.items():
            submodule.training = training
    write_text_atomic(_digest_path(path), file_sha256(path))


def _intact(path: Path) -> bool:
    """Whether `path` holds the bytes its recorded sha256 names (not missing, truncated or damaged)."""
    try:
        return _digest_path(path).read_text().strip() == file_sha256(path)
    except OSError:
        return False


class OnnxForward:
    """`module`'s forward (eval, fp32, CPU) by ONNX Runtime, used once it gave eager torch's answers on the first
    real batch. A mismatch with an export from an earlier run exports again from `module` and checks that on the
    same batch; when the check still fails, or export or session fail, every batch runs in torch."""

    def __init__(self, module: torch.nn.Module, input_shape: Sequence[int], identity: dict, logits: Sequence[bool],
                 name: str):
        self.module, self.logits, self.name = module, logits, name
        self.channels_last = _runtime.has_conv(module)
        self.example = _runtime.probe_batch(input_shape)[:1]  # traced through for the export, never compared
        key = hashlib.sha256(json.dumps([identity, list(input_shape), torch.__version__], sort_keys=True,
                                        default=str).encode()).hexdigest()[:16]
        self.path = export_dir() / f"{key}.onnx"
        self.session: OnnxSession | None = None
        self.exported = False  # made by this process from `module` (else an earlier run's file, unproven)
        self.checked = False
        self._checking = threading.Lock()
        try:
            self._open(fresh=not _intact(self.path))
        except Exception as err:  # any export or session failure: the model still runs, in torch
            self._give_up(one_line(err))

    @property
    def in_use(self) -> bool:
        return self.session is not None

    def record(self) -> dict | None:
        """The export as a cache's manifest records it (file name, sha256 of the bytes loaded), once it gave eager
        torch's answers on a real batch; None before that, or when the model runs in torch."""
        if self.session is None or not self.checked:
            return None
        return {"file": self.path.name, "sha256": self.session.sha256}

    def _open(self, fresh: bool) -> None:
        if fresh:
            _export(self.module, self.example, self.path, len(self.logits))
            self.exported = True
        self.session = OnnxSession(self.path, torch.get_num_threads())

    def _give_up(self, why: str) -> None:
        self.session = None
        print(f"lookalike: --runtime onnx not used for {self.name} ({why}); running in torch", file=sys.stderr)

    def _eager(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            out = self.module(_runtime.to_model_input(batch, torch.device("cpu"), self.channels_last))
        return out if isinstance(out, tuple) else (out,)

    def _mismatch(self, batch: torch.Tensor, eager: tuple[torch.Tensor, ...]) -> str | None:
        """What differs between ONNX Runtime and `eager` on the real batch, and on its first image alone and its first
        odd number of images (an export planted to misbehave at other batch sizes); None if nothing."""
        sizes = dict.fromkeys([len(batch), 1, max(1, len(batch) - 1 - len(batch) % 2)])
        for size in sizes:
            found = _runtime.outputs_match(self.session(batch[:size]), tuple(out[:size] for out in eager), self.logits)
            if found:
                return found if size == len(batch) else f"{found} (batch of {size})"
        return None

    def _check(self, batch: torch.Tensor, eager: tuple[torch.Tensor, ...]) -> str | None:
        """What differs between ONNX Runtime and `eager` on `batch`, after one fresh export if needed; None if nothing."""
        mismatch = self._mismatch(batch, eager)
        if mismatch and not self.exported:  # an earlier run's export: stale, or planted to agree on noise only
            self._open(fresh=True)
            mismatch = self._mismatch(batch, eager)
        return mismatch

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs for a preprocessed CPU batch; the first batch is checked against (and answered by) torch.
        Safe from several threads: one checks, the others wait for its verdict."""
        if not self.checked:
            with self._checking:
                if not self.checked:
                    return self._first(batch)
        session = self.session
        return session(batch) if session is not None else self._eager(batch)

    def _first(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        eager = self._eager(batch)
        if self.session is not None:
            try:
                mismatch = self._check(batch, eager)
            except Exception as err:  # a file that loads but does not run, or a failed re-export
                mismatch = one_line(err)
            if mismatch:
                self._give_up(mismatch)
        self.checked = True
        return eager


def embed_with(onnx: Callable[[torch.Tensor], list[np.ndarray]] | None, eager: Callable[[torch.Tensor], torch.Tensor],
               batch: torch.Tensor, model: str) -> np.ndarray:
    """Unit-length embeddings of `batch`: from the model's checked ONNX export when it has one, else from its eager
    torch forward (in inference mode). The one "ONNX or torch" rule of the embedders that are not a TimmNet
    (models/embedders.py, models/finetuned.py)."""
    if onnx is not None:
        return l2_normalize(onnx(batch)[0], model)
    with torch.inference_mode():
        features = eager(batch)
    return l2_normalize(features.cpu(), model)


def onnx_forward(runtime: str, module: torch.nn.Module, input_shape: Sequence[int], identity: Callable[[], dict],
                 logits: Sequence[bool], name: str) -> OnnxForward | None:
    """ONNX Runtime in place of `module` when `runtime` (resolved: resolve_runtime) is 'onnx' (it falls back to
    torch by itself); else None (the caller runs `module` in torch). `logits[i]` says whether output i holds class logits (top-1 must agree).
    `identity` (the model's description, which hashes its weight file) is called only when an export is keyed."""
    if runtime != "onnx":
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("--runtime onnx needs onnxruntime and onnx (lookalike's own dependencies): pip install lookalike") from None
    return OnnxForward(module, input_shape, identity(), logits, name)
