"""A model's eval preprocessing as data, and that data run in PIL + numpy.

timm and open_clip build their eval transforms from torchvision steps: resize the short side, centre-crop, scale to
[0, 1], normalise. `describe_transform` writes such a transform down as plain steps (the build stores them beside a
checked ONNX export), and `ArrayTransform` runs them without torch, giving the tensor torchvision gives: the same
PIL resize call and crop box, then the same float32 arithmetic. A transform with any other step gives None, and the
model stays on the torch path.
"""
from __future__ import annotations

import types

import numpy as np
from PIL import Image

# torchvision's InterpolationMode values -> Pillow's filters (torchvision.transforms.functional.pil_modes_mapping)
PIL_FILTERS = {"nearest": Image.NEAREST, "nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR,
               "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}
# Steps that leave an RGB PIL image as it is (open_clip converts other modes to RGB; lookalike decodes to RGB).
RGB_STEPS = ("MaybeConvertMode", "_convert_to_rgb")


def _sizes(size) -> list[int]:
    return [int(size)] if isinstance(size, int) else [int(v) for v in size]


def describe_transform(transform) -> list[dict] | None:
    """The steps of a torchvision eval transform as JSON-ready dicts, or None when a step is not one of resize
    (no max_size), centre crop, to-tensor, normalise or an RGB conversion."""
    steps = []
    for step in getattr(transform, "transforms", [transform]):
        kind = step.__name__ if isinstance(step, types.FunctionType) else type(step).__name__
        if kind == "Resize" and getattr(step, "max_size", None) is None and step.interpolation.value in PIL_FILTERS:
            steps.append({"op": "resize", "size": _sizes(step.size), "interpolation": step.interpolation.value})
        elif kind == "CenterCrop":
            steps.append({"op": "center_crop", "size": _sizes(step.size)})
        elif kind in ("ToTensor", "MaybeToTensor"):
            steps.append({"op": "to_float"})
        elif kind == "Normalize" and not getattr(step, "inplace", False):
            steps.append({"op": "normalize", "mean": [float(v) for v in step.mean], "std": [float(v) for v in step.std]})
        elif kind not in RGB_STEPS:
            return None
    return steps if steps and steps[-1]["op"] == "normalize" else None


def _resize(image: Image.Image, size: list[int], interpolation: str) -> Image.Image:
    """torchvision's resize of a PIL image: one size is the short side's (the long side truncated), two are (h, w)."""
    width, height = image.size
    if len(size) == 1:
        short, long = sorted((width, height))
        new_short, new_long = size[0], int(size[0] * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_h, new_w = size
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), PIL_FILTERS[interpolation])


def _center_crop(image: Image.Image, size: list[int]) -> Image.Image:
    """torchvision's centre crop of a PIL image, zero-padded first where the crop is larger than the image."""
    crop_h, crop_w = (size * 2)[:2]
    width, height = image.size
    if crop_w > width or crop_h > height:
        left, top = max(crop_w - width, 0) // 2, max(crop_h - height, 0) // 2
        padded = Image.new(image.mode, (width + max(crop_w - width, 0) // 2 + max(crop_w - width + 1, 0) // 2,
                                        height + max(crop_h - height, 0) // 2 + max(crop_h - height + 1, 0) // 2))
        padded.paste(image, (left, top))
        image, (width, height) = padded, padded.size
        if (crop_w, crop_h) == (width, height):
            return image
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


class ArrayTransform:
    """Recorded steps run on an RGB PIL image, giving a float32 CHW array."""

    def __init__(self, steps: list[dict]):
        self.steps = steps

    def __call__(self, image: Image.Image) -> np.ndarray:
        array = None
        for step in self.steps:
            if step["op"] == "resize":
                image = _resize(image, step["size"], step["interpolation"])
            elif step["op"] == "center_crop":
                image = _center_crop(image, step["size"])
            elif step["op"] == "to_float":
                array = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
                array /= np.float32(255)
            else:  # normalize
                mean, std = (np.asarray(step[key], np.float32)[:, None, None] for key in ("mean", "std"))
                array = (array - mean) / std
        return np.ascontiguousarray(array)
