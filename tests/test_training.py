"""Training fine-tuned embedders: loss/miner wiring, the run directory, resume, checkpoints as embedders."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SHAPES, draw_shape

from lookalike.models.embedders import create_embedder
from lookalike.models.embedding_nets import Preprocessing
from lookalike.models.finetuned import CheckpointEmbedder
from lookalike.models.registry import resolve_spec
from lookalike.pipeline.images import load_image
from lookalike.pipeline.training import loop
from lookalike.pipeline.training.config import TrainConfig
from lookalike.pipeline.training.loop import CURVES_FILE, METRICS_FILE, STATE_FILE, decode, retrieval_metrics, split_data, train
from lookalike.pipeline.training.objective import Objective, balanced_counts

RUN_FILES = ("config.json", "model.safetensors", STATE_FILE, METRICS_FILE, CURVES_FILE)
LABELS = torch.tensor([0, 0, 1])


def unit(*angles_deg: float) -> torch.Tensor:
    """Points on the unit circle: distances between them are known exactly."""
    radians = torch.tensor(angles_deg) * math.pi / 180
    return torch.stack([torch.cos(radians), torch.sin(radians)], dim=1)


# ---------------------------------------------------------------- losses and miners


def test_triplet_that_satisfies_the_margin_costs_nothing():
    # anchor and positive coincide, the negative is sqrt(2) away: far beyond the 0.2 margin
    embeddings = unit(0, 0, 90).requires_grad_()
    for miner in ("all", "semi-hard", "batch-hard"):
        assert Objective("triplet", miner, margin=0.2)(embeddings, LABELS).item() == pytest.approx(0.0)


def test_triplet_loss_value_on_a_violating_triplet():
    # a=0deg, p=90deg, n=0deg: triplets (a,p,n): d_ap=sqrt2, d_an=0 -> sqrt2+m; (p,a,n): sqrt2-sqrt2+m = m
    loss = Objective("triplet", "all", margin=0.2)(unit(0, 90, 0), LABELS)
    assert loss.item() == pytest.approx((math.sqrt(2) + 0.2 + 0.2) / 2, abs=1e-5)


def test_batch_hard_miner_picks_the_farthest_positive_and_nearest_negative():
    embeddings = unit(0, 10, 80, 100, 170, 180)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    anchors, positives, negatives = Objective("triplet", "batch-hard", margin=0.2).indices(embeddings, labels)
    first = anchors.tolist().index(0)
    assert (positives[first].item(), negatives[first].item()) == (2, 3)


def test_semi_hard_miner_skips_easy_and_too_hard_triplets():
    # anchor 0deg; positive 40deg (d=0.684); negatives: 45deg (semi-hard), 180deg (easy), 30deg (hard)
    embeddings = unit(0, 40, 45, 180, 30)
    labels = torch.tensor([0, 0, 1, 1, 1])
    anchors, positives, negatives = Objective("triplet", "semi-hard", margin=0.2).indices(embeddings, labels)
    from_zero = {n for a, p, n in zip(anchors.tolist(), positives.tolist(), negatives.tolist()) if a == 0}
    assert from_zero == {2}


def test_contrastive_loss_values():
    objective = Objective("contrastive", "all", margin=0.5)
    # positives coincide, the negative is sqrt(2) > 0.5 away: nothing to learn
    assert objective(unit(0, 0, 90), LABELS).item() == pytest.approx(0.0)
    # the negative is 0.3 away, inside the 0.5 margin: each negative pair costs 0.5 - 0.3
    angle = math.degrees(2 * math.asin(0.3 / 2))
    assert objective(unit(0, 0, angle), LABELS).item() == pytest.approx(0.2, abs=1e-4)


def test_contrastive_pairs_follow_the_positive_negative_ratio():
    labels = torch.tensor([0] * 4 + [1] * 4)  # 24 ordered positive pairs, 32 negative pairs
    embeddings = torch.randn(8, 4)
    for ratio, expected in (((1, 1), (24, 24)), ((1, 3), (11, 32)), ((2, 1), (24, 12))):
        _, positives, _, negatives = Objective("contrastive", "all", 0.5, ratio).indices(embeddings, labels)
        assert (len(positives), len(negatives)) == expected
    assert balanced_counts(10, 100, (1, 3)) == (10, 30)


@pytest.mark.parametrize("bad", [dict(loss="hinge"), dict(miner="hardest"), dict(pair_ratio="3"),
                                 dict(holdout_labels=2, holdout_images=0.2), dict(epochs=-1)])
def test_bad_options_are_value_errors(bad):
    with pytest.raises(ValueError):
        TrainConfig(**{"loss": "triplet", "data": "d", "out": "o", **bad})


# ---------------------------------------------------------------- runs on drawn images


@pytest.fixture
def shapes(tmp_path) -> Path:
    """4 labels x 16 drawn images: coloured shapes."""
    root = tmp_path / "shapes"
    styles = dict(SHAPES, yellow_circles=((230, 200, 20), "ellipse"))
    for index, (label, (colour, shape)) in enumerate(styles.items()):
        for i in range(16):
            draw_shape(root / label / f"{i}.png", colour, shape, seed=100 * index + i, size=48)
    return root


def tiny(root: Path, out: Path, **changes) -> TrainConfig:
    options = dict(loss="triplet", data=str(root), out=str(out), backbone="small-cnn", image_size=(32, 32), epochs=2,
                   holdout_images=0.25, classes_per_batch=4, images_per_class=2, miner="all", lr=3e-3,
                   pair_ratio="1:100", device="cpu")  # every pair and triplet: the loss is not subsampled
    return TrainConfig(**{**options, **changes})


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / METRICS_FILE) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("loss", ["triplet", "contrastive"])
def test_two_epochs_lower_the_loss_and_write_the_run_directory(shapes, tmp_path, loss):
    run = tmp_path / "run"
    result = train(tiny(shapes, run, loss=loss, epochs=3), echo=lambda message: None)
    rows = read_metrics(run)
    assert [row["epoch"] for row in rows] == ["0", "1", "2", "3"]
    assert {"train_loss", "val_P@1", "val_MAP@R", "val_mean_rank"} <= set(rows[0])
    losses = [float(row["train_loss"]) for row in rows[1:]]
    assert losses[-1] < losses[0]
    for name in RUN_FILES:
        assert (run / name).stat().st_size > 0, name
    assert (run / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run / "config.json").read_text())
    assert config["training"]["loss"] == loss and config["model"]["preprocessing"]["size"] == [32, 32]
    best = max(rows, key=lambda row: float(row["val_MAP@R"]))  # the first epoch reaching the top MAP@R
    assert result.best_epoch == int(best["epoch"])


def test_resume_continues_from_the_saved_epoch_as_if_never_stopped(shapes, tmp_path):
    quiet = dict(echo=lambda message: None)
    train(tiny(shapes, tmp_path / "straight", epochs=2), **quiet)
    train(tiny(shapes, tmp_path / "resumed", epochs=1), **quiet)
    result = train(resume_dir=tmp_path / "resumed", overrides={"epochs": 2}, **quiet)
    assert result.epochs_done == 2
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [row["epoch"] for row in resumed] == ["0", "1", "2"]
    for a, b in zip(straight, resumed):
        assert float(a["train_loss"] or 0) == pytest.approx(float(b["train_loss"] or 0), rel=1e-4)
        assert float(a["val_MAP@R"]) == pytest.approx(float(b["val_MAP@R"]), abs=1e-4)


def test_ctrl_c_saves_a_resumable_checkpoint(shapes, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_epoch, calls = loop.train_epoch, []

    def interrupted_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_epoch", interrupted_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(shapes, run, epochs=3), echo=lambda message: None)
    assert torch.load(run / STATE_FILE, weights_only=True)["run"]["epoch"] == 1
    monkeypatch.setattr(loop, "train_epoch", real_epoch)
    messages = []
    assert train(resume_dir=run, echo=messages.append).epochs_done == 3
    assert "resuming" in " ".join(messages) and [row["epoch"] for row in read_metrics(run)] == ["0", "1", "2", "3"]


def test_resume_refuses_changed_options_and_a_fresh_run_refuses_an_old_directory(shapes, tmp_path):
    run = tmp_path / "run"
    train(tiny(shapes, run, epochs=1), echo=lambda message: None)
    with pytest.raises(ValueError, match="resumed run keeps its options"):
        train(resume_dir=run, overrides={"loss": "contrastive"})
    with pytest.raises(ValueError, match="--resume"):
        train(tiny(shapes, run, epochs=1), echo=lambda message: None)
    with pytest.raises(FileNotFoundError):
        train(resume_dir=tmp_path / "nothing")


def test_checkpoint_round_trips_to_identical_embeddings(shapes, tmp_path):
    run = tmp_path / "run"
    result = train(tiny(shapes, run, epochs=2), echo=lambda message: None)
    embedder = create_embedder(resolve_spec(f"ckpt:{run}", "embedder"), "cpu")
    assert isinstance(embedder, CheckpointEmbedder) and embedder.dim == 128
    _, val = split_data(tiny(shapes, run))
    images = [load_image(val.root / path) for path in val.paths]
    vectors = embedder.embed(torch.stack([embedder.transform(image) for image in images]))
    assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    again = CheckpointEmbedder(run, "cpu")
    assert np.array_equal(vectors, again.embed(torch.stack([again.transform(image) for image in images])))
    # the stored best weights reproduce the validation figures recorded for the best epoch
    labels = decode(val, embedder.preprocessing, "validation", lambda message: None).labels.numpy()
    recomputed = retrieval_metrics(vectors, labels)
    assert recomputed["MAP@R"] == pytest.approx(result.best["val_MAP@R"], abs=1e-6)
    described = embedder.describe()
    assert len(described["weights_sha256"]) == 64 and described["preprocessing"]["size"] == [32, 32]
    assert str(run) not in json.dumps(described)  # moving a run dir keeps caches valid


def test_preprocessing_golden_values():
    preprocessing = Preprocessing("L", (2, 3), (0.5,), (0.5,))
    from PIL import Image

    image = Image.new("RGB", (6, 4), (255, 0, 0))  # luma of pure red: 76
    tensor = preprocessing(image)
    assert tensor.shape == (1, 2, 3)
    assert torch.allclose(tensor, torch.full((1, 2, 3), (76 / 255 - 0.5) / 0.5))


def test_unreadable_images_and_single_image_labels_are_reported(shapes, tmp_path):
    (shapes / "red_circles" / "broken.png").write_bytes(b"not a png")
    draw_shape(shapes / "lonely" / "0.png", (0, 0, 0), "rectangle", seed=1, size=48)
    messages: list[str] = []
    # split by image: a single-image label never gives a validation query, so it stays on the training side
    train(tiny(shapes, tmp_path / "run", epochs=1), echo=messages.append)
    text = "\n".join(messages)
    assert "skipped" in text and "broken.png" in text
    assert "excluded from training (a single image each): lonely" in text
    assert re.search(r"\d+ training images of 4 labels", text)  # 'lonely' is not among them


def test_parameter_free_pixels_baseline_is_evaluated_not_trained(shapes, tmp_path):
    run = tmp_path / "pixels"
    result = train(tiny(shapes, run, backbone="pixels", embedding_size=0, epochs=0), echo=lambda message: None)
    assert result.epochs_done == 0 and 0 < result.best["val_P@1"] <= 1
    assert CheckpointEmbedder(run, "cpu").dim == 32 * 32  # greyscale pixels, flattened
    with pytest.raises(ValueError, match="nothing to train"):
        train(tiny(shapes, tmp_path / "other", backbone="pixels", embedding_size=0, epochs=1))


def test_fewer_than_two_labels_is_a_clear_error(tmp_path):
    for i in range(4):
        draw_shape(tmp_path / "one" / "only" / f"{i}.png", (200, 0, 0), "ellipse", seed=i, size=48)
    with pytest.raises(ValueError, match="at least two labels"):
        train(tiny(tmp_path / "one", tmp_path / "run"), echo=lambda message: None)


def test_missing_or_garbled_run_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointEmbedder(tmp_path / "absent", "cpu")
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CheckpointEmbedder(tmp_path / "run", "cpu")
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CheckpointEmbedder(tmp_path / "run", "cpu")


def test_garbled_weights_are_a_value_error(shapes, tmp_path):
    run = tmp_path / "run"
    train(tiny(shapes, run, epochs=0), echo=lambda message: None)
    (run / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        CheckpointEmbedder(run, "cpu")


def test_train_command_and_the_checkpoint_as_a_cache_embedder(shapes, tmp_path):
    from lookalike.cli import cli

    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--loss", "contrastive", "--data", str(shapes), "--out", str(run),
                                 "--backbone", "small-cnn", "--image-size", "32", "--epochs", "1", "-P", "4",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"ckpt:{run}" in result.output
    missing = runner.invoke(cli, ["train", "--out", str(tmp_path / "other")])
    assert missing.exit_code == 1 and "--loss and --data are required" in missing.output
    cache = runner.invoke(cli, ["build-cache", "--gallery", str(shapes), "--out", str(tmp_path / "cache"),
                                "--classifier", "none", "--embedder", f"ckpt:{run}", "--device", "cpu"])
    assert cache.exit_code == 0, cache.output
    found = runner.invoke(cli, ["query", str(shapes / "red_circles" / "0.png"), "--cache", str(tmp_path / "cache"),
                                "--buckets", "flat", "--json"])
    assert found.exit_code == 0, found.output
    results = json.loads(found.output[found.output.index("["):])[0]["results"]
    assert results[0]["path"].endswith("red_circles/0.png")


@pytest.mark.real
def test_att_faces_fine_tuning_beats_frozen_imagenet_features_on_held_out_subjects(real_weights, tmp_path):
    data = real_weights.parent / "data" / "att_faces.zip"
    if not data.is_file():
        pytest.skip(f"real data not found at {data} (set LOOKALIKE_ASSETS)")
    # mobilenetv2 without a head at half resolution: epoch 0 is exactly the frozen-feature baseline (~3 s/epoch)
    result = train(TrainConfig(loss="triplet", data=str(data), out=str(tmp_path / "run"), holdout_labels=10,
                               embedding_size=0, image_size=(112, 92), epochs=4, device="cpu"),
                   echo=lambda message: None)
    frozen = read_metrics(tmp_path / "run")[0]
    assert result.best["val_MAP@R"] > float(frozen["val_MAP@R"]) + 0.03
    assert result.best["val_P@1"] >= 0.95


@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--lr", "inf"), ("--margin", "nan"),
                                           ("--weight-decay", "-inf"), ("--holdout-images", "nan")])
def test_train_refuses_non_finite_numbers_in_one_line(shapes, tmp_path, option, value):
    from lookalike.cli import cli

    result = CliRunner().invoke(cli, ["train", "--loss", "triplet", "--data", str(shapes), "--out",
                                      str(tmp_path / "run"), "--backbone", "small-cnn", option, value])
    assert result.exit_code == 1 and f"{option} {value}: must be a finite number" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_train_refuses_data_too_small_to_validate_in_one_line(tmp_path):
    from lookalike.cli import cli

    for index, (label, (colour, shape)) in enumerate(list(SHAPES.items())[:2]):
        for i in range(4):
            draw_shape(tmp_path / "tiny" / label / f"{i}.png", colour, shape, seed=10 * index + i, size=48)
    result = CliRunner().invoke(cli, ["train", "--loss", "triplet", "--data", str(tmp_path / "tiny"), "--out",
                                      str(tmp_path / "run"), "--backbone", "small-cnn", "--image-size", "32",
                                      "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "error: validation needs a label with two or more images" in result.output
    assert "nan" not in result.output.lower()
