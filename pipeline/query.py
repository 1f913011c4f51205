"""Opening a cache for queries: the pipeline recorded in the cache, with query-time options on top."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cache.search import Searcher
from cache.store import CacheData, CacheError, load_cache
from pipeline.config import CACHE_FIELDS, PipelineConfig
from pipeline.items import Item
from pipeline.pipeline import Pipeline, build_pipeline
from pipeline.policies import parse_policy, resolve_auto


def query_config(data: CacheData, overrides: dict) -> PipelineConfig:
    """The cache's pipeline plus `overrides`; an override that would change the cache is refused."""
    recorded = data.manifest["config"]
    conflicts = [f"{name} {overrides[name]!r} (cache: {recorded.get(name)!r})" for name in CACHE_FIELDS
                 if overrides.get(name) is not None and overrides[name] != recorded.get(name)]
    if conflicts:
        raise CacheError(f"{data.root}: built with another pipeline; you asked for {', '.join(conflicts)}. "
                         "Drop those options or build a cache with them")
    config = PipelineConfig.from_dict(recorded)
    query_options = {k: v for k, v in overrides.items() if k not in CACHE_FIELDS and v is not None}
    config = replace(config, **query_options)
    config.buckets = resolve_auto(config.buckets, data.manifest) if config.uses_classifier else "flat"
    parse_policy(config.buckets)  # a bad policy fails before any model loads
    return config


def open_query_pipeline(cache_dir: str | Path, overrides: dict | None = None) -> tuple[Pipeline, PipelineConfig]:
    data = load_cache(cache_dir)
    config = query_config(data, overrides or {})
    return build_pipeline(config, Searcher(data)), config


def answer_json(item: Item, gallery_root: Path, buckets: str) -> dict:
    """One query's answer as `query --json` prints it (and the serve API returns it)."""
    return {"query": item.path, "predicted": item.predicted(), "buckets": buckets, "candidates": item.candidates,
            "note": item.note,
            "results": [dict(r.to_dict(), path=str(gallery_root / r.path)) for r in item.results]}
