"""Object detection for the crop stage: ultralytics YOLO, imported lazily, never phoning home."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from lookalike.models.errors import UserError, one_line
from lookalike.models.files import user_config_dir
from lookalike.models.registry import ModelSpec
from lookalike.models.weights import WeightsUnavailable, hub_identity, local_weights, pinned_copy, places_tried

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def _import_ultralytics():
    """ultralytics, offline, with its settings inside lookalike's config folder and checkpoints loaded as data.

    A .pt file may come from a cache's manifest, so it must never run code: ultralytics' safe loading
    (`torch.load(weights_only=True)` with an allow-list of model classes, layer configs read without `eval`)
    is forced on, also when ultralytics was imported before this set its environment variable.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(user_config_dir() / "ultralytics"))
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"
    try:
        import ultralytics
        import ultralytics.nn.tasks
    except ImportError as err:
        raise UserError(f"--crop needs the 'crop' extra ({err.name} is missing): pip install 'lookalike[crop]' "
                        "(ultralytics, AGPL-3.0)") from None

    ultralytics.nn.tasks.SAFE_LOAD = True
    return ultralytics


def choose_box(boxes: np.ndarray, width: int, height: int) -> Box | None:
    """The box that is both large and central.

    score = (box area / image area) * (1 - d), where d is the distance from the box centre to the
    image centre divided by half the image diagonal (0 at the centre, 1 in a corner). None if no box.
    """
    if len(boxes) == 0:
        return None
    boxes = np.asarray(boxes, dtype=np.float64)[:, :4]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / float(width * height)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    offset = np.linalg.norm(centres - np.array([width / 2, height / 2]), axis=1) / (np.hypot(width, height) / 2)
    best = int(np.argmax(areas * (1.0 - offset)))
    return tuple(float(v) for v in boxes[best])


def pad_box(box: Box, margin: float, width: int, height: int) -> Box:
    """Grow the box by `margin` of its size on every side, clipped to the image."""
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return (max(0.0, x0 - dx), max(0.0, y0 - dy), min(float(width), x1 + dx), min(float(height), y1 + dy))


class Detector:
    """A YOLO detector returning boxes (x0, y0, x1, y1) per image."""

    def __init__(self, spec: ModelSpec, device: str = "auto", confidence: float = 0.25):
        self.spec = spec
        self.confidence = confidence
        from lookalike.models.runtime import resolve_device

        self.device = str(resolve_device(device))
        path = local_weights(spec)
        ultralytics = _import_ultralytics()
        try:
            # YOLO('yolov8n.pt') with no local file would try a download: offline, that fails.
            if path is None:
                self.model, self.weights = ultralytics.YOLO(spec.model_id), hub_identity(spec)
            else:
                with pinned_copy(path) as (copy, sha256):
                    self.model, self.weights = ultralytics.YOLO(str(copy)), "sha256:" + sha256
        except Exception as err:
            if path is not None:
                raise UserError(f"{path}: not a plain YOLO checkpoint; lookalike loads weights only, never code "
                                f"({one_line(err)})") from err
            raise WeightsUnavailable(
                f"cannot load detector '{spec.name}': tried {'; '.join(places_tried(spec))} -> "
                f"{type(err).__name__}. To fix: put {spec.weight_file} in $LOOKALIKE_WEIGHTS or pass a .pt path"
            ) from err

    def describe(self) -> dict:
        return {"spec": self.spec.describe(), "weights": self.weights, "confidence": self.confidence}

    def detect(self, images: list[Image.Image]) -> list[np.ndarray]:
        """Boxes [n, 4] per image, in that image's pixel coordinates."""
        if not images:
            return []
        results = self.model.predict(images, conf=self.confidence, device=self.device, verbose=False)
        return [r.boxes.xyxy.cpu().numpy() for r in results]
