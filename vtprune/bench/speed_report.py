"""Tables and the plot of a ``vtprune speed`` report."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def header(report: dict[str, Any]) -> str:
    m = report["machine"]
    where = m.get("gpu") or m.get("cpu") or m["device"]
    lines = [f"geometry {report['geometry']}: {report['description']}",
             f"{report['visual_tokens']} visual tokens in a {report['prompt_tokens']}-token prompt; "
             f"{report['layers']} of {report['full_depth']} LLM layers"]
    if report["layers"] < report["full_depth"]:
        lines[-1] += (f" (TRUNCATED with --layers {report['layers']}: LLM times, FLOPs and KV bytes are for "
                      f"{report['layers']} layers; the vision tower is whole; methods' layer schedules are scaled "
                      "to the truncated depth)")
    s = report["settings"]
    lines.append(f"{where}, {m['device']}, {m['dtype']}, {m['attention']} attention, torch {m['torch']}, "
                 f"transformers {m['transformers']}, vtprune {m['vtprune']} ({m.get('git_commit')}), "
                 f"{m['torch_threads']} threads, load average {m['load_average_start'][0]:.1f} -> "
                 f"{m.get('load_average_end', [float('nan')])[0]:.1f}")
    lines.append(f"medians of {s['repeats']} rounds (TTFT and vtprune's own time: {min(s['repeats'], 3)}; IQR in "
                 f"brackets) after {s['warmup']} warm-up; each round runs the case and the unpruned model back to "
                 f"back; decode: {s['decode_tokens']} greedy steps at batch 1 and 8 (the batch-1 cache repeated), timed "
                 "after 2 untimed ones")
    if s.get("reuse_vision"):
        lines.append("--reuse-vision: the image was encoded once; cases whose method leaves the vision tower alone "
                     "ran from its features, with the tower's time (measured once) added to their prefill and TTFT")
    return "\n".join(lines)


def _ms(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "-"
    return f"{stat['median']:.0f} [{stat['q1']:.0f}-{stat['q3']:.0f}]"


def format_table(report: dict[str, Any]) -> str:
    """Prefill: latency, split, speedup against the FLOPs bound, overhead, memory."""
    rows = ["| case | visual in / layer avg | prefill ms | vision ms | LLM ms | TTFT ms | prefill speedup (bound, "
            "eff.) | LLM speedup (bound, eff.) | LLM FLOPs | vision FLOPs | vtprune ms (% of unpruned prefill) | "
            "peak MB | KV MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        overhead = "-" if r["overhead"] is None else \
            f"{r['overhead']['median']:.1f} ({100 * r['overhead_share']:.1f}%)"
        peak = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        rows.append(
            f"| {r['case']} | {r['llm_input_visual_tokens']} / {r['mean_visual_tokens']:.0f} | {_ms(r['prefill'])} | "
            f"{_ms(r['vision'])} | {_ms(r['llm'])} | {_ms(r['ttft'])} | {r['speedup_prefill']:.2f}x "
            f"({r['bound_prefill']:.2f}x, {100 * r['efficiency_prefill']:.0f}%) | {r['speedup_llm']:.2f}x "
            f"({r['bound_llm']:.2f}x, {100 * r['efficiency_llm']:.0f}%) | {r['llm_flops_ratio']:.3f} | "
            f"{r['vision_flops_ratio']:.3f} | {overhead} | {peak} | {r['kv_cache_mb']:.1f} |")
    return "\n".join(rows)


def format_decode_table(report: dict[str, Any]) -> str:
    batches = list(report["results"][0]["decode_tokens_per_s"])
    if not batches:
        return "decode not measured (--decode-tokens 0)"
    head = " | ".join(f"tok/s b{b} (unpruned)" for b in batches)
    rows = [f"| case | KV MB (share) | {head} |", "|---|---|" + "---|" * len(batches)]
    for r in report["results"]:
        cells = " | ".join(f"{r['decode_tokens_per_s'][b]:.1f} ({r['base_decode_tokens_per_s'][b]:.1f})"
                           for b in batches)
        rows.append(f"| {r['case']} | {r['kv_cache_mb']:.1f} ({r['kv_ratio']:.2f}) | {cells} |")
    return "\n".join(rows)


def plot_speedup(report: dict[str, Any], out: Path) -> Path:
    """speedup.png: measured LLM and prefill speedups vs visual tokens per LLM layer (layer average), every method,
    with the FLOPs bound of keeping k visual tokens at every layer drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vtprune.bench.flops import prefill_flops

    results = report["results"]
    base = results[0]
    depth, dims = report["layers"], report["llm_dims"]
    visual0 = base["visual_tokens_per_layer"][0]
    text = base["tokens_per_layer"][0] - visual0
    ks = sorted({max(1, round(visual0 * f / 64)) for f in range(1, 65)})
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results[1:]:
        groups.setdefault(r["method"] + (" naive" if r["naive"] else ""), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, vision, title in ((axes[0], "speedup_llm", 0.0, "language model (prefill)"),
                                   (axes[1], "speedup_prefill", base["vision_flops"], "prefill: vision tower + LLM")):
        for name, records in sorted(groups.items()):
            records = sorted(records, key=lambda r: r["mean_visual_tokens"])
            ax.plot([r["mean_visual_tokens"] for r in records], [r[key] for r in records], marker="o", label=name,
                    linestyle="--" if name.endswith("naive") else "-")
        full = vision + base["llm_flops"]
        bound = [full / (vision + prefill_flops([text + k] * depth, *dims)) for k in ks]
        ax.plot(ks, bound, color="black", linewidth=2, label="FLOPs bound: k visual tokens at every LLM layer"
                + (", vision tower whole" if vision else ""))
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("visual tokens per LLM layer (layer average)")
        ax.set_ylabel("speedup over unpruned (x)")
        ax.set_title(title)
    axes[1].legend(fontsize=7, ncol=2)
    truncated = f", LLM truncated to {depth} of {report['full_depth']} layers" if depth < report["full_depth"] else ""
    fig.suptitle(f"vtprune speed, {report['geometry']} ({report['machine']['device']}, {report['machine']['dtype']}"
                 f"{truncated})", fontsize=10)
    fig.tight_layout()
    path = out / "speedup.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
