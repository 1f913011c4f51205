"""`speed`: how close build-cache and query come to what the models allow on this machine, measured.

Figures (all on the machine it runs on, with its thread count):
- forward-only throughput of each model (batched, its own resolution): the ceiling;
- end-to-end build-cache throughput (models loaded once, as a long build sees them) and its ratio;
- the naive build (one image at a time, fp32 NCHW under no_grad, as the reference notebooks) and its ratio;
- query latency: cold (a new `cli.py query` process) and warm (p50/p95 in one process), against the
  summed batch-1 forward times, and the reference approach (embed the predicted class's gallery at query time);
- search alone on synthetic L2-normalised vectors in 1,000 buckets, each size in a fresh process;
- with `--engine ray`, the same build on Ray Data (Ray started before the clock) against the local engine;
- "camera photos": a sample of the gallery re-encoded as 12 MP JPEGs (4000x3000), built against the same
  sample at its own size, with each engine measured.
"""
from lookalike.pipeline.evaluation.speed.report import format_report
from lookalike.pipeline.evaluation.speed.run import run_speed
from lookalike.pipeline.evaluation.speed.synthetic import make_synthetic_cache, synthetic

__all__ = ["format_report", "make_synthetic_cache", "run_speed", "synthetic"]
