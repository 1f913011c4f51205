"""Opening a cache for queries: the pipeline recorded in the cache, with query-time options on top.

The pipeline that answers must be the one that built the cache (same models, weights and preprocessing): its
fingerprint is checked against the manifest's, with the message build-cache gives.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from lookalike.cache.manifest import CacheError, refuse_other_pipeline
from lookalike.cache.milvus import MilvusTarget
from lookalike.cache.policies import resolve_auto
from lookalike.cache.search import Searcher
from lookalike.cache.store import CacheData, load_cache
from lookalike.pipeline.config import CACHE_FIELDS, PipelineConfig
from lookalike.pipeline.pipeline import Pipeline, build_pipeline, fingerprint, recorded_pipeline

# What a query must share with the cache: the models, their weights and preprocessing. The JPEG decode rule only
# changes how a query photo is decoded (on 12 MP photos cosine >= 0.9996 to the previous rule), so a cache built
# under an older rule still answers; build-cache compares everything and refuses to mix rows.
QUERY_CHECKS = ("stages", "bucket_by")


def query_config(data: CacheData, overrides: dict) -> PipelineConfig:
    """The cache's pipeline plus `overrides`; an override that would change the cache is refused."""
    recorded = data.manifest.config
    conflicts = [f"{name} {overrides[name]!r} (cache: {recorded.get(name)!r})" for name in CACHE_FIELDS
                 if overrides.get(name) is not None and overrides[name] != recorded.get(name)]
    if conflicts:
        raise CacheError(f"{data.root}: built with another pipeline; you asked for {', '.join(conflicts)}. "
                         "Drop those options or build a cache with them")
    unknown = sorted(set(recorded) - set(CACHE_FIELDS))
    if unknown or not recorded:
        raise CacheError(f"{data.root}: the manifest's config {'has unknown fields ' + ', '.join(unknown) if unknown else 'is empty'}; "
                         "rebuild the cache with build-cache --rebuild")
    config = PipelineConfig.from_dict(recorded)
    query_options = {k: v for k, v in overrides.items() if k not in CACHE_FIELDS and v is not None}
    config = replace(config, **query_options)
    config.buckets = resolve_auto(config.buckets, data.manifest.default_policy) if config.uses_classifier else "flat"
    return config


def runs_recorded_exports(config: PipelineConfig, data: CacheData) -> bool:
    """Whether a query runs the cache's recorded ONNX exports: when the build recorded them (every model checked,
    no crop), on the CPU, unless --runtime torch. With `--device auto` too, even where a GPU is present: one photo's
    answer is mostly start-up, which torch would add."""
    return (bool(data.manifest.exports) and not config.crop and config.runtime in ("auto", "onnx")
            and config.device in ("auto", "cpu"))


def open_searcher(data: CacheData, milvus: MilvusTarget | None = None) -> Searcher:
    """The one choice of search backend: faiss over the cache's own rows, or the Milvus collection they were exported
    to (the cache still gives the manifest, the pipeline, the buckets and the rows re-ranking reads)."""
    if milvus is None:
        return Searcher(data)
    from lookalike.cache.milvus_search import MilvusSearcher

    return MilvusSearcher(data, milvus)


def open_query_pipeline(cache: str | Path | CacheData, overrides: dict | None = None,
                        searcher: Searcher | None = None) -> tuple[Pipeline, PipelineConfig]:
    """The cache's pipeline with a retrieve stage (over `searcher`, or a new one): its recorded ONNX exports where
    they can be used (no torch), else its models in torch, refused when they are not the ones that built the cache.
    `cache` is a cache folder or one already loaded."""
    data = cache if isinstance(cache, CacheData) else load_cache(cache)
    config = query_config(data, overrides or {})
    searcher = searcher or open_searcher(data)
    if runs_recorded_exports(config, data):
        from lookalike.models.recorded import ExportRefused

        try:
            return recorded_pipeline(config, searcher), config
        except ExportRefused as err:
            print(f"lookalike: {err}; loading the models in torch", file=sys.stderr)
    pipeline = build_pipeline(config, searcher)
    refuse_other_pipeline(data.manifest, fingerprint(pipeline.describe(), data.manifest.bucket_by), data.root,
                          keys=QUERY_CHECKS)
    return pipeline, config
