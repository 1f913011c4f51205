"""Device choice and the inference set-up every model shares."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from lookalike.models.errors import UserError

T = TypeVar("T")


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__}")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"--device {device}: use auto, cpu or cuda")
    return torch.device(device)


def has_conv(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) for m in model.modules())


def prepare_for_inference(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """eval mode on `device`; channels_last for convolutional nets (1.6-1.8x on CPU here)."""
    model = model.eval().to(device)
    if has_conv(model):
        model = model.to(memory_format=torch.channels_last)
    return model


def to_model_input(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Move a preprocessed batch to the model's device and memory layout (via pinned memory to a GPU)."""
    if device.type == "cuda" and not batch.is_pinned():
        batch = batch.pin_memory()  # page-locked: the copy below is a DMA that does not block the host
    batch = batch.to(device, non_blocking=True)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


MATCH_COSINE = 0.999  # the bar for a faster runtime or precision: cosine to the eager fp32 output
GPU_DTYPES = (torch.bfloat16, torch.float16)  # tried in this order on CUDA
PROBE_BATCH = 4


def outputs_match(fast: Sequence[torch.Tensor], eager: Sequence[torch.Tensor], logits: Sequence[bool]) -> str | None:
    """None when every output matches (cosine, and top-1 for logits); else what differs."""
    for i, (a, b, is_logits) in enumerate(zip(fast, eager, logits)):
        a, b = a.float().cpu(), b.float().cpu()
        cosine = torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min().item()
        if cosine < MATCH_COSINE:
            return f"output {i}: cosine {cosine:.5f} < {MATCH_COSINE}"
        if is_logits:
            top2 = b.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # a near-tie may flip either way in any runtime
            if not torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear]):
                return f"output {i}: a different top-1 class"
    return None


def probe_batch(input_shape: Sequence[int]) -> torch.Tensor:
    """A fixed batch of noise images in the model's input shape, for output checks."""
    return seeded(lambda: torch.randn(PROBE_BATCH, *input_shape))


class GpuPrecision:
    """The autocast precision of one model on CUDA, chosen on the first real batch it runs: the first of
    GPU_DTYPES whose outputs match fp32 on that batch, else fp32. (A noise probe is not enough: bf16 passed
    one for mobilenetv2, then gave cosine 0.985 to fp32 on photos; BENCHMARKS.md, GPU.) fp32 on the CPU."""

    def __init__(self, device: torch.device, logits: Sequence[bool]):
        self.logits = logits
        self.dtype: torch.dtype | None = None
        self.checked = device.type != "cuda"

    def __str__(self) -> str:
        return str(self.dtype or torch.float32).removeprefix("torch.") + ("" if self.checked else " (unchecked)")

    def run(self, module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`module(x)` as a tuple, under the chosen precision (choosing it on this batch the first time)."""
        def under(dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
            with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = module(x)
            return out if isinstance(out, tuple) else (out,)

        if self.checked:
            return under(self.dtype)
        self.checked = True
        reference = under(None)
        for dtype in GPU_DTYPES:
            out = under(dtype)
            if outputs_match(out, reference, self.logits) is None:
                self.dtype = dtype
                return out
        return reference


def seeded(fn: Callable[[], T], seed: int = 0) -> T:
    """Run `fn` with a fixed torch seed without disturbing the caller's RNG (random init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()
