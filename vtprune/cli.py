"""Command line: ``vtprune bench [--task synthseg] | show | methods | train-reference | train-atp |
export-lmms-task``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# 40 questions per family: the default run (61 configurations) stays under 10 minutes on 2 idle CPU cores
DEFAULT_SAMPLES = 240
SEG_DEFAULT_SAMPLES = 480
# --quick: every method once, about a minute; 144 (25% of 576) is a budget every method reaches on MiniLLaVA
QUICK = {"samples": 48, "budgets": (144,), "speed_repeats": 3}


DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes; torch is imported only when a command runs
SPEED_GEOMETRIES = ("small", "llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b")  # vtprune.bench.geometry


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is unset (None, False) or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _model_path(model: str | None) -> str:
    """``--model``: a shipped reference model's folder, else the local path or hub id as given."""
    from vtprune import reference

    if model in (None, *reference.MODELS):
        try:
            return str(reference.path(model or "mini-llava"))
        except FileNotFoundError as error:
            raise SystemExit(f"{error}, or pass --model") from None
    return model


def _skeleton(model: str | None):
    """The model built from its config on the meta device (no weights, no memory): enough to check every
    configuration before the weights load. A bad --model fails here, in one line naming the fix."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vtprune import reference

    path = _model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(f"vtprune: error: --model {model!r} is not a shipped reference model "
                         f"({', '.join(reference.MODELS)}), a local model folder or a reachable hub id ({first}); "
                         "check the name or path") from None
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config).eval()


def _load(model_path: str | None, device: str, dtype: str = "float32"):
    """The model and processor to measure: a shipped reference model by name (``mini-llava``, ``mini-llava-next``),
    a local path (any supported family), else the shipped MiniLLaVA."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtprune import reference

    if model_path == "mini-lisa":
        raise SystemExit("mini-lisa is a segmentation model (SynthSeg, gIoU): use `vtprune bench --task synthseg`")
    path = _model_path(model_path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(f"vtprune: error: --model {model_path!r}: {first}; pass a shipped reference model "
                         f"({', '.join(reference.MODELS)}), a local model folder or a hub id") from None
    model = model.to(device).eval()
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


def _bench_packages(plots: bool) -> None:
    """The bench extra's packages, checked before anything loads (not after a long run, when the plots start)."""
    from importlib.util import find_spec

    missing = [name for name in ("tqdm", *(("matplotlib",) if plots else ())) if find_spec(name) is None]
    if missing:
        raise SystemExit(f"vtprune: error: `vtprune bench` needs {', '.join(missing)}: pip install -e \".[bench]\" (or "
                         "pip install \"vtprune[bench]\")" + ("; --no-plots skips matplotlib" if plots else ""))


def _positive(text: str) -> int:
    """A count option: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return value


def _result_stream(out: Path, options: dict, fresh: bool):
    """The bench's ``ResultStream`` in ``out``; results of a run with other options end the command, naming the fix."""
    from vtprune.bench.resume import OptionsDiffer, ResultStream

    try:
        return ResultStream(out, options, fresh=fresh)
    except OptionsDiffer as error:
        raise SystemExit(f"vtprune: error: {error}") from None


def _interrupted(stream) -> SystemExit:
    return SystemExit(f"\ninterrupted: {len(stream.done)} configurations are saved in {stream.path}; run the same "
                      "command again to resume")


def _bench(args: argparse.Namespace) -> None:
    _bench_packages(plots=not args.no_plots)
    if args.task == "synthseg":
        _bench_seg(args)
        return
    if args.nominal_budgets:
        raise SystemExit("--nominal-budgets is a --task synthseg option; the SynthVQA bench always passes budgets in "
                         "each method's own convention")
    if args.model == "mini-lisa":
        raise SystemExit("mini-lisa is a segmentation model (SynthSeg, gIoU): use `vtprune bench --task synthseg`")
    from vtprune.bench import synthvqa as sv
    from vtprune.bench.runner import DEFAULT_BUDGETS, format_decode_table, format_table, run_bench, save_report
    from vtprune.methods import REGISTRY

    quick = QUICK if args.quick else {}
    count = args.samples or quick.get("samples", DEFAULT_SAMPLES)
    budgets = args.budgets or list(quick.get("budgets", DEFAULT_BUDGETS))
    methods = args.methods or sorted(REGISTRY)
    repeats = quick.get("speed_repeats", 5)
    todo = _checked_plan(args.model, methods, budgets, named=bool(args.methods))
    out = Path(args.out or ("runs/bench-quick" if args.quick else "runs/bench"))
    options = {"task": "synthvqa", "model": args.model or "mini-llava", "samples": count, "scoring": args.scoring,
               "resolution": args.resolution, "dtype": args.dtype, "device": args.device,
               "batch_size": args.batch_size, "decode_tokens": args.decode_tokens, "speed_repeats": repeats}
    stream = _result_stream(out, options, args.fresh)
    reused = sum(config.label in stream.done for config in todo)
    if reused:
        print(f"resuming: {reused} of {len(todo)} configurations are already measured in {stream.path} and are "
              "reused (--fresh measures everything again)")
    else:
        print(f"{len(todo)} configurations on {count} questions; each is saved to {stream.path} as it finishes, so "
              "an interrupted run resumes when rerun")
    model, processor = _load(args.model, args.device, args.dtype)
    resolution = _resolution(args.resolution, processor)
    samples = sv.load_split("test", count, resolution=resolution)
    start = time.perf_counter()
    try:
        report = run_bench(model, processor, samples, methods, budgets, batch_size=args.batch_size,
                           scoring=args.scoring, resolution=resolution, decode_tokens=args.decode_tokens,
                           speed_repeats=repeats, stream=stream)
    except KeyboardInterrupt:
        raise _interrupted(stream) from None
    report["dtype"] = args.dtype
    report["resolution"] = resolution
    report["model"] = (f"shipped {args.model or 'mini-llava'} (MiniLLaVA{'-NeXT' if args.model == 'mini-llava-next' else ''})"
                       if args.model in (None, "mini-llava", "mini-llava-next") else args.model)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["reused_configurations"] = reused
    path = save_report(report, out)
    print(format_table(report))
    if args.decode_tokens:
        print("\n" + format_decode_table(report))
    for label, reason in report["skipped"].items():
        print(f"skipped {label}: {reason}")
    again = f", {reused} configurations reused from {stream.path}" if reused else ""
    print(f"\n{len(samples)} test questions, {report['wall_seconds']} s{again}; JSON: {path}")
    if args.readme:
        from vtprune.bench.runner import update_readme

        update_readme(report, Path(args.readme))
        print(f"results table written into {args.readme}")
    if not args.no_plots:
        from vtprune.bench.plots import plot_report

        for plot in plot_report(report, out):
            print(f"plot: {plot}")


def _checked_plan(model: str | None, methods: list[str], budgets: list, named: bool) -> list:
    """Every configuration checked before the weights load: a bad method name or option at once, then each
    configuration on the model's weightless skeleton. One the model cannot run fails the command when the user named
    the methods, and is listed as skipped when they are the default (every registered method)."""
    from vtprune.bench.runner import configs, plan
    from vtprune.models import adapter_for

    try:
        configs(methods, budgets)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"vtprune: error: --methods: {error}") from None
    skeleton = _skeleton(model)
    try:
        adapter_for(skeleton)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"vtprune: error: --model {model}: {error}") from None
    todo, skipped = plan(skeleton, methods, budgets)
    if skipped and named:
        reasons = "; ".join(f"{label}: {reason}" for label, reason in skipped.items())
        raise SystemExit(f"vtprune: error: {len(skipped)} configuration(s) cannot run on this model ({reasons}); "
                         "change --budgets or leave those methods out")
    for label, reason in skipped.items():
        print(f"skipping {label}: {reason}")
    return todo


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
    budgets = args.budgets or (DEFAULT_BUDGETS[:1] if args.quick else DEFAULT_BUDGETS)
    count = args.samples or (QUICK["samples"] // 4 if args.quick else SEG_DEFAULT_SAMPLES)
    out = Path(args.out or ("runs/bench-seg-quick" if args.quick else "runs/bench-seg"))
    options = {"task": "synthseg", "model": args.model or "mini-lisa", "samples": count, "dtype": args.dtype,
               "device": args.device, "batch_size": args.batch_size, "matched_budgets": not args.nominal_budgets}
    stream = _result_stream(out, options, args.fresh)
    if stream.done:
        print(f"resuming: configurations already measured in {stream.path} are reused (--fresh measures everything "
              "again)")
    model, processor = _load_lisa(args.model, args.device, args.dtype)
    samples = ss.load_split("test", count)
    start = time.perf_counter()
    try:
        report, examples = run_seg_bench(model, processor, samples, args.methods or default_methods(), budgets,
                                         batch_size=args.batch_size, match=not args.nominal_budgets, stream=stream)
    except KeyboardInterrupt:
        raise _interrupted(stream) from None
    report["dtype"] = args.dtype
    report["model"] = "shipped mini-lisa (MiniLISA)" if args.model in (None, "mini-lisa") else args.model
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
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
    from vtprune.bench.evaluate import prompt_builder
    from vtprune.bench.runner import method_spec
    from vtprune.bench.show import scene_sample, show

    if args.keep is not None and args.ratio is not None:
        raise SystemExit("vtprune: error: give --keep or --ratio, not both")
    try:  # checked before the model loads
        name, params = method_spec(args.method)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"vtprune: error: --method: {error}") from None
    params.update({"keep": args.keep} if args.keep is not None else {})
    params.update({"ratio": args.ratio} if args.ratio is not None else {})
    model, processor = _load(args.model, args.device)
    sample = scene_sample(args.sample, _resolution("auto", processor))
    print(show(model, processor, sample, name, Path(args.out), prompt_builder(processor), **params))


def _methods(args: argparse.Namespace) -> None:
    from vtprune.methods import support_table

    if args.markdown:
        print(support_table())
        return
    if args.docs:
        from vtprune.methods.docs import methods_markdown

        Path(args.docs).parent.mkdir(parents=True, exist_ok=True)
        Path(args.docs).write_text(methods_markdown())
        print(f"method documentation written to {args.docs}")
        return
    from vtprune import reference
    from vtprune.methods.docs import defaults_on
    from vtprune.models import adapter_for

    name = args.model or "mini-llava"
    if name == "mini-lisa":
        raise SystemExit("vtprune: error: mini-lisa is pruned through its VLM: use --model mini-llava")
    inputs = None
    if name in reference.MODELS:  # small enough to run: show what the defaults keep on a test image
        from vtprune.bench.evaluate import prompt_builder

        model, processor = _load(name, "cpu")
        sample = reference.sample(0, model=name)
        inputs = processor(images=[sample.image], text=[prompt_builder(processor)(sample.question)],
                           return_tensors="pt")
        where = f"shipped {name}, measured on SynthVQA test question 0"
    else:  # any size: the structure alone, from its config
        model, where = _skeleton(name), f"{name} (structure only: its weights are not loaded)"
    adapter = adapter_for(model)
    tokens = adapter.fixed_tokens_per_image
    print(f"defaults on {where}: {type(model).__name__}, {len(adapter.decoder_layers)} decoder layers"
          + (f", {tokens} visual tokens per image" if tokens else "") + "\n")
    for entry in defaults_on(model, inputs):
        print(f"{entry['name']:<16} stages={','.join(entry['stages'])}  {entry['paper']}")
        print(f"{'':<16} budget: {entry['budget']}")
        if "unsupported" in entry:
            print(f"{'':<16} not on this model: {entry['unsupported']}")
            continue
        settings = ", ".join(f"{k}={v!r}" for k, v in entry["settings"].items())
        print(f"{'':<16} defaults here: {settings}")
        if entry["plan"]:
            print(f"{'':<16} derived: {', '.join(f'{k}={v!r}' for k, v in entry['plan'].items())}")
        for param, doc in entry["unset"].items():
            print(f"{'':<16} unset: {param} ({doc})")
        if "measured" in entry:
            m = entry["measured"]
            print(f"{'':<16} without keep/ratio: {m['entering']} visual tokens enter the LLM, "
                  f"{m['alive_after_last_layer']} alive after the last layer (layer average {m['layer_average']})")


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


def _speed(args: argparse.Namespace) -> None:
    """``vtprune speed``: see ``vtprune.bench.speed``."""
    import torch

    from vtprune.bench.geometry import GEOMETRIES, available_memory_bytes
    from vtprune.bench.speed import Settings, run_speed, save
    from vtprune.bench.speed_report import format_decode_table, format_table, header, plot_speedup

    geometry = GEOMETRIES[args.geometry]
    dtype = args.dtype or ("float32" if args.device.startswith("cpu") else "bfloat16")
    if args.layers is not None and not 1 <= args.layers <= geometry.full_depth():
        raise SystemExit(f"--layers {args.layers}: {args.geometry} has {geometry.full_depth()} LLM layers; give 1 to "
                         f"{geometry.full_depth()}")
    if args.device.startswith("cpu"):
        need, have = geometry.parameter_bytes(args.layers, getattr(torch, dtype)), available_memory_bytes()
        if have is not None and need > 0.7 * have:
            raise SystemExit(f"{args.geometry} with {args.layers or geometry.full_depth()} LLM layers needs "
                             f"{need / 2**30:.1f} GiB of weights and {have / 2**30:.1f} GiB is free; truncate the LLM "
                             "with --layers 2 (the output says so) or run it on a GPU")
    naive = [] if args.no_naive else args.naive
    stray = [m for m in naive or [] if args.methods and m not in args.methods]
    if stray:
        raise SystemExit(f"--naive {' '.join(stray)}: not among --methods; add it there too")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    settings = Settings(repeats=args.repeats, warmup=args.warmup, decode_tokens=args.decode_tokens,
                        reuse_vision=args.reuse_vision, ttft=not args.no_ttft)
    report = run_speed(geometry, args.layers, args.methods, args.budgets or list(geometry.default_budgets), naive,
                       settings, device=args.device, dtype=dtype)
    out = Path(args.out)
    path = save(report, out)
    skipped = "".join(f"\nskipped {label}: {reason}" for label, reason in report["skipped"].items())
    (out / "speed.md").write_text(header(report) + "\n\n" + format_table(report) + "\n\n" +
                                  format_decode_table(report) + "\n" + skipped + "\n")
    print(header(report), format_table(report), format_decode_table(report) + skipped, sep="\n\n")
    print(f"\n{report['wall_seconds']} s; JSON: {path}; tables: {out / 'speed.md'}")
    if not args.no_plots:
        print(f"plot: {plot_speedup(report, out)}")


def main(argv: list[str] | None = None) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("vtprune")
    except PackageNotFoundError:
        installed = "unknown"
    parser = argparse.ArgumentParser(prog="vtprune", description="visual token reduction for VLMs")
    parser.add_argument("--version", action="version", version=f"vtprune {installed}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback (accepted "
                        "anywhere on the command line)")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": _HelpFormatter}

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
    bench.add_argument("--samples", type=_positive,
                       help=f"test questions or SynthSeg prompts, balanced over families (default: {DEFAULT_SAMPLES}; "
                       f"--quick: {QUICK['samples']}; synthseg: {SEG_DEFAULT_SAMPLES})")
    bench.add_argument("--quick", action="store_true",
                       help=f"a smoke run of about a minute on 2 CPU cores: every method once at keep="
                       f"{QUICK['budgets'][0]} on {QUICK['samples']} questions, into runs/bench-quick (rough numbers: "
                       "intervals of about +-12 points)")
    bench.add_argument("--fresh", action="store_true",
                       help="measure every configuration again instead of resuming from --out's results.jsonl")
    bench.add_argument("--batch-size", type=_positive, default=16, help="questions per forward")
    bench.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    bench.add_argument("--dtype", default="float32", choices=DTYPES, help="model weights' dtype")
    bench.add_argument("--scoring", default="likelihood", choices=["likelihood", "generate"],
                       help="closed-choice answer likelihood, or greedy generation matched against the answer")
    bench.add_argument("--decode-tokens", type=int, default=0,
                       help="also measure KV-cache memory and throughput over this many generated tokens (decode "
                       "policies; 0: off)")
    bench.add_argument("--out", help="folder for results.jsonl (streamed, resumable), bench.json and the plots "
                       "(default: runs/bench; --quick: runs/bench-quick; synthseg: runs/bench-seg)")
    bench.add_argument("--no-plots", action="store_true")
    bench.add_argument("--readme", help="also write the results table into this README (between its bench-results "
                                        "markers)")
    bench.set_defaults(run=_bench)

    show = commands.add_parser("show", **defaults, help="PNG of a test image with a method's kept tokens highlighted")
    show.add_argument("--method", required=True, help="a registered method, or a variant name:key=value,... (as in "
                      "bench --methods), e.g. tome:order=tome")
    show.add_argument("--keep", type=_positive, help="visual tokens kept, in the method's convention (default: the "
                      "method's own)")
    show.add_argument("--ratio", type=float, help="share of visual tokens kept, e.g. 0.25 (instead of --keep)")
    show.add_argument("--sample", type=int, default=0, help="test scene index: each index is a different image, asked "
                      "its first question")
    show.add_argument("--model", help="a shipped reference model name or a local path (default: mini-llava)")
    show.add_argument("--device", default="cpu", help="torch device")
    show.add_argument("--out", default="runs/show.png", help="the PNG to write")
    show.set_defaults(run=_show)

    listing = commands.add_parser("methods", **defaults, help="registered methods, stages, budgets, defaults, model families")
    listing.add_argument("--model", help="show the defaults each method resolves to on this model: a shipped "
                         "reference model (also measured on a test image), a local path or a hub id (only its "
                         "config is read) (default: mini-llava)")
    listing.add_argument("--markdown", action="store_true", help="the method x model-family support table")
    listing.add_argument("--docs", metavar="PATH", help="write the method documentation generated from the registry "
                         "(docs/methods.md) to PATH")
    listing.set_defaults(run=_methods)

    train = commands.add_parser("train-reference", **defaults,
                                help="retrain a shipped reference model (its recipe; MiniLLaVA from scratch)")
    train.add_argument("--model", default="mini-llava", choices=["mini-llava", "mini-llava-next", "mini-lisa"])
    train.add_argument("--output", help="folder for the new checkpoint (default: runs/<model>)")
    train.add_argument("--base", help="mini-llava-next, mini-lisa: the MiniLLaVA checkpoint it starts from (default: "
                                      "the shipped one)")
    train.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --output")
    train.add_argument("--device", default="cpu", help="torch device")
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
    atp.add_argument("--device", default="cpu", help="torch device")
    atp.set_defaults(run=_train_atp)

    export = commands.add_parser("export-lmms-task", **defaults, help="SynthVQA as a local lmms-eval task folder")
    export.add_argument("folder")
    export.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="first N questions (as bench --samples)")
    export.add_argument("--split", default="test", choices=["train", "val", "test"])
    export.set_defaults(run=_export_task)

    speed = commands.add_parser("speed", **defaults, help="latency, throughput and memory of every method on a "
                                "random-weight model at real geometry, unpruned interleaved, vs the FLOPs bound")
    speed.add_argument("--geometry", default="small", choices=SPEED_GEOMETRIES,
                       help="small (runs anywhere in minutes), or a 7B model's real geometry")
    speed.add_argument("--layers", type=int, help="truncate the LLM to this many decoder layers (CPU: 7B geometries "
                       "need it to fit in memory; the output says so); default: full depth")
    speed.add_argument("--methods", nargs="+", help="registered methods or variants name:key=value,... (default: "
                       "every method the family supports that takes a budget)")
    speed.add_argument("--budgets", nargs="+", type=_budget, help="counts (keep=) or shares (ratio=) in each "
                       "method's convention (default: 64 192; LLaVA-NeXT and Qwen2.5-VL: 10%% 20%%)")
    speed.add_argument("--naive", nargs="*", help="methods also measured in naive mode (the papers' way: eager "
                       "attention with the scoring layer's weights kept); default: every method with an LLM-layer "
                       "stage (those whose criterion reads no earlier layer's attention are skipped, with the reason)")
    speed.add_argument("--no-naive", action="store_true", help="no naive-mode rows")
    speed.add_argument("--repeats", type=int, default=5, help="measured rounds per case (medians and IQR)")
    speed.add_argument("--warmup", type=int, default=1, help="unmeasured rounds before them")
    speed.add_argument("--decode-tokens", type=int, default=16, help="greedy decode steps at batch 1 and 8 (0: no "
                       "decode measurement)")
    speed.add_argument("--no-ttft", action="store_true", help="skip the generate(max_new_tokens=1) timing")
    speed.add_argument("--reuse-vision", action="store_true", help="encode the image once and time the tower once "
                       "(added back to prefill and TTFT) for methods that leave it alone: for CPU runs at 7B geometry")
    speed.add_argument("--device", default="cpu")
    speed.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: float32 on CPU, bfloat16 on GPU)")
    speed.add_argument("--out", default="runs/speed", help="folder for speed.json, speed.md and speedup.png")
    speed.add_argument("--no-plots", action="store_true")
    speed.set_defaults(run=_speed)

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = parser.parse_args([a for a in argv if a != "--debug"])
    try:
        args.run(args)
    except Exception as error:  # one line naming the fix; --debug for the traceback
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        raise SystemExit(f"vtprune: error: {message} (--debug shows the traceback)") from None


if __name__ == "__main__":
    main()
