"""Command line: ``vtprune bench | show | methods | train-reference``."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DEFAULT_SAMPLES = 480


def _load(model_path: str | None, device: str):
    """The model and processor to measure: ``model_path``, else the shipped MiniLLaVA checkpoint."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtprune.bench import reference

    path = model_path or str(reference.REFERENCE_DIR)
    if model_path is None and not (reference.REFERENCE_DIR / "config.json").exists():
        raise SystemExit(f"no MiniLLaVA checkpoint in {reference.REFERENCE_DIR}: reinstall vtprune, retrain it with "
                         "`vtprune train-reference`, or pass --model")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, AutoProcessor.from_pretrained(path)


def _bench(args: argparse.Namespace) -> None:
    from vtprune.bench import synthvqa as sv
    from vtprune.bench.plots import plot_report
    from vtprune.bench.runner import format_table, run_bench, save_report
    from vtprune.methods import REGISTRY

    model, processor = _load(args.model, args.device)
    methods = args.methods or sorted(REGISTRY)
    samples = sv.load_split("test", args.samples)
    start = time.perf_counter()
    report = run_bench(model, processor, samples, methods, args.budgets, batch_size=args.batch_size)
    report["model"] = args.model or "shipped MiniLLaVA (vtprune/reference/mini-llava)"
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    path = save_report(report, out)
    print(format_table(report))
    print(f"\n{len(samples)} test questions, {report['wall_seconds']} s; JSON: {path}")
    if not args.no_plots:
        for plot in plot_report(report, out):
            print(f"plot: {plot}")


def _show(args: argparse.Namespace) -> None:
    from vtprune.bench import synthvqa as sv
    from vtprune.bench.reference import format_prompt
    from vtprune.bench.show import show

    model, processor = _load(args.model, args.device)
    sample = sv.load_split("test", args.sample + 1)[args.sample]
    params = {"keep": args.keep} if args.keep else {}
    print(show(model, processor, sample, args.method, Path(args.out), format_prompt, **params))


def _methods(args: argparse.Namespace) -> None:
    import vtprune
    from vtprune.methods import support_table

    if args.markdown:
        print(support_table())
        return
    for info in vtprune.methods():
        params = ", ".join(f"{k}={v['default']!r}" for k, v in info["params"].items())
        print(f"{info['name']:<10} stages={','.join(info['stages']):<16} {info['paper']}")
        print(f"{'':<10} budget: {info['budget']} (default ratio {info['default_ratio']})")
        print(f"{'':<10} params: {params}")
        print(f"{'':<10} runs on: {', '.join(info['families'])}")


def _train(args: argparse.Namespace) -> None:
    from vtprune.bench.reference import REFERENCE_DIR, train_reference

    metrics = train_reference(args.output or REFERENCE_DIR, device=args.device, vision_from=args.vision_from)
    print(json.dumps(metrics, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vtprune", description="visual token reduction for VLMs")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="methods x budgets on SynthVQA: accuracy, FLOPs, latency, plots")
    bench.add_argument("--model", help="local path or hub id (default: the shipped MiniLLaVA)")
    bench.add_argument("--methods", nargs="+", help="registered method names (default: all)")
    bench.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 192], help="visual tokens kept")
    bench.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="test questions (balanced families)")
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--out", default="runs/bench", help="folder for bench.json and the plots")
    bench.add_argument("--no-plots", action="store_true")
    bench.set_defaults(run=_bench)

    show = commands.add_parser("show", help="PNG of a test image with a method's kept tokens highlighted")
    show.add_argument("--method", required=True)
    show.add_argument("--keep", type=int)
    show.add_argument("--sample", type=int, default=0, help="index into the test split")
    show.add_argument("--model")
    show.add_argument("--device", default="cpu")
    show.add_argument("--out", default="runs/show.png")
    show.set_defaults(run=_show)

    listing = commands.add_parser("methods", help="registered methods, stages, budgets, defaults, model families")
    listing.add_argument("--markdown", action="store_true", help="the method x model-family support table")
    listing.set_defaults(run=_methods)

    train = commands.add_parser("train-reference", help="retrain the shipped MiniLLaVA from scratch")
    train.add_argument("--output", help="folder to write the checkpoint (default: the shipped one)")
    train.add_argument("--device", default="cpu")
    train.add_argument("--vision-from", help="reuse stage (a)'s vision tower from this earlier checkpoint of the recipe")
    train.set_defaults(run=_train)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
