"""The run-directory format: `config.json` (how to rebuild the network and its preprocessing, read strictly)
and `model.safetensors` (the best weights), written by `pipeline.training` and read by `ckpt:RUN_DIR`."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lookalike.models.embedding_nets import PIXELS, SMALL_CNN, EmbeddingNet, Preprocessing, build_net
from lookalike.models.errors import UserError, one_line
from lookalike.models.files import read_hashed
from lookalike.models.registry import ModelSpec

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def read_run_config(run_dir: Path) -> dict:
    """config.json of a run directory; one-line errors for a missing or garbled one."""
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: checkpoint run directory does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE} (not a training run directory)")
    try:
        config = json.loads(path.read_text())
        missing = {"format", "model", "embedding_size"} - set(config)
    except (OSError, ValueError) as err:
        raise UserError(f"{run_dir}: {CONFIG_FILE} is not valid JSON ({err})") from None
    if missing:
        raise UserError(f"{run_dir}: {CONFIG_FILE} lacks {', '.join(sorted(missing))}")
    if config["format"] != FORMAT_VERSION:
        raise UserError(f"{run_dir}: run format {config['format']} is not {FORMAT_VERSION}; retrain or upgrade")
    _refuse_unknown_keys(path, config)
    return config


RUN_KEYS = {"format", "model", "embedding_size", "training"}
MODEL_KEYS = {"timm": {"kind", "spec", "image_size", "preprocessing"}, SMALL_CNN: {"kind", "preprocessing"},
              PIXELS: {"kind", "preprocessing"}}


def _refuse_unknown_keys(path: Path, config: dict) -> None:
    """UserError naming the first key this version does not know: a config is read strictly, never guessed at."""
    model = config["model"]
    if not isinstance(model, dict) or model.get("kind") not in MODEL_KEYS:
        kind = model.get("kind") if isinstance(model, dict) else model
        raise UserError(f"{path}: model kind {kind!r} is not one of {', '.join(MODEL_KEYS)}")
    spec_keys = set(ModelSpec.__dataclass_fields__)
    for where, data, known in [("", config, RUN_KEYS), ("model.", model, MODEL_KEYS[model["kind"]]),
                               ("model.spec.", model.get("spec") or {}, spec_keys)]:
        if not isinstance(data, dict):
            raise UserError(f"{path}: {where.rstrip('.') or 'the file'} is not a JSON object")
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{path}: unknown key {where}{unknown[0]} (known: {', '.join(sorted(known))})")


def rebuild_net(run_dir: Path, config: dict) -> tuple[EmbeddingNet, Preprocessing]:
    """The network a run's config describes, without its starting weights; UserError when it cannot be built
    (a bad `act_layer` or size: timm and torch report these with KeyError, TypeError, AssertionError...)."""
    try:
        return build_net(config["model"], config["embedding_size"], pretrained=False)
    except (KeyError, TypeError, ValueError, AssertionError, AttributeError, RuntimeError) as err:
        raise UserError(f"{run_dir / CONFIG_FILE}: cannot build the network it describes "
                        f"({one_line(err)})") from None


def load_weights(net: nn.Module, path: Path) -> str:
    """Strictly load a safetensors state dict from one read of `path` and return the sha256 of those bytes (so the
    fingerprint names the weights loaded even if the file is replaced meanwhile); a garbled or mismatched file is
    a one-line UserError."""
    from safetensors.torch import load

    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name} (training has not saved weights yet)")
    data, sha256 = read_hashed(path)
    try:
        net.load_state_dict(load(data), strict=True)
    except Exception as err:  # safetensors and torch raise several types for bad files
        raise UserError(f"{path}: weights do not fit the network in {CONFIG_FILE} ({one_line(err)})") from None
    return sha256
