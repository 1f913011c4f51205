"""A cache's rows in a Milvus collection: connecting, the collection's layout, exporting, and the checks that a
collection holds the rows of the cache that reads it.

Milvus runs one client API embedded (Milvus Lite: a local `.db` file), standalone (`http://host:19530`) and
distributed, so a file URI takes the same path as a cluster's. pymilvus (the `milvus` extra) is imported here only.

One entity per cache row:
  row      INT64, the primary key: the row number in the cache generation
  vector   FLOAT_VECTOR(dim): the stored embedding, L2-normalised (inner product is cosine); index FLAT, metric IP
  path     VARCHAR: relative to the gallery root
  label    VARCHAR: the relevance label ('' when none)
  bucket   INT64: the row's top-1 bucket (cache/buckets.py's rule; -1 without a classifier)
  classes  ARRAY<INT64>: the row's top-k classes, most probable first: its soft buckets
The collection property `lookalike` (JSON) records the manifest's fingerprint, the dimension and metric, which
generation the rows come from (its name, built, count, bucket_by) and whether the export finished.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from lookalike.cache.buckets import bucket_keys
from lookalike.cache.manifest import CacheError, differences
from lookalike.cache.store import CacheData
from lookalike.models.errors import UserError, flattened, message_of

DEFAULT_COLLECTION = "lookalike"
PROPERTY = "lookalike"  # the collection property holding the export's record (JSON)
METRIC = "IP"  # inner product of unit vectors: the cosine faiss ranks by
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX")  # FLAT: exact, the same answers as the local search
EXPORT_BATCH_ROWS = 1024  # rows upserted at once (5 MiB of 1,280-d vectors: far under gRPC's 64 MiB message limit)
CONNECT_TIMEOUT_S = 10.0
MAX_LIMIT = 16_384  # the most rows one Milvus search returns (its limit + offset cap)
MAX_TEXT = 65_535  # the longest VARCHAR Milvus stores (paths and labels)
NO_BUCKET = -1  # the bucket of a row in a cache without a classifier


@dataclass(frozen=True)
class MilvusTarget:
    """Where a cache's rows live in Milvus: a URI (a Milvus Lite `.db` file or `http://host:19530`), a collection
    name and an access token ('user:password' or an API key; '' for none)."""

    uri: str
    collection: str = DEFAULT_COLLECTION
    token: str = ""

    def __str__(self) -> str:
        return f"Milvus collection {self.collection!r} at {self.uri}"


class MilvusFailed(UserError):
    """Milvus could not be reached or failed a request (a server gone, a collection dropped meanwhile): one line on
    the command line, a 502 from serve (the fault is neither the client's nor lookalike's)."""


def reason(err: Exception) -> str:
    """A pymilvus error's own message, on one line (its str() wraps it in '<MilvusException: (code=..., ...)>')."""
    return flattened(str(getattr(err, "message", "") or "")) or message_of(err)


@contextlib.contextmanager
def milvus_errors(target: MilvusTarget, doing: str) -> Iterator[None]:
    """pymilvus's errors as one MilvusFailed line naming the target and what was being done."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as err:
        raise MilvusFailed(f"{target}: {doing} failed: {reason(err)}") from None


def connect(target: MilvusTarget):
    """A MilvusClient for `target`; UserError when pymilvus is missing or the URI cannot be reached."""
    try:
        from pymilvus import MilvusClient
        from pymilvus.exceptions import MilvusException
    except ImportError:
        raise UserError("Milvus needs the 'milvus' extra (pymilvus is missing): pip install 'lookalike[milvus]'") from None
    try:
        return MilvusClient(uri=target.uri, token=target.token, timeout=CONNECT_TIMEOUT_S)
    except MilvusException as err:  # a server that does not answer, a Milvus Lite file that cannot be opened
        raise MilvusFailed(f"cannot reach Milvus at {target.uri}: {reason(err)}") from None


def export_record(data: CacheData, complete: bool) -> dict:
    """What the collection records about the rows it holds: the pipeline, the vectors, the generation."""
    manifest = data.manifest
    return {"fingerprint": manifest.fingerprint, "dim": manifest.dim, "metric": METRIC,
            "generation": data.generation.name if data.generation else None, "built": manifest.built,
            "count": len(data), "bucket_by": manifest.bucket_by, "complete": complete}


def described(client, target: MilvusTarget) -> tuple[dict | None, int | None]:
    """The collection's export record (None: it has none, so lookalike did not write it) and the dimension of its
    `vector` field (None: it has none)."""
    with milvus_errors(target, "describing the collection"):
        description = client.describe_collection(target.collection)
    try:
        record = json.loads((description.get("properties") or {})[PROPERTY])
    except (KeyError, ValueError):
        record = None
    dims = [int(field.get("params", {}).get("dim", 0)) for field in description.get("fields", [])
            if field.get("name") == "vector"]
    return record if isinstance(record, dict) else None, dims[0] if dims else None


def other_pipeline(record: dict | None, dim: int | None, data: CacheData) -> str | None:
    """Why the collection cannot hold this cache's rows (not an export, another dimension or pipeline), or None."""
    if record is None or dim is None:
        return "it was not written by export-milvus"
    if dim != data.manifest.dim:
        return f"it holds {dim}-d vectors and this cache {data.manifest.dim}-d ones"
    changed = differences(record.get("fingerprint") or {}, data.manifest.fingerprint)
    if changed:
        return f"it was exported from another pipeline ({'; '.join(changed[:3])})"
    return None


def other_generation(record: dict, data: CacheData) -> str | None:
    """Why the collection's rows (of this pipeline) are not this cache generation's, or None."""
    mine = export_record(data, complete=True)
    if any(record.get(key) != mine[key] for key in ("generation", "built", "count", "bucket_by", "metric")):
        return (f"it holds {record.get('count')} rows of the generation built {record.get('built')}, and this cache "
                f"{mine['count']} rows built {mine['built']}")
    return None


def open_collection(target: MilvusTarget, data: CacheData):
    """A client over `target`, checked to hold every row of `data`'s generation; CacheError (one line) otherwise."""
    client = connect(target)
    with milvus_errors(target, "listing collections"):
        exists = client.has_collection(target.collection)
    if not exists:
        raise CacheError(f"{target}: no such collection; write it with lookalike export-milvus --cache {data.root} "
                         f"--uri {target.uri} --collection {target.collection}")
    record, dim = described(client, target)
    why = other_pipeline(record, dim, data) or other_generation(record, data)
    if why:
        raise CacheError(f"{target}: {why}; run export-milvus with this cache (or give its own --collection)")
    if not record.get("complete"):
        raise CacheError(f"{target}: its export did not finish; run export-milvus again to resume it")
    with milvus_errors(target, "loading the collection"):
        client.load_collection(target.collection)
    return client


def _create(client, target: MilvusTarget, data: CacheData, index_type: str) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=data.manifest.dim)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_TEXT)
    schema.add_field("label", DataType.VARCHAR, max_length=MAX_TEXT)
    schema.add_field("bucket", DataType.INT64)
    schema.add_field("classes", DataType.ARRAY, element_type=DataType.INT64,
                     max_capacity=max(1, data.columns["classes"].shape[1]))
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type=index_type, metric_type=METRIC)
    client.create_collection(target.collection, schema=schema, index_params=index, consistency_level="Strong")


def _entities(data: CacheData, start: int, stop: int) -> list[dict]:
    columns = data.columns
    vectors = np.asarray(columns["embeddings"][start:stop], np.float32)
    keys = bucket_keys({name: columns[name][start:stop] for name in ("classes", "label_classes")},
                       data.manifest.bucket_by)
    buckets = keys[:, 0] if keys.shape[1] else np.full(stop - start, NO_BUCKET)
    return [{"row": row, "vector": vector, "path": str(path), "label": str(label), "bucket": int(bucket),
             "classes": classes}
            for row, vector, path, label, bucket, classes in
            zip(range(start, stop), vectors.tolist(), columns["paths"][start:stop], columns["labels"][start:stop],
                buckets, np.asarray(columns["classes"][start:stop], np.int64).tolist())]


def _present(client, target: MilvusTarget, start: int, stop: int) -> int:
    """How many of rows start..stop-1 the collection holds."""
    found = client.query(target.collection, filter=f"row >= {start} and row < {stop}", output_fields=["count(*)"])
    return int(found[0]["count(*)"])


@dataclass
class ExportReport:
    target: MilvusTarget
    rows: int  # rows the collection holds
    written: int  # rows upserted by this run (the rest were already there: a resumed or repeated export)

    def line(self) -> str:
        return f"{self.target}: {self.rows} rows, {self.written} written by this run"


def export(data: CacheData, target: MilvusTarget, replace: bool = False, index_type: str = "FLAT",
           progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Write every row of `data` to `target`, resumable and idempotent: rows are upserted by row number in batches of
    EXPORT_BATCH_ROWS, and a batch the collection already holds whole is skipped. That is safe because a collection
    only ever holds rows of the generation its record names: one holding another generation of the same pipeline is
    dropped and written anew (row numbers change between generations), and one from another pipeline is refused
    unless `replace`. The record is marked complete last, so a query refuses a half-written collection."""
    if index_type not in INDEX_TYPES:
        raise UserError(f"index {index_type!r}: use one of {', '.join(INDEX_TYPES)}")
    client = connect(target)
    with milvus_errors(target, "exporting"):
        if client.has_collection(target.collection):
            record, dim = described(client, target)
            refused = other_pipeline(record, dim, data)
            if refused and not replace:
                raise CacheError(f"{target}: {refused}; give another --collection, or --replace to overwrite it")
            if refused or other_generation(record, data):
                client.drop_collection(target.collection)
        if not client.has_collection(target.collection):
            _create(client, target, data, index_type)
        client.load_collection(target.collection)  # released when another process made it: queried below
        client.alter_collection_properties(target.collection, {PROPERTY: json.dumps(export_record(data, False))})
        written = 0
        for start in range(0, len(data), EXPORT_BATCH_ROWS):
            stop = min(start + EXPORT_BATCH_ROWS, len(data))
            if _present(client, target, start, stop) < stop - start:
                client.upsert(target.collection, _entities(data, start, stop))
                written += stop - start
            if progress:
                progress(stop, len(data))
        client.flush(target.collection)
        client.alter_collection_properties(target.collection, {PROPERTY: json.dumps(export_record(data, True))})
    return ExportReport(target, len(data), written)
