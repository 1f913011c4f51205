"""The manifest of a cache generation: what made it (fingerprint, pipeline config), how it is bucketed, its policy.

A cache is data: nothing read here chooses code to run. Loading checks the manifest's shape and refuses a
corrupt one with a CacheError that names the cache and the problem.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lookalike.models.errors import UserError

FORMAT_VERSION = 2  # 2: rows grouped by top-1 bucket; 1 (gallery order) is still read
READABLE_VERSIONS = (1, 2)
BUCKET_BY = ("classifier", "label")
DEFAULT_FUSED_WEIGHT = 0.5  # a fused policy without @W on a cache that recorded no fitted weight (none chosen)


class CacheError(UserError):
    """A cache that cannot be used as asked; the message names the cache and the problem."""


@dataclass(frozen=True)
class Manifest:
    """Everything recorded about a generation besides its columns."""

    fingerprint: dict  # everything that changes an embedding, class or bucket (models, weights hashes, crop)
    config: dict  # the cache-changing part of the PipelineConfig that built it
    gallery_root: str
    count: int
    dim: int
    bucket_by: str = "classifier"  # 'label': buckets are the folder labels' classifier classes
    class_names: dict[str, str] = field(default_factory=dict)  # readable name of every bucket key
    default_policy: str = "flat"  # what `--buckets auto` means for this gallery (cache/autopolicy.py)
    fused_weight: float | None = None  # W fitted for the default policy when it is fused
    dba: list | None = None  # [K, a] of the DBA vectors stored as column `dba` (the default policy's +dba)
    # build-cache --exact-max-rows: above this many rows search and re-ranking take the large-gallery path (an index's
    # candidates, an approximate k-NN graph); None: cache/indexes.EXACT_MAX_ROWS
    exact_max_rows: int | None = None
    whitening: bool = False  # a learned whitening is stored (whitening.npy and column `white`): +white policies
    labels_file: str | None = None
    skipped: list[dict] = field(default_factory=list)  # {path, reason} of files left out
    # Per model stage, the ONNX export that embedded the rows, checked against eager torch: {"file", "sha256",
    # "preprocess" steps, and for a classifier "class_names"}. A query runs exactly these bytes, without torch.
    exports: dict[str, dict] = field(default_factory=dict)
    built: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def root(self) -> Path:
        return Path(self.gallery_root)

    def weight_for(self, explicit: float | None) -> float:
        """The fused weight a query uses: its own @W, else the fitted one, else DEFAULT_FUSED_WEIGHT."""
        if explicit is not None:
            return explicit
        return DEFAULT_FUSED_WEIGHT if self.fused_weight is None else self.fused_weight

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse and check a manifest.json; CacheError naming `where` when it is not one we can use."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise CacheError(f"{where}: manifest.json is not JSON ({err})") from None
        if not isinstance(data, dict):
            raise CacheError(f"{where}: manifest.json is not an object")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CacheError(f"{where}: cache format {version!r} is not one this lookalike reads "
                             f"({', '.join(map(str, READABLE_VERSIONS))}); rebuild it with build-cache --rebuild")
        if version == 1:  # renamed keys
            data["default_policy"] = data.pop("default_buckets", None) or "flat"
        known = {f.name for f in fields(cls)}
        data = {key: value for key, value in data.items() if key in known}
        missing = [name for name in ("fingerprint", "config", "gallery_root", "count", "dim") if name not in data]
        if missing:
            raise CacheError(f"{where}: manifest.json lacks {', '.join(missing)}; rebuild it with build-cache --rebuild")
        manifest = cls(**data)
        manifest.check(where)
        return manifest

    def check(self, where: str) -> None:
        """Types and values a query relies on."""
        expected = {"fingerprint": dict, "config": dict, "gallery_root": str, "count": int, "dim": int,
                    "class_names": dict, "default_policy": str, "skipped": list, "exports": dict}
        for name, kind in expected.items():
            if not isinstance(getattr(self, name), kind) or isinstance(getattr(self, name), bool):
                raise CacheError(f"{where}: manifest.json field {name} is not a {kind.__name__}")
        if self.bucket_by not in BUCKET_BY:
            raise CacheError(f"{where}: manifest.json bucket_by {self.bucket_by!r} is not one of {', '.join(BUCKET_BY)}")
        if self.count < 0 or self.dim < 0:
            raise CacheError(f"{where}: manifest.json has a negative count or dim")
        if self.fused_weight is not None and not isinstance(self.fused_weight, (int, float)):
            raise CacheError(f"{where}: manifest.json fused_weight is not a number")
        if not isinstance(self.whitening, bool):
            raise CacheError(f"{where}: manifest.json whitening is not true or false")
        if self.exact_max_rows is not None and (not isinstance(self.exact_max_rows, int)
                                                or isinstance(self.exact_max_rows, bool) or self.exact_max_rows < 1):
            raise CacheError(f"{where}: manifest.json exact_max_rows is not a positive whole number")
        if self.dba is not None and not (isinstance(self.dba, list) and len(self.dba) == 2
                                         and all(isinstance(v, (int, float)) for v in self.dba)):
            raise CacheError(f"{where}: manifest.json dba is not [K, a]")


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Readable 'key: old -> new' lines for two nested fingerprints."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def refuse_other_pipeline(manifest: Manifest, wanted: dict, where: str | Path, keys: tuple[str, ...] | None = None) -> None:
    """CacheError when the pipeline about to use a cache is not the one that built it (the one message that
    build-cache and query both give); `keys` limits the comparison to those fingerprint parts."""
    if keys is not None:
        manifest_part = {key: manifest.fingerprint.get(key) for key in keys}
        wanted = {key: wanted.get(key) for key in keys}
    else:
        manifest_part = manifest.fingerprint
    changed = differences(manifest_part, wanted)
    if changed:
        raise CacheError(f"{where}: this cache was built with another pipeline ({'; '.join(changed[:3])}); "
                         "use the same models and weights, another --out, or build-cache --rebuild to replace it")
