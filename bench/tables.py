"""Render bench/results/*.json as the Markdown tables used in BENCHMARKS.md.

python bench/tables.py                          # every result file in bench/results
python bench/tables.py bench/results/train_throughput_cpu.json
python bench/tables.py --round 2 bench/results/train_throughput_cuda_h100.json   # one round, not the median
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import benchlib

TARGET = 1.3  # ours / timm's pipeline, from the benchmark issue


def machine_line(m: dict) -> str:
    where = (
        f"{m['gpu']} + {m['cpu']} ({m['cpu_count']} cores)"
        if m.get("gpu")
        else f"{m['cpu']}, {m['cpu_count']} cores"
    )
    load = m.get("load_average", [None])[0]
    return (
        f"*{where}; torch {m['torch']}, {m['torch_threads']} threads; {m['date']}; load average at start "
        f"{load:.1f}*  \n`{m['command']}`"
    )


def train_table(d: dict, round_: int | None = None) -> list[str]:
    names = list(d["results"][0]["images_per_second"]) if d["results"] else []
    others = [n for n in names if n != "ours"]
    st = d["settings"]
    what = (
        "the data path alone (loader + transform, no training step)"
        if st.get("data_only")
        else f"the training step ({st['precision']}, reference loaders with {st['workers']} worker(s))"
    )
    per_row = any("precision" in r for r in d["results"])  # newer files: `auto` resolves per model
    lines = [machine_line(d["machine"])]
    if d["results"]:
        lines += [
            "",
            f"Images/s of {what}; "
            + (f"round {round_} of {d['results'][0]['repeats']}." if round_ else
               f"median of {d['results'][0]['repeats']} alternating rounds."),
            "",
            "| model | px | batch | "
            + ("precision | " if per_row else "")
            + " | ".join(names)
            + " | "
            + " | ".join(f"ours/{n}" for n in others)
            + " |",
            "|---" * (3 + per_row + len(names) + len(others)) + "|",
        ]
    for r in d["results"]:
        ips, ratio = r["images_per_second"], r["ratios"]
        if round_:
            ips = {k: v[round_ - 1] for k, v in r["rounds"].items()}
            ratio = benchlib.ratios(ips)
        cells = [f"{ips[n]:,.1f}" for n in names]
        marks = [
            f"**{ratio[f'ours/{n}']:.2f}**"
            if n == "timm" and ratio[f"ours/{n}"] >= TARGET
            else f"{ratio[f'ours/{n}']:.2f}"
            for n in others
        ]
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch_size']} | "
            + (f"{r.get('precision', '')} | " if per_row else "")
            + " | ".join(cells + marks)
            + " |"
        )
    lines += [f"- not measured, {e['model']} @ {e['size']} px: {e['error']}" for e in d.get("errors", [])]
    if d.get("epoch"):
        e = d["epoch"]
        lines += [
            "",
            f"One epoch of {e['images']:,} images, {e['model']} at {e['size']} px, batch {e['batch_size']}:",
            "",
            "| pipeline | seconds | images/s | GPU utilisation (samples) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['seconds']:.1f} | {v['images_per_second']:,.0f} | "
            + (f"{v['gpu_utilisation_percent']:.0f} % ({v['gpu_utilisation_samples']})"
               if v.get("gpu_utilisation_samples", 0) >= 5 else "–")  # fewer: the sampler starved
            + " |"
            for k, v in e["pipelines"].items()
        ]
    return lines


def inference_table(d: dict) -> list[str]:
    backends = []
    for r in d["results"]:
        backends += [b for b in r["images_per_second"] if b not in backends]
    lines = [
        machine_line(d["machine"]),
        "",
        "| model | px | batch | " + " | ".join(backends) + " | compile / export s |",
        "|---" * (4 + len(backends)) + "|",
    ]
    for r in d["results"]:
        cells = [
            f"{r['images_per_second'][b]:,.1f}" if b in r["images_per_second"] else "–" for b in backends
        ]
        prep = ", ".join(f"{b} {s:.0f}" for b, s in r["prepare_seconds"].items()) or "–"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch_size']} | " + " | ".join(cells) + f" | {prep} |"
        )
    return lines


def scaling_table(d: dict) -> list[str]:
    setup = f"100 % = {d['settings']['full']:,} training images, global batch {d['settings']['batch_size']}"
    lines = [
        machine_line(d["machine"]),
        "",
        setup,
        "",
        "| processes | fraction | images | epoch s | images/s | run wall s |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["results"]:
        lines.append(
            f"| {r['processes']} | {r['fraction']:.0%} | {r['train_images']:,} | {r['epoch_seconds']:.1f} | "
            f"{r['images_per_second']:,.1f} | {r['wall_seconds']:.0f} |"
        )
    return lines


def profile_table(d: dict) -> list[str]:
    lines = [machine_line(d["machine"]), ""]
    for r in d["results"]:
        total = r["ms_per_step"]
        phases = ", ".join(f"{k} {v / total:.0%}" for k, v in r["phases_ms"].items())
        top = ", ".join(f"{t['op'][:40]} {t['self_ms_per_step']:.1f} ms" for t in r["top_ops"][:6])
        head = f"- {d['settings']['model']} {r['size']} px, batch {r['batch_size']}: {total:.0f} ms/step"
        lines.append(f"{head} — {phases}. Top operators: {top}")
    return lines


def precision_table(d: dict) -> list[str]:
    variants, rounds = [], d["settings"]["repeats"]
    for r in d["results"]:
        variants += [v for v in r["images_per_second"] if v not in variants]
    lines = [
        machine_line(d["machine"]),
        "",
        f"Images/s of one training step (random input, fused SGD, channels_last); median of {rounds} rounds.",
        "",
        "| model | px | batch | " + " | ".join(variants) + " | bf16/fp32 | auto picks | compile s |",
        "|---" * (6 + len(variants)) + "|",
    ]
    for r in d["results"]:
        ips = r["images_per_second"]
        cells = [f"{ips[v]:,.1f}" if v in ips else "–" for v in variants]
        seconds = r.get("compile_seconds", {})
        compiled = ", ".join(f"{k.removesuffix('_compile')} {v:.0f}" for k, v in seconds.items()) or "–"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch_size']} | " + " | ".join(cells)
            + f" | {r['bf16/fp32']:.2f} | {'bf16' if r['auto_picks_bf16'] else 'fp32'} | {compiled} |"
        )
    return lines


def soak_table(d: dict) -> list[str]:
    st, req, mem, lat, server = d["settings"], d["requests"], d["memory"], d["latency"], d["server"]
    errors = ", ".join(f"{k} {v}" for k, v in req["errors_by_kind"].items() if v) or "none"
    slope, late = mem["rss_slope_mb"], mem.get("rss_slope_mb_second_half") or {}
    refusals = "; ".join(f"{name}: {a['outcome']}" + (f" ({a['detail'][:70]})" if a["detail"] else "")
                         for name, a in d["first_pass"].items() if a["kind"] != "photo")
    def ms(p: dict) -> str:
        return f"{p['p50_ms']} / {p['p95_ms']} ms" if p["n"] else "–"

    summary = (
        f"{st['model']} ({st['backend']}), {st['clients']} clients for "
        f"{st['duration_s']:.0f} s, a new session per {st['sessions']}: {req['total']:,} requests "
        f"({req['requests_per_s']:.1f}/s), {req['correct']:,} answered as expected, errors: {errors}. "
        f"Latency (upload to result) p50 / p95: photos {ms(lat['photos'])}, huge files {ms(lat['huge'])}, broken "
        f"files {ms(lat['broken'])}. Cold start {server['cold_start_s']:.1f} s; {server['log_tracebacks']} "
        "tracebacks in the server log."
    )
    memory = (
        f"Server RSS (with children): {mem['rss_mb_start']:.0f} MB idle after start, "
        f"{mem['rss_mb_after_warmup']:.0f} MB after {mem['warmup_s']:.0f} s of warm-up "
        f"({mem['warmup_requests']:,} requests), {mem['rss_mb_end']:.0f} MB at the end (max "
        f"{mem['rss_mb_max']:.0f}); slope after warm-up **{slope['per_1000_requests']} MB per 1,000 requests** "
        f"(r² {slope['r2']}), {late.get('per_1000_requests')} in its second half. Threads "
        f"{mem['threads']['start']} → {mem['threads']['end']}, open files {mem['open_files']['start']} → "
        f"{mem['open_files']['end']}; temp files {mem['uploads_mb']['start']:.0f} → {mem['uploads_mb']['end']:.0f} MB "
        f"(gradio's uploads and cache: {mem['uploads_slope_mb']['per_1000_requests']} MB per 1,000 requests), "
        f"{mem['tmp_mb']['start']:.1f} → {mem['tmp_mb']['end']:.1f} MB (other)."
    )
    lines = [
        machine_line(d["machine"]),
        "",
        summary,
        "",
        memory,
        "",
        *([f"First pass, the inputs that must be refused: {refusals}.", ""] if refusals else []),
        "| window s | requests | req/s | errors | p50 / p95 ms | photos p50 / p95 ms | RSS MB | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {w['start_s']:.0f}–{w['end_s']:.0f} | {w['requests']:,} | {w['requests_per_s'] or 0:.1f} | {w['errors']} | "
        f"{w['p50_ms']} / {w['p95_ms']} | {w['photo_p50_ms']} / {w['photo_p95_ms']} | {w['rss_mb']} | "
        f"{w['load_1min']} |"
        for w in d["windows"]
    ]
    return lines


def time_to_accuracy_table(d: dict) -> list[str]:
    """One row per run: the figures of BENCHMARKS.md's "Time to accuracy" rows; each run's command in the file."""
    def pct(x):
        return "–" if x is None else f"{100 * x:.2f} %"

    def minutes(x):
        return "–" if x is None else f"{x:.2f} min"

    lines = ["| run | CPU | seed | precision | epochs | training | wall | test top-1 | + TTA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in d["runs"].items():
        cpu = (r.get("machine") or d.get("machine") or {}).get("cpu", "–")
        lines.append(f"| {name} | {cpu} | {r.get('seed', '–')} | {r.get('mixed_precision') or '–'} | "
                     f"{r.get('epochs_run', '–')} | {minutes(r.get('train_minutes'))} | {minutes(r.get('wall_minutes'))} "
                     f"| {pct(r.get('test_top1'))} | {pct(r.get('tta_top1'))} |")
    return lines


RENDER = {
    "time_to_accuracy": time_to_accuracy_table,
    "cpu_precision": precision_table,
    "train_throughput": train_table,
    "inference": inference_table,
    "scaling": scaling_table,
    "profile_step": profile_table,
    "demo_soak": soak_table,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="result files (default: bench/results/*.json)")
    p.add_argument("--round", type=int, default=None,
                   help="training throughput: show this round's figures (1 = first) instead of the median")
    args = p.parse_args(argv)
    for path in args.files or sorted(benchlib.RESULTS.glob("*.json")):
        d = json.loads(path.read_text())
        render = RENDER.get(d.get("benchmark"))
        if render:
            print(f"### {path.name}\n")
            lines = render(d, args.round) if args.round and render is train_table else render(d)
            print("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
