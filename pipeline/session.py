"""QuerySession: a cache's pipeline loaded once for many queries (behind the public Index, pipeline/api.py).

It answers decoded images, gallery rows ("more like this", from the stored embedding and classes) and,
when the cache's embedder is CLIP, texts; each query may pick its own k and bucket policy. Queries from
several threads are safe. One at a time runs the models: each run already uses every core (ONNX Runtime's and
torch's threads), and side by side they halved a server's throughput on 2 cores (8 clients: 30 against 55
queries/s, BENCHMARKS.md, Serving). Everything else runs side by side: decoding, search and re-ranking (the
searcher guards its own caches), so a slow re-ranking never holds up another query's models.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from lookalike.cache.milvus import MilvusTarget
from lookalike.cache.policies import BucketPolicy, parse_policy
from lookalike.cache.store import CacheData, load_cache
from lookalike.models.errors import UserError
from lookalike.models.registry import has_text_tower, require_text_tower, resolve_spec
from lookalike.pipeline.items import Item
from lookalike.pipeline.pipeline import Pipeline, run_stages
from lookalike.pipeline.config import PipelineConfig
from lookalike.pipeline.query import open_query_pipeline, open_searcher, query_config
from lookalike.pipeline.stages import RetrieveStage

# Texts search the whole gallery: choosing buckets for a text (e.g. zero-shot over the class names) would
# need real CLIP weights to benchmark, and none are available here (README, "Search from a web page").
TEXT_BUCKETS = "flat"


def query_policy(data: CacheData, buckets: str | None, k: int | None) -> tuple[PipelineConfig, BucketPolicy]:
    """A query's config and parsed bucket policy (the cache's `auto` choice when `buckets` is None): UserError for
    a bad policy or k, before any model loads."""
    if k is not None and k < 1:
        raise UserError(f"k {k}: must be at least 1")
    config = query_config(data, {"buckets": buckets, "k": k})
    return config, parse_policy(config.buckets)


class QuerySession:
    """A cache opened for queries. Rows and texts need no image model: the image pipeline (classify, embed, crop)
    loads at the first image query, or `load_pipeline()`; a text query loads the CLIP text tower alone. With `milvus`
    the cache's rows are searched in that collection (exported by export-milvus) instead of locally."""

    def __init__(self, cache: str | Path | CacheData, overrides: dict | None = None,
                 milvus: MilvusTarget | None = None):
        self.data = cache if isinstance(cache, CacheData) else load_cache(cache)
        self.overrides = dict(overrides or {})
        self.config = query_config(self.data, self.overrides)
        self.searcher = open_searcher(self.data, milvus)
        self.embedder_spec = resolve_spec(self.config.embedder, "embedder")
        self.text_queries = has_text_tower(self.embedder_spec)
        self._pipeline: Pipeline | None = None
        self._text_encoder = None
        self._loading = threading.Lock()
        self._models = threading.Lock()  # one model run at a time (see above)

    @property
    def pipeline(self) -> Pipeline:
        """The image pipeline, loaded once (refused here when its models are not the ones that built the cache)."""
        with self._loading:
            if self._pipeline is None:
                self._pipeline, _ = open_query_pipeline(self.data, self.overrides, self.searcher)
        return self._pipeline

    def bucket_name(self, key: int) -> str:
        """A bucket key's readable name, as the build recorded it for every class a gallery image holds."""
        return self.data.manifest.class_names.get(str(key), str(key))

    def retriever(self, buckets: str | None, k: int | None) -> tuple[RetrieveStage, str]:
        """A retrieve stage for this query's policy and k (the cache's `auto` choice when None)."""
        config, policy = query_policy(self.data, buckets, k)
        return RetrieveStage(self.searcher, policy, config.k, self.bucket_name), config.buckets

    def images(self, items: list[Item], buckets: str | None = None, k: int | None = None) -> tuple[list[Item], str]:
        """Items holding decoded images -> classified, embedded and answered; returns them and the policy used."""
        retrieve, used = self.retriever(buckets, k)
        with self._models:
            run_stages([stage for stage in self.pipeline.stages if stage.name != "retrieve"], items)
        run_stages([retrieve], items)
        return items, used

    def row(self, row: int, buckets: str | None = None, k: int | None = None) -> tuple[Item, str]:
        """Gallery image `row` as a query, from its stored embedding and classes (no model runs)."""
        if not 0 <= row < len(self.data):
            raise IndexError(f"row {row}: the gallery has rows 0 to {len(self.data) - 1}")
        columns = self.data.columns
        item = Item(str(self.data.gallery_root / str(columns["paths"][row])),
                    embedding=np.asarray(columns["embeddings"][row], np.float32))
        if self.config.uses_classifier:
            item.classes, item.probs = np.asarray(columns["classes"][row]), np.asarray(columns["probs"][row])
            item.class_names = [self.bucket_name(int(c)) for c in item.classes[:5]]
        retrieve, used = self.retriever(buckets, k)
        [item] = retrieve([item])
        return item, used

    @property
    def text(self):
        """The CLIP text tower, loaded at the first text query (it needs torch); UserError for a non-CLIP cache."""
        require_text_tower(self.embedder_spec)
        with self._loading:
            if self._text_encoder is None:
                from lookalike.models.clip_text import ClipTextEncoder

                self._text_encoder = ClipTextEncoder(self.embedder_spec, self.config.device)
        return self._text_encoder

    def texts(self, texts: list[str], k: int | None = None) -> tuple[list[Item], str]:
        """Texts embedded by the CLIP text tower and searched flat; UserError for a non-CLIP cache."""
        retrieve, used = self.retriever(TEXT_BUCKETS, k)
        text = self.text
        with self._models:
            vectors = text.embed(texts)
        return retrieve([Item(text, embedding=vector) for text, vector in zip(texts, vectors)]), used
