"""Serving benefit of the vLLM plug-in, measured with vLLM's offline API (an engine per configuration, the unpruned
one included, the same requests for all):

    python -m vtprune.integrations.vllm_bench --methods divprune:64 fastervlm:144 --concurrency 1 8 32

For each configuration and concurrency c: ``c`` requests submitted together, each generating ``--tokens`` tokens,
``--rounds`` times. Reported: requests/s (requests over the wall time of the round), time to first token (the wall
time of the same ``c`` requests with one generated token: the prefill of the batch, which is when every request has
its first token), prompt tokens per request, and both as a ratio to unpruned. Medians over rounds, with min-max.
Prefix caching and the multimodal processor cache are off, so every request encodes its image and prefills.
Machine, vLLM and torch versions go into the JSON with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any


def _engine(model: str, spec: dict | None, dtype: str):
    from vllm import LLM

    overrides = {"hf_overrides": {"vtprune": spec}} if spec else {}
    return LLM(model, dtype=dtype, max_model_len=1024, enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 1},
               kv_cache_memory_bytes=1 << 30,  # the same KV pool for every configuration
               enable_prefix_caching=False, mm_processor_cache_gb=0, **overrides)


def _requests(count: int) -> list[dict[str, Any]]:
    from vtprune import reference

    samples = [reference.sample(i) for i in range(count)]
    return [{"prompt": reference.format_prompt(s.question), "multi_modal_data": {"image": s.image}} for s in samples]


def _timed(llm, requests, tokens: int) -> tuple[float, int]:
    from vllm import SamplingParams

    start = time.perf_counter()
    out = llm.generate(requests, SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0), use_tqdm=False)
    return time.perf_counter() - start, len(out[0].prompt_token_ids)


def measure(model: str, configs: list[tuple[str, dict | None]], concurrency: list[int], tokens: int, rounds: int,
            dtype: str) -> dict[str, Any]:
    import torch
    import vllm

    requests = _requests(max(concurrency))
    rows = []
    for name, spec in configs:
        llm = _engine(model, spec, dtype)
        _timed(llm, requests[:2], 2)  # warm-up
        for c in concurrency:
            batch = requests[:c]
            ttft, throughput, prompt = [], [], 0
            for _ in range(rounds):
                seconds, prompt = _timed(llm, batch, 1)
                ttft.append(seconds)
                seconds, _ = _timed(llm, batch, tokens)
                throughput.append(c / seconds)
            rows.append({"config": name, "concurrency": c, "prompt_tokens": prompt,
                         "requests_per_s": statistics.median(throughput), "requests_per_s_range": [min(throughput),
                                                                                                    max(throughput)],
                         "ttft_s": statistics.median(ttft), "ttft_s_range": [min(ttft), max(ttft)]})
        del llm
    base = {r["concurrency"]: r for r in rows if r["config"] == "unpruned"}
    for r in rows:
        r["requests_per_s_x"] = r["requests_per_s"] / base[r["concurrency"]]["requests_per_s"]
        r["ttft_x"] = r["ttft_s"] / base[r["concurrency"]]["ttft_s"]
    return {"rows": rows, "model": model, "dtype": dtype, "tokens": tokens, "rounds": rounds,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "load_average_at_end": os.getloadavg(), "vllm": vllm.__version__, "torch": torch.__version__}


def table(report: dict[str, Any]) -> str:
    lines = ["| config | concurrent requests | prompt tokens | requests/s (x unpruned) | time to first token s "
             "(x unpruned) |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['config']} | {r['concurrency']} | {r['prompt_tokens']} | {r['requests_per_s']:.2f} "
                     f"({r['requests_per_s_x']:.2f}) | {r['ttft_s']:.3f} ({r['ttft_x']:.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a LLaVA-1.5 checkpoint folder (default: the shipped MiniLLaVA)")
    parser.add_argument("--methods", nargs="+", default=["divprune:64", "fastervlm:64", "pool:144"],
                        help="method:keep entries (default: %(default)s); the unpruned engine always runs first")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32], help="default: %(default)s")
    parser.add_argument("--tokens", type=int, default=8, help="generated tokens per request (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions per cell (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="default: %(default)s (bfloat16 on a GPU)")
    parser.add_argument("--out", default="runs/vllm-bench", help="folder for bench.json (default: %(default)s)")
    args = parser.parse_args(argv)
    from vtprune import reference

    configs: list[tuple[str, dict | None]] = [("unpruned", None)]
    for entry in args.methods:
        name, _, keep = entry.partition(":")
        configs.append((entry, {"method": name, **({"keep": int(keep)} if keep else {})}))
    report = measure(args.model or str(reference.path()), configs, args.concurrency, args.tokens, args.rounds,
                     args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"\n{report['machine']}, vLLM {report['vllm']}, torch {report['torch']}, {args.dtype}; "
          f"load average at the end {report['load_average_at_end'][0]:.1f}; JSON: {out / 'bench.json'}")


if __name__ == "__main__":
    main()
