"""Training an embedder with contrastive (siamese) or triplet loss; the result is a run directory.

A run directory holds `config.json` (the network, its preprocessing and every training option),
`model.safetensors` (the weights with the best validation MAP@R so far), `last.pt` (model,
optimiser, epoch, history and RNG states: what `--resume` continues from), `metrics.csv` (one row
per epoch; epoch 0 is the network before any training, the baseline to beat) and `curves.png`.

Validation is leave-one-out retrieval among the validation images: each image queries all the
others, and relevance is sharing its label. Losses, miners and P×K batches come from
pytorch-metric-learning.
"""
from __future__ import annotations

import csv
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lookalike.cache.metrics import METRICS, leave_one_out
from lookalike.models.embedding_nets import EmbeddingNet, Preprocessing, build_net, describe_backbone, is_pretrained
from lookalike.models.errors import UserError
from lookalike.models.files import atomic_write
from lookalike.models.run_directory import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, read_run_config
from lookalike.models.outputs import l2_normalize
from lookalike.models.runtime import resolve_device
from lookalike.pipeline.datasets import LabelledSet, load_labelled, split_labels, split_queries
from lookalike.pipeline.images import ImageLoadError, load_image
from lookalike.pipeline.training.config import DEFAULT_LR, RESUME_OVERRIDES, TrainConfig, parse_ratio
from lookalike.pipeline.training.objective import Objective

VAL_METRICS = ("P@1", "MAP@R", "R-precision", "mean_rank")
STATE_FILE = "last.pt"
METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"

Echo = Callable[[str], None]


# ---------------------------------------------------------------- data


@dataclass
class Decoded:
    """A labelled set decoded once and resized: uint8 pixels [N, C, H, W] and integer labels."""

    pixels: torch.Tensor
    labels: torch.Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def split_data(config: TrainConfig) -> tuple[LabelledSet, LabelledSet]:
    """(train, validation): held-out labels, held-out images per label, or a separate --val-data set."""
    data = load_labelled(config.data, config.labels_file)
    if config.holdout_labels is not None:
        train, val = split_labels(data, config.holdout_labels, config.seed)
        if config.val_data:
            held = set(val.labels)
            other = load_labelled(config.val_data)
            val = other.subset([i for i, label in enumerate(other.labels) if label in held])
            if not len(val):
                raise UserError(f"--val-data {config.val_data}: no images of the held-out labels")
        return train, val
    if config.val_data:
        if config.holdout_images is not None:
            raise UserError("--val-data and --holdout-images: choose one validation set")
        return data, load_labelled(config.val_data)
    return split_queries(data, config.holdout_images if config.holdout_images is not None else 0.2, config.seed)


def decode(data: LabelledSet, preprocessing: Preprocessing, what: str, echo: Echo) -> Decoded:
    """Decode and resize every image once; unreadable ones are skipped and reported."""
    from tqdm import tqdm

    pixels, labels = [], []
    for path, label in tqdm(list(zip(data.paths, data.labels)), desc=f"decoding {what}", leave=False):
        try:
            pixels.append(preprocessing.resize(load_image(data.root / path)))
            labels.append(label)
        except ImageLoadError as err:
            echo(f"skipped {err}")
    names = sorted(set(labels))
    codes = {name: i for i, name in enumerate(names)}
    if not pixels:
        raise UserError(f"no readable {what} images")
    return Decoded(torch.stack(pixels), torch.tensor([codes[label] for label in labels]), names)


def trainable(data: LabelledSet, echo: Echo) -> LabelledSet:
    """Drop (and report) labels with a single image: they can form no positive pair or triplet."""
    counts = Counter(data.labels)
    single = sorted(label for label, count in counts.items() if count < 2)
    if single:
        echo(f"excluded from training (a single image each): {', '.join(single)}")
    kept = data.subset([i for i, label in enumerate(data.labels) if counts[label] >= 2])
    if len(set(kept.labels)) < 2:
        raise UserError(f"training needs at least two labels with two or more images each; "
                         f"{len(set(kept.labels))} found in {len(data)} images")
    return kept


# ---------------------------------------------------------------- evaluation


@torch.inference_mode()
def embed_all(net: nn.Module, data: Decoded, preprocessing: Preprocessing, device: torch.device,
              batch_size: int = 64) -> np.ndarray:
    """L2-normalised embeddings of every decoded image, in eval mode."""
    net.eval()
    chunks = [net(preprocessing.normalize(data.pixels[i:i + batch_size]).to(device)).float().cpu()
              for i in range(0, len(data), batch_size)]
    return l2_normalize(torch.cat(chunks), "the network being trained")


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Leave-one-out retrieval: each image ranks all the others by cosine similarity."""
    rows = np.arange(len(labels))
    _, relevance = leave_one_out(embeddings @ embeddings.T, rows, labels, labels)
    n_relevant = np.bincount(labels)[labels] - 1
    return {name: METRICS[name](relevance, n_relevant, len(labels) - 1) for name in VAL_METRICS}


# ---------------------------------------------------------------- training


def set_train_mode(net: EmbeddingNet, keep_bn_statistics: bool) -> None:
    """Train mode; a pretrained backbone keeps its BatchNorm statistics (small P×K batches would spoil them)."""
    net.train()
    if keep_bn_statistics:
        for module in net.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def make_augment(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image augmentation of a uint8 batch: off, or a horizontal flip plus TrivialAugmentWide."""
    if kind == "off":
        return lambda batch: batch
    import torchvision.transforms as T

    augment = T.Compose([T.RandomHorizontalFlip(), T.TrivialAugmentWide()])
    return lambda batch: torch.stack([augment(image) for image in batch])


def batches(data: Decoded, config: TrainConfig, echo: Echo) -> Callable[[], list[list[int]]]:
    """A function giving one epoch of P×K class-balanced batches (MPerClassSampler)."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    n_labels = len(set(data.labels.tolist()))
    per_batch = min(config.classes_per_batch, n_labels)
    if per_batch < config.classes_per_batch:
        echo(f"--classes-per-batch {config.classes_per_batch}: only {n_labels} training labels; using {per_batch}")
    size = per_batch * config.images_per_class

    def epoch() -> list[list[int]]:
        # A fresh sampler each epoch: it shuffles its label list in place, and a resumed run must see
        # the same batches as an uninterrupted one (the numpy RNG state is restored, the list is not).
        sampler = MPerClassSampler(data.labels, m=config.images_per_class, batch_size=size,
                                   length_before_new_iter=max(len(data), size))
        order = list(iter(sampler))
        return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]

    return epoch


def train_epoch(net: EmbeddingNet, optimizer: torch.optim.Optimizer, objective: Objective, data: Decoded,
                epoch_batches: list[list[int]], augment: Callable, preprocessing: Preprocessing,
                device: torch.device, keep_bn_statistics: bool, desc: str) -> float:
    """One pass over the batches; the mean training loss."""
    from tqdm import tqdm

    set_train_mode(net, keep_bn_statistics)
    total = 0.0
    progress = tqdm(epoch_batches, desc=desc, leave=False)
    for rows in progress:
        inputs = preprocessing.normalize(augment(data.pixels[rows])).to(device)
        loss = objective(net(inputs), data.labels[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return total / max(len(epoch_batches), 1)


@dataclass
class RunState:
    """What last.pt holds besides model and optimiser: where the run is and how it has gone."""

    epoch: int = 0
    best_epoch: int = 0
    best: float = -math.inf
    stale: int = 0
    history: list[dict] | None = None


def _rng_state() -> dict:
    """torch, numpy (MPerClassSampler) and python RNG states, as tensors and plain types (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss], "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def save_state(run_dir: Path, net: nn.Module, optimizer: torch.optim.Optimizer | None, state: RunState) -> None:
    payload = {"model": net.state_dict(), "optimizer": optimizer.state_dict() if optimizer else {},
               "run": asdict(state),
               "rng": _rng_state()}
    atomic_write(run_dir / STATE_FILE, lambda path: torch.save(payload, path))


def restore_state(run_dir: Path, net: nn.Module, optimizer: torch.optim.Optimizer | None,
                  device: torch.device) -> RunState:
    """Load last.pt into the model and optimiser, restore the RNGs; the run's progress so far."""
    saved = torch.load(run_dir / STATE_FILE, map_location=device, weights_only=True)
    net.load_state_dict(saved["model"])
    if optimizer:
        optimizer.load_state_dict(saved["optimizer"])
    _set_rng_state(saved["rng"])
    return RunState(**saved["run"])


def save_weights(run_dir: Path, net: nn.Module) -> None:
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in net.state_dict().items()}
    atomic_write(run_dir / WEIGHTS_FILE, lambda path: save_file(tensors, str(path)))


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.csv and curves.png from the whole history (rewritten each epoch, so resume stays consistent)."""
    columns = ["epoch", "train_loss"] + [f"val_{name}" for name in VAL_METRICS] + ["seconds"]

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(run_dir / METRICS_FILE, write_csv)
    atomic_write(run_dir / CURVES_FILE, lambda path: plot_curves(history, path))


def plot_curves(history: list[dict], path: Path) -> None:
    """Training loss and validation P@1 / MAP@R against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    trained = [row for row in history if row["train_loss"] != ""]
    left.plot([row["epoch"] for row in trained], [row["train_loss"] for row in trained], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    for name in ("P@1", "MAP@R"):
        right.plot(epochs, [row[f"val_{name}"] for row in history], marker="o", label=name)
    right.set(xlabel="epoch (0 = before training)", ylim=(0, 1.02), title="validation")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)


def make_optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.Optimizer | None:
    """AdamW over the trainable parameters; None for a parameter-free baseline (pixels, no head) at --epochs 0."""
    parameters = [p for p in net.parameters() if p.requires_grad]
    if not parameters:
        if config.epochs:
            raise UserError(f"--backbone {config.backbone} with --embedding-size 0 has nothing to train: "
                             "add a projection (--embedding-size 128) or evaluate it with --epochs 0")
        return None
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def _resumed_config(run_dir: Path, overrides: dict) -> tuple[TrainConfig, dict]:
    """The stored config with the few options --resume may change."""
    stored = read_run_config(run_dir)
    config = TrainConfig(**stored["training"])
    for name, value in overrides.items():
        if value is None or value == getattr(config, name):
            continue
        if name not in RESUME_OVERRIDES:
            raise UserError(f"--{name.replace('_', '-')}: a resumed run keeps its options; "
                             f"only {', '.join(RESUME_OVERRIDES)} may change")
        setattr(config, name, value)
    return config, stored["model"]


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    best_epoch: int
    best: dict
    stopped_early: bool


def train(config: TrainConfig | None = None, *, resume_dir: Path | None = None, overrides: dict | None = None,
          echo: Echo = print) -> TrainResult:
    """Train (or resume) a run and return where its best checkpoint is and how good it was."""
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        if not (run_dir / STATE_FILE).is_file():
            raise FileNotFoundError(f"{run_dir}: no {STATE_FILE} to resume from")
        config, model = _resumed_config(run_dir, overrides or {})
    else:
        assert config is not None
        run_dir = Path(config.out)
        if (run_dir / STATE_FILE).exists():
            raise UserError(f"{run_dir} already holds a run: add --resume to continue it, or choose another --out")
        model = describe_backbone(config.backbone, config.image_size)
        if config.lr is None:
            config.lr = DEFAULT_LR["pretrained" if is_pretrained(model) else "scratch"]
    seed_everything(config.seed)
    device = resolve_device(config.device)
    net, preprocessing = build_net(model, config.embedding_size, pretrained=resume_dir is None)
    net = net.to(device)
    optimizer = make_optimizer(net, config)
    model = dict(model, preprocessing=preprocessing.describe())
    train_set, val_set = split_data(config)
    train_data = decode(trainable(train_set, echo), preprocessing, "training", echo)
    val_data = decode(val_set, preprocessing, "validation", echo)
    if not (np.bincount(val_data.labels.numpy()) >= 2).any():
        raise UserError(f"validation needs a label with two or more images (each image is scored by finding the others "
                        f"of its label); {len(val_data)} validation images of {len(val_data.names)} labels found: "
                        "add images, or hold out more with --holdout-images")
    echo(f"{len(train_data)} training images of {len(train_data.names)} labels; "
         f"{len(val_data)} validation images of {len(val_data.names)} labels")
    if resume_dir is not None:
        state = restore_state(run_dir, net, optimizer, device)
        echo(f"resuming {run_dir} after epoch {state.epoch}")
    else:
        state = RunState(history=[])
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / CONFIG_FILE, lambda path: path.write_text(json.dumps(
            {"format": FORMAT_VERSION, "model": model, "embedding_size": config.embedding_size,
             "training": asdict(config)}, indent=1)))
    objective = Objective(config.loss, config.miner, config.margin, parse_ratio(config.pair_ratio))
    loop = _Loop(run_dir, net, optimizer, objective, preprocessing, device, config, echo, is_pretrained(model))
    return loop.run(state, train_data, val_data)


@dataclass
class _Loop:
    """The epoch loop with its bookkeeping: evaluation, best weights, early stopping, Ctrl-C."""

    run_dir: Path
    net: EmbeddingNet
    optimizer: torch.optim.Optimizer | None
    objective: Objective
    preprocessing: Preprocessing
    device: torch.device
    config: TrainConfig
    echo: Echo
    keep_bn_statistics: bool

    def evaluate(self, data: Decoded) -> dict[str, float]:
        return retrieval_metrics(embed_all(self.net, data, self.preprocessing, self.device), data.labels.numpy())

    def record(self, state: RunState, epoch: int, loss: float | str, metrics: dict, seconds: float) -> None:
        """Append an epoch's row; keep the weights when validation MAP@R improved."""
        state.history.append({"epoch": epoch, "train_loss": loss, "seconds": round(seconds, 2),
                              **{f"val_{name}": value for name, value in metrics.items()}})
        state.epoch = epoch
        if metrics["MAP@R"] > state.best:
            state.best, state.best_epoch, state.stale = metrics["MAP@R"], epoch, 0
            save_weights(self.run_dir, self.net)
        else:
            state.stale += 1
        save_state(self.run_dir, self.net, self.optimizer, state)
        write_metrics(self.run_dir, state.history)
        shown = "  ".join(f"{name} {value:.3f}" for name, value in metrics.items())
        loss_text = f"loss {loss:.4f}  " if loss != "" else "before training  "
        self.echo(f"epoch {epoch}: {loss_text}{shown}  ({seconds:.1f} s)")

    def run(self, state: RunState, train_data: Decoded, val_data: Decoded) -> TrainResult:
        if not state.history:
            started = time.perf_counter()
            self.record(state, 0, "", self.evaluate(val_data), time.perf_counter() - started)
        next_batches = batches(train_data, self.config, self.echo)
        augment = make_augment(self.config.augment)
        try:
            while state.epoch < self.config.epochs and state.stale < self.config.patience:
                started = time.perf_counter()
                epoch = state.epoch + 1
                loss = train_epoch(self.net, self.optimizer, self.objective, train_data, next_batches(), augment,
                                   self.preprocessing, self.device, self.keep_bn_statistics,
                                   f"epoch {epoch}/{self.config.epochs}")
                self.record(state, epoch, loss, self.evaluate(val_data), time.perf_counter() - started)
        except KeyboardInterrupt:
            save_state(self.run_dir, self.net, self.optimizer, state)
            raise
        stopped = state.stale >= self.config.patience and state.epoch < self.config.epochs
        if stopped:
            self.echo(f"early stop: no better validation MAP@R for {self.config.patience} epochs")
        best = next(row for row in state.history if row["epoch"] == state.best_epoch)
        return TrainResult(self.run_dir, state.epoch, state.best_epoch, best, stopped)

