"""`--runtime onnx`: a model's forward exported once to ONNX and run by ONNX Runtime on the CPU.

Why: on this project's 2-core CPU, ONNX Runtime forwards mobilenetv2 about 4x as fast as eager torch
(102-114 vs 27 images/s batched in two runs; BENCHMARKS.md, Speed). Used only where it gives the same
answers: every export is checked against the eager fp32 forward on a probe batch (models/runtime.py
`outputs_match`: cosine >= 0.999 for every output vector, same top-1 for logits); a model that fails the
check, or cannot be exported, runs in torch and says why on stderr.
Exports are kept in $LOOKALIKE_CACHE_DIR/onnx (default ~/.cache/lookalike/onnx), keyed by the model's
identity (spec, weight hash, preprocessing), so a process exports a model once per weight file.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models import runtime as _runtime
from models.files import user_cache_dir

RUNTIMES = ("torch", "onnx")


def check_runtime(runtime: str, device: torch.device) -> None:
    """ValueError for an unknown runtime, or onnx on a GPU (ONNX Runtime here is the CPU build)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime {runtime}: use {' or '.join(RUNTIMES)}")
    if runtime == "onnx" and device.type != "cpu":
        raise ValueError(f"--runtime onnx runs on the CPU; on {device.type} use --runtime torch "
                         "(half-precision autocast)")


def export_dir() -> Path:
    return user_cache_dir() / "onnx"


class OnnxForward:
    """An ONNX Runtime session that takes a float32 NCHW batch and returns float32 CPU tensors."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle threads sleep instead of spinning: spinning took the cores from the image-decoding threads and
        # from torch (naive build 30 -> 13 images/s, warm query 29 -> 63 ms in one process; BENCHMARKS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        array = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        return tuple(torch.from_numpy(out) for out in self.session.run(None, {self.input_name: array}))


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, outputs: int) -> None:
    """Export with a dynamic batch axis; written to a temporary name, then renamed (atomic).

    The exporter switches the module to eval and afterwards calls `train(<the top module's old mode>)`, which
    is recursive: a wrapper left in training mode put every BatchNorm of the wrapped net into training mode,
    and the eager model then returned zero vectors. Each submodule's own mode is restored here.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    names = [f"out{i}" for i in range(outputs)]
    modes = {submodule: submodule.training for submodule in module.modules()}
    try:
        torch.onnx.export(module, (example,), str(tmp), input_names=["images"], output_names=names,
                          dynamic_axes={name: {0: "batch"} for name in ["images", *names]},
                          opset_version=17, dynamo=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        for submodule, training in modes.items():
            submodule.training = training


def onnx_forward(runtime: str, module: torch.nn.Module, input_shape: Sequence[int], identity: dict,
                 logits: Sequence[bool]) -> OnnxForward | None:
    """ONNX Runtime in place of `module` (eval, fp32, CPU) when `runtime` is 'onnx' and it matches; else None
    (the caller runs `module` in torch). `logits[i]` says whether output i holds class logits (top-1 must agree)."""
    if runtime != "onnx":
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ValueError("--runtime onnx needs onnxruntime and onnx: pip install 'lookalike[onnx]'") from None
    key = hashlib.sha256(json.dumps([identity, list(input_shape), torch.__version__], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    path = export_dir() / f"{key}.onnx"
    probe = _runtime.probe_batch(input_shape)
    try:
        with torch.inference_mode():
            eager = module(probe)
        eager = eager if isinstance(eager, tuple) else (eager,)
        if not path.is_file():
            _export(module, probe[:1], path, len(eager))
        forward = OnnxForward(path, torch.get_num_threads())
        mismatch = _runtime.outputs_match(forward(probe), eager, logits)
    except Exception as err:  # any export or session failure: the model still runs, in torch
        mismatch = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if mismatch:
        print(f"lookalike: --runtime onnx not used for {identity.get('spec', {}).get('name', 'model')} "
              f"({mismatch}); running in torch", file=sys.stderr)
        return None
    return forward
