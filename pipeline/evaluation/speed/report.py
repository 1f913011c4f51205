"""The speed report as Markdown: the command, the versions and threads, then one table per part."""
from __future__ import annotations

from lookalike.pipeline.evaluation.speed.synthetic import SYNTHETIC_BUCKETS, SYNTHETIC_DIM


def format_report(report: dict, command: str) -> str:
    """The figures as Markdown: the command, the versions and threads, then one table per part."""
    lines = [*_header(report, command), "", "| measure | value |", "|---|---|", *_model_rows(report),
             *_build_and_query_rows(report), *_budget_rows(report)]
    if report["search"]:
        lines += _search_section(report["search"])
    return "\n".join(lines)


def _header(report: dict, command: str) -> list[str]:
    """The command, the versions and threads, the gallery and the build settings."""
    env = report["environment"]
    return [f"`{command}`", "",
            f"python {env['python']}, torch {env['torch']}, timm {env['timm']}, faiss {env['faiss']}, "
            f"numpy {env['numpy']}, Pillow {env['pillow']}; torch threads {env['torch_threads']}, "
            f"{env['cpu_count']} CPUs, load average at start {env['load_average']}; {env['platform']}",
            f"gallery {report['gallery']} ({report['images']} images); device {report['config']['device']}, "
            f"batch {report['config']['batch_size']}, workers {report['config']['workers']}; "
            f"models loaded in {report['model_load_s']:.1f} s"]


def _model_rows(report: dict) -> list[str]:
    """Each model's forward-only speed, and how far its outputs are from eager fp32."""
    lines = []
    for name, model in report["forward"]["models"].items():
        lines.append(f"| forward-only {name} (input {'x'.join(map(str, model['input']))}, {model['runs_as']}) | "
                     f"{model['images_per_s']:.1f} images/s; batch of 1: {model['batch1_ms_p50']:.1f} ms |")
    if "agreement" in report:
        a = report["agreement"]
        top1 = f", same top-1 class {a['top1_agreement']:.3f}" if a["top1_agreement"] is not None else ""
        lines.append(f"| outputs vs eager fp32 ({a['images']} gallery images) | embedding cosine min {a['cosine_min']:.5f}, "
                     f"mean {a['cosine_mean']:.6f}{top1} |")
    return lines


def _build_and_query_rows(report: dict) -> list[str]:
    """The forward-only ceiling, build-cache against it and against a naive build, and query latency."""
    q = report["query"]
    return [
        f"| forward-only ceiling (all models) | {report['forward_images_per_s']:.1f} images/s |",
        f"| build-cache end to end ({report['build']['images']} images, {report['build']['seconds']:.1f} s) | "
        f"{report['build_images_per_s']:.1f} images/s = {report['build_vs_forward']:.2f} x forward-only |",
        f"| build-cache phases (embed = decode + models + chunk writes; publish = scan, merge, write) | "
        f"{', '.join(f'{k} {v:.1f} s' for k, v in report['build']['phases_s'].items())}; embedding alone "
        f"{report['build']['embed_images_per_s']:.1f} images/s |",
        f"| naive build ({report['naive'].get('images', 0)} images, one at a time) | "
        f"{report['naive_images_per_s']:.1f} images/s; build-cache is {report['build_vs_naive']:.2f} x faster |",
        f"| query warm ({q['queries']} queries, buckets {q['buckets']}) | p50 {q['warm_ms_p50']:.1f} ms, "
        f"p95 {q['warm_ms_p95']:.1f} ms = {report['query_warm_vs_forward']:.2f} x the summed batch-1 forwards "
        f"({report['forward']['batch1_ms_sum']:.1f} ms) |",
        f"| query cold (new `cli.py query` process, median of {q['cold_runs']}; {q.get('path', 'torch')}) | "
        f"{q['cold_s']:.2f} s |",
    ]


def _budget_rows(report: dict) -> list[str]:
    """The parts measured only when asked: the CPU budget, another engine, camera photos, the reference query."""
    lines = []
    if "cpu_budget" in report:
        b = report["cpu_budget"]
        lines.append(f"| CPU budget ({b['cores']} cores busy: the forward's threads and the decoding threads share them) | "
                     f"forward {b['forward_core_ms']:.1f} core-ms per image, decode + preprocess "
                     f"{b['preprocess_core_ms']:.1f}: embedding at most {b['embed_bound_vs_forward']:.2f} x forward-only |")
    if "engine_build" in report:
        e = report["engine_build"]
        lines.append(f"| build-cache --engine {e['engine']} ({e['images']} images, {e['seconds']:.1f} s) | "
                     f"{e['images_per_s']:.1f} images/s = {report['engine_vs_local']:.2f} x the local engine |")
    for name, figures in report.get("camera", {}).items():
        if isinstance(figures, dict) and "camera" in figures:
            lines.append(f"| camera photos, engine {name} ({report['camera']['images']} photos at "
                         f"{'x'.join(map(str, report['camera']['size']))} vs the same photos as they are) | "
                         f"{figures['camera']['images_per_s']:.1f} vs {figures['small']['images_per_s']:.1f} images/s "
                         f"= {figures['camera_vs_small']:.2f} x |")
    if "cpu_budget" in report.get("camera", {}):
        c = report["camera"]["cpu_budget"]
        lines.append(f"| camera photos, CPU budget (decode + preprocess, one core) | {c['preprocess_core_ms']['camera']:.1f} "
                     f"vs {c['preprocess_core_ms']['small']:.1f} core-ms per image: camera photos at most "
                     f"{c['camera_vs_small_bound']:.2f} x small photos |")
    q = report["query"]
    if "reference_s_mean" in q:
        lines.append(f"| reference query (embed the predicted class's {q['reference_bucket_images_mean']:.0f} "
                     f"gallery images at query time, mean of {q['reference_queries']}) | {q['reference_s_mean']:.2f} s |")
    return lines


def _search_section(search: dict) -> list[str]:
    """Search alone on synthetic vectors: one table row per gallery size, the incremental build, the IVF sweeps."""
    lines = ["", f"Search alone, synthetic unit vectors, dim {SYNTHETIC_DIM}, {SYNTHETIC_BUCKETS} buckets "
                 "(each size in a fresh process; memory = growth of resident memory after the policy's queries: "
                 "anonymous / file-backed mapped pages):", "",
             "| items | matrix MiB | top1 ms p50 (p95) | topk:3 ms p50 (p95) | flat ms p50 (p95) | flat index | "
             "exact flat ms | recall@5 vs exact | mem after 1 query MiB | after 200 top1 + 200 topk:3 MiB | "
             "after flat MiB | peak RSS MiB | first flat query s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_search_row(count, s) for count, s in search.items()]
    lines += ["", "Incremental build adding 100 rows (merge, `auto` choice, publish; fresh process): peak resident "
                  "memory above the process's start, against one copy of the embedding matrix:", ""]
    lines += [f"- {int(count):,} rows: peak {s['incremental_publish']['peak_rss_above_start_mib']:.0f} MiB = "
              f"{s['incremental_publish']['peak_vs_matrix']:.2f} x the {s['matrix_mib']:.0f} MiB matrix, "
              f"{s['incremental_publish']['seconds']:.1f} s" for count, s in search.items()]
    sweeps = {count: s["ivf"]["sweep"] for count, s in search.items() if s.get("ivf")}
    for count, sweep in sweeps.items():
        lines.append("")
        lines.append(f"IVF at {int(count):,} items, recall@5 / ms per query by nprobe: " + ", ".join(
            f"{n}: {v['recall_at_5']:.3f} / {v['ms']:.2f}" for n, v in sweep.items()))
    return lines


def _search_row(count: str, s: dict) -> str:
    """One gallery size's search figures as a table row."""
    ivf = s.get("ivf")
    recall = f"{ivf['recall_at_5']:.3f} (nlist {ivf['nlist']}, nprobe {ivf['nprobe']})" if ivf else "exact"
    return (f"| {int(count):,} | {s['matrix_mib']:.0f} | {s['top1']['ms_p50']:.2f} ({s['top1']['ms_p95']:.2f}) | "
            f"{s['topk:3']['ms_p50']:.2f} ({s['topk:3']['ms_p95']:.2f}) | {s['flat']['ms_p50']:.2f} "
            f"({s['flat']['ms_p95']:.2f}) | {s['flat_index']} | {s['flat_exact_ms']:.1f} | {recall} | "
            f"{s['one_query']['rss_anon_mib']:.0f} / {s['one_query']['rss_file_mib']:.0f} | "
            f"{s['topk:3']['rss_anon_mib']:.0f} / {s['topk:3']['rss_file_mib']:.0f} | "
            f"{s['flat']['rss_anon_mib']:.0f} / {s['flat']['rss_file_mib']:.0f} | {s['peak_rss_mib']:.0f} | "
            f"{s['flat_first_query_s']:.1f} |")
