"""lookalike: give it a photo, get the most similar images of a gallery, with scores.

    import lookalike

    lookalike.build("photos/", "photos.cache", classifier="mobilenetv2", embedder="mobilenetv2")
    index = lookalike.open("photos.cache")
    for result in index.query("query.jpg").results:
        print(result.rank, f"{result.score:.3f}", result.path, result.label)

The names below load on first use, so `import lookalike` costs no model library.
"""
from __future__ import annotations

from importlib import import_module

__version__ = "0.2.0"

# Public name -> the module that defines it (the API lives in pipeline/api.py; errors in models/errors.py).
_HOMES = {
    "build": "lookalike.pipeline.api",
    "open": "lookalike.pipeline.api",
    "Index": "lookalike.pipeline.api",
    "export_milvus": "lookalike.pipeline.api",
    "MilvusTarget": "lookalike.cache.milvus",
    "Answer": "lookalike.pipeline.api",
    "Prediction": "lookalike.pipeline.api",
    "Result": "lookalike.pipeline.items",
    "BuildReport": "lookalike.pipeline.build",
    "DuplicateReport": "lookalike.pipeline.duplicates",
    "UserError": "lookalike.models.errors",
    "PreparationBusy": "lookalike.cache.search",
}
__all__ = ["__version__", *_HOMES]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'lookalike' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
