"""Command line: ``vtprune bench [--task synthseg] | show | methods | train-reference | train-atp |
export-lmms-task``."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_SAMPLES = 480


DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes; torch is imported only when a command runs


def _load(model_path: str | None, device: str, dtype: str = "float32"):
    """The model and processor to measure: a shipped reference model by name (``mini-llava``, ``mini-llava-next``),
    a local path (any supported family), else the shipped MiniLLaVA."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtprune import reference

    if model_path == "mini-lisa":
        raise SystemExit("mini-lisa is a segmentation model (SynthSeg, gIoU): use `vtprune bench --task synthseg`")
    try:
        path = str(reference.path(model_path or "mini-llava")) if model_path in (None, *reference.MODELS) \
            else model_path
    except FileNotFoundError as error:
        raise SystemExit(f"{error}, or pass --model") from None
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, AutoProcessor.from_pretrained(path)


def _load_lisa(model_path: str | None, device: str, dtype: str = "float32"):
    """The MiniLISA model and processor for ``--task synthseg``: the shipped ``mini-lisa`` by default, else a local
    folder written by ``vtprune train-reference --model mini-lisa``."""
    import torch
    from transformers import AutoProcessor

    from vtprune import reference
    from vtprune.reference.lisa import MiniLisa

    fix = ("--task synthseg needs a MiniLISA checkpoint (a LISA-style model: VLM with a [SEG] token and a mask "
           "decoder); train one with `vtprune train-reference --model mini-lisa --output DIR` and pass --model DIR")
    name = model_path or "mini-lisa"
    try:
        folder = reference.path(name) if name == "mini-lisa" or name in reference.MODELS else Path(name)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"{error}. {fix}") from None
    try:
        model = MiniLisa.from_pretrained(folder, dtype=getattr(torch, dtype))
    except FileNotFoundError as error:
        raise SystemExit(f"{error}. {fix}") from None
    return model.to(device).eval(), AutoProcessor.from_pretrained(folder)


def _resolution(requested: str, processor) -> str:
    """SynthVQA's variant for a model: ``auto`` picks the high-resolution scenes for anyres (LLaVA-NeXT) processors."""
    if requested != "auto":
        return requested
    return "high" if getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None) else "base"


def _budget(text: str) -> int | float:
    """A --budgets entry: ``64`` (keep= a count) or ``20%`` / ``0.2`` (ratio= a share)."""
    try:
        if text.endswith("%"):
            value = float(text[:-1]) / 100
        elif "." in text:
            value = float(text)
        else:
            return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count (64) or a share (20% or 0.2)") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a share must lie in (0, 1], e.g. 20% or 0.2")
    return value


def _bench(args: argparse.Namespace) -> None:
    if args.task == "synthseg":
        _bench_seg(args)
        return
    if args.nominal_budgets:
        raise SystemExit("--nominal-budgets is a --task synthseg option; the SynthVQA bench always passes budgets in "
                         "each method's own convention")
    from vtprune.bench import synthvqa as sv
    from vtprune.bench.plots import plot_report
    from vtprune.bench.runner import DEFAULT_BUDGETS, format_decode_table, format_table, run_bench, save_report
    from vtprune.methods import REGISTRY

    model, processor = _load(args.model, args.device, args.dtype)
    methods = args.methods or sorted(REGISTRY)
    resolution = _resolution(args.resolution, processor)
    samples = sv.load_split("test", args.samples, resolution=resolution)
    start = time.perf_counter()
    report = run_bench(model, processor, samples, methods, args.budgets or DEFAULT_BUDGETS, batch_size=args.batch_size,
                       scoring=args.scoring, resolution=resolution, decode_tokens=args.decode_tokens)
    report["dtype"] = args.dtype
    report["resolution"] = resolution
    report["model"] = (f"shipped {args.model or 'mini-llava'} (MiniLLaVA{'-NeXT' if args.model == 'mini-llava-next' else ''})"
                       if args.model in (None, "mini-llava", "mini-llava-next") else args.model)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    path = save_report(report, out)
    print(format_table(report))
    if args.decode_tokens:
        print("\n" + format_decode_table(report))
    print(f"\n{len(samples)} test questions, {report['wall_seconds']} s; JSON: {path}")
    if args.readme:
        from vtprune.bench.runner import update_readme

        update_readme(report, Path(args.readme))
        print(f"results table written into {args.readme}")
    if not args.no_plots:
        for plot in plot_report(report, out):
            print(f"plot: {plot}")


def _bench_seg(args: argparse.Namespace) -> None:
    """``vtprune bench --task synthseg``: see ``vtprune.bench.seg_runner``."""
    from vtprune.bench import synthseg as ss
    from vtprune.bench.runner import save_report
    from vtprune.bench.seg_runner import DEFAULT_BUDGETS, default_methods, run_seg_bench

    synthvqa_only = {"--readme": args.readme, "--decode-tokens": args.decode_tokens,
                     "--scoring": args.scoring != "likelihood", "--resolution": args.resolution != "auto"}
    given = [flag for flag, value in synthvqa_only.items() if value]
    if given:
        raise SystemExit(f"{', '.join(given)}: SynthVQA option(s), not used by --task synthseg; leave them out")
    model, processor = _load_lisa(args.model, args.device, args.dtype)
    samples = ss.load_split("test", args.samples)
    start = time.perf_counter()
    report, examples = run_seg_bench(model, processor, samples, args.methods or default_methods(),
                                     args.budgets or DEFAULT_BUDGETS, batch_size=args.batch_size,
                                     match=not args.nominal_budgets)
    report["dtype"] = args.dtype
    report["model"] = "shipped mini-lisa (MiniLISA)" if args.model in (None, "mini-lisa") else args.model
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    path = save_report(report, out)
    print(report["table"])
    print(f"\n{len(samples)} SynthSeg test prompts, {report['wall_seconds']} s; JSON: {path}")
    if args.no_plots:
        return
    try:
        from vtprune.bench.plots import plot_masks
    except ImportError:
        print("matplotlib is not installed: masks.png not written")
        return
    print(f"plot: {plot_masks(samples[:len(examples['unpruned']['masks'])], examples, out / 'masks.png')}")


def _show(args: argparse.Namespace) -> None:
    from vtprune.bench import synthvqa as sv
    from vtprune.bench.evaluate import prompt_builder
    from vtprune.bench.show import show

    model, processor = _load(args.model, args.device)
    params = {"keep": args.keep} if args.keep else {}
    sample = sv.load_split("test", args.sample + 1, resolution=_resolution("auto", processor))[args.sample]
    print(show(model, processor, sample, args.method, Path(args.out),
               prompt_builder(processor), **params))


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
    if args.model == "mini-lisa":
        from vtprune import reference
        from vtprune.reference.train_lisa import train_lisa_reference

        metrics = train_lisa_reference(args.output or "runs/mini-lisa", base=args.base or reference.path(),
                                       device=args.device, overwrite=args.overwrite)
        print(json.dumps(metrics, indent=1))
        return
    if args.model == "mini-llava-next":
        from vtprune import reference
        from vtprune.reference.train_next import train_next_reference

        metrics = train_next_reference(args.output or "runs/mini-llava-next", base=args.base or reference.path(),
                                       device=args.device, overwrite=args.overwrite)
        print(json.dumps(metrics, indent=1))
        return
    from vtprune.reference.train import train_reference

    metrics = train_reference(args.output or "runs/mini-llava", device=args.device, vision_from=args.vision_from,
                              overwrite=args.overwrite)
    print(json.dumps(metrics, indent=1))


def _train_atp(args: argparse.Namespace) -> None:
    from vtprune.reference.atp import train_atp

    model, processor = _load(args.model, args.device)
    params = {"layers": tuple(args.layers)} if args.layers else {}
    result = train_atp(model, processor, args.output, target=args.target, steps=args.steps, lr=args.lr,
                       batch_size=args.batch_size, train_llm=args.train_llm, **params)
    print(f"ATP modules in {result['output']} ({result['seconds'] / 60:.1f} min); use them with "
          f"vtprune.apply(model, 'atp', weights={result['output']!r})")


def _export_task(args: argparse.Namespace) -> None:
    from vtprune.integrations.synthvqa_task import export_synthvqa

    folder = export_synthvqa(args.folder, args.samples, args.split)
    print(f"lmms-eval tasks synthvqa_mc and synthvqa_gen in {folder}: pass --include_path {folder}")


def main(argv: list[str] | None = None) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("vtprune")
    except PackageNotFoundError:
        installed = "unknown"
    parser = argparse.ArgumentParser(prog="vtprune", description="visual token reduction for VLMs")
    parser.add_argument("--version", action="version", version=f"vtprune {installed}")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    bench = commands.add_parser("bench", **defaults, help="methods x budgets on SynthVQA (accuracy) or SynthSeg "
                                "(gIoU/cIoU): FLOPs, latency, plots")
    bench.add_argument("--task", default="synthvqa", choices=["synthvqa", "synthseg"],
                       help="synthvqa: question answering on a VLM; synthseg: referring segmentation on a LISA-style "
                       "model (MiniLISA), budgets matched in image tokens per LLM layer")
    bench.add_argument("--model", help="a shipped reference model (mini-llava, mini-llava-next; synthseg: mini-lisa), "
                                       "a local path or a hub id (default: mini-llava; synthseg: mini-lisa)")
    bench.add_argument("--methods", nargs="+", help="registered method names or variants name:key=value,... (default: "
                                                    "all; synthseg: csp, fastv, pyramiddrop, ... first)")
    bench.add_argument("--budgets", nargs="+", type=_budget,
                       help="counts (keep=, e.g. 64) or shares (ratio=, e.g. 20%% or 0.2); synthvqa: in each "
                       "method's convention (default: 64 128 144 192; 144 = 25%% of 576, ATP's target); synthseg: "
                       "image tokens per LLM layer, averaged over layers (default: 35%% 30%% 20%%)")
    bench.add_argument("--nominal-budgets", action="store_true",
                       help="synthseg: pass each method the budget in its own convention instead of matching the "
                       "layer average (rows still report the measured average)")
    bench.add_argument("--resolution", default="auto", choices=["auto", "base", "high"],
                       help="SynthVQA variant: 336-px scenes, or high-resolution ones (auto: high for LLaVA-NeXT "
                       "processors)")
    bench.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                       help="test questions or SynthSeg prompts (balanced families)")
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    bench.add_argument("--dtype", default="float32", choices=DTYPES, help="model weights' dtype")
    bench.add_argument("--scoring", default="likelihood", choices=["likelihood", "generate"],
                       help="closed-choice answer likelihood, or greedy generation matched against the answer")
    bench.add_argument("--decode-tokens", type=int, default=0,
                       help="also measure KV-cache memory and throughput over this many generated tokens (decode "
                       "policies; 0: off)")
    bench.add_argument("--out", default="runs/bench", help="folder for bench.json and the plots")
    bench.add_argument("--no-plots", action="store_true")
    bench.add_argument("--readme", help="also write the results table into this README (between its bench-results "
                                        "markers)")
    bench.set_defaults(run=_bench)

    show = commands.add_parser("show", **defaults, help="PNG of a test image with a method's kept tokens highlighted")
    show.add_argument("--method", required=True)
    show.add_argument("--keep", type=int)
    show.add_argument("--sample", type=int, default=0, help="index into the test split")
    show.add_argument("--model", help="a shipped reference model name or a local path (default: mini-llava)")
    show.add_argument("--device", default="cpu")
    show.add_argument("--out", default="runs/show.png")
    show.set_defaults(run=_show)

    listing = commands.add_parser("methods", **defaults, help="registered methods, stages, budgets, defaults, model families")
    listing.add_argument("--markdown", action="store_true", help="the method x model-family support table")
    listing.set_defaults(run=_methods)

    train = commands.add_parser("train-reference", **defaults,
                                help="retrain a shipped reference model (its recipe; MiniLLaVA from scratch)")
    train.add_argument("--model", default="mini-llava", choices=["mini-llava", "mini-llava-next", "mini-lisa"])
    train.add_argument("--output", help="folder for the new checkpoint (default: runs/<model>)")
    train.add_argument("--base", help="mini-llava-next, mini-lisa: the MiniLLaVA checkpoint it starts from (default: "
                                      "the shipped one)")
    train.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --output")
    train.add_argument("--device", default="cpu")
    train.add_argument("--vision-from", help="reuse stage (a)'s vision tower from this earlier checkpoint of the recipe")
    train.set_defaults(run=_train)

    atp = commands.add_parser("train-atp", **defaults, help="train ATP threshold modules for a model (frozen base)")
    atp.add_argument("--model", help="local path (default: the shipped MiniLLaVA)")
    atp.add_argument("--output", default="runs/atp", help="folder for atp_config.json and the weights")
    atp.add_argument("--target", type=float, default=0.25,
                     help="layer-averaged visual tokens per image: a share (<= 1) or a count (> 1)")
    atp.add_argument("--steps", type=int, default=300)
    atp.add_argument("--batch-size", type=int, default=8)
    atp.add_argument("--lr", type=float, default=0.03, help="learning rate of the ATP modules")
    atp.add_argument("--layers", type=int, nargs="+", help="module boundaries (default: 5, 15, 25 of 32, scaled)")
    atp.add_argument("--train-llm", action="store_true",
                     help="also fine-tune the language model (the paper's setting; slower, changes the model)")
    atp.add_argument("--device", default="cpu")
    atp.set_defaults(run=_train_atp)

    export = commands.add_parser("export-lmms-task", **defaults, help="SynthVQA as a local lmms-eval task folder")
    export.add_argument("folder")
    export.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="first N questions (as bench --samples)")
    export.add_argument("--split", default="test", choices=["train", "val", "test"])
    export.set_defaults(run=_export_task)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
