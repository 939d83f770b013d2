"""PNG plots of a bench report: accuracy vs kept tokens and vs FLOPs, and keep-frequency heatmaps; for the
segmentation bench, predicted masks beside the targets."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _by_method(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in report["results"]:
        if record["budget"] is not None:
            groups.setdefault(record["method"], []).append(record)
    return groups


def plot_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Writes accuracy_vs_tokens.png, accuracy_vs_flops.png and keep_frequency.png (one panel per method at its
    smallest budget, with a colour bar; merging methods' panels say so); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = report["results"][0]
    groups = _by_method(report)
    paths = []
    for x_key, x_label, name in [
        ("mean_visual_tokens", "visual tokens per LLM layer (layer average)", "accuracy_vs_tokens.png"),
        ("flops_ratio", "prefill FLOPs (fraction of unpruned)", "accuracy_vs_flops.png"),
    ]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, records in groups.items():
            records = sorted(records, key=lambda r: r[x_key])
            ax.plot([r[x_key] for r in records], [100 * r["accuracy"] for r in records], marker="o", label=method)
        ax.axhline(100 * base["accuracy"], color="black", linestyle="--", label="unpruned")
        if report.get("chance") and report.get("families_of_samples"):
            chance = np.mean([report["chance"][f] for f in report["families_of_samples"]])
            ax.axhline(100 * chance, color="grey", linestyle=":", label="chance")
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"SynthVQA test subset ({report['samples']} questions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    methods = list(groups)
    cols = min(4, max(1, len(methods)))
    rows = max(1, -(-len(methods) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    image = None
    for ax, method in zip(axes.flat, methods):
        record = min(groups[method], key=lambda r: r["budget"])
        if record.get("keep_frequency") is None:  # images of different grids: no common map
            continue
        frequency = np.array(record["keep_frequency"])
        image = ax.imshow(frequency, vmin=0, vmax=1, cmap="viridis")
        title = f"{method} @ {record['budget']}"
        if record.get("merges_tokens"):
            # a merged patch counts by its share of the token: pooling 3x3 everywhere is a flat 1/9, not a bug
            title += "\nmerged: shade = patch's share of its token"
            if np.ptp(frequency) < 0.02:
                ax.text(frequency.shape[1] / 2, frequency.shape[0] / 2,
                        f"every patch: {frequency.mean():.2f}\nof a merged token", ha="center", va="center",
                        fontsize=8, color="white")
        ax.set_title(title, fontsize=8)
    fig.suptitle(textwrap.fill("weight of each patch in the tokens alive after the last layer, averaged over images "
                               "(smallest budget; 1 = kept as its own token in every image, 0 = always dropped)",
                               40 * cols), fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 0.97))
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.92, 0.15, 0.015, 0.7)), label="patch weight kept")
    paths.append(out_dir / "keep_frequency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    adaptive = [r for r in report["results"] if r["budget"] is not None and r.get("mean_visual_tokens_per_sample")
                and np.ptp(r["mean_visual_tokens_per_sample"]) > 0]
    if adaptive:
        paths.append(_plot_distribution(adaptive, out_dir / "kept_distribution.png"))
    return paths


def _plot_distribution(records: list[dict[str, Any]], path: Path) -> Path:
    """Methods whose counts differ between images: per layer the 10/50/90th percentile of the visual tokens an image
    keeps, and the histogram of each image's layer-averaged count."""
    fig, (layers_ax, hist_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for record in records:
        label = f"{record['method']}@{record['budget']}"
        spread = np.array(record["visual_tokens_per_layer_spread"])
        x = np.arange(len(spread))
        line = layers_ax.plot(x, spread[:, 1], marker="o", label=label)[0]
        layers_ax.fill_between(x, spread[:, 0], spread[:, 2], alpha=0.2, color=line.get_color())
        hist_ax.hist(record["mean_visual_tokens_per_sample"], bins=30, alpha=0.6, label=label)
    layers_ax.set_xlabel("decoder layer")
    layers_ax.set_ylabel("visual tokens per image (median, 10-90%)")
    hist_ax.set_xlabel("visual tokens per image, averaged over layers")
    hist_ax.set_ylabel("images")
    for ax in (layers_ax, hist_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_masks(samples: list, examples: dict[str, dict[str, list]], path: Path) -> Path:
    """The segmentation bench's masks: one column per prompt (the first ``len(samples)``), one row for the ground
    truth and one per configuration of ``examples`` ({label: {"masks": [bool [H, W]], "ious": [float]}}, from
    ``seg_runner.run_seg_bench``). Each mask is filled over a dimmed grey copy of the image (target cyan, prediction
    red, with the target's outline), so the scene's own colours never hide it."""
    cols, rows = len(samples), 1 + len(examples)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows + 0.5), squeeze=False)
    panels = [("ground truth", [s.mask for s in samples], None)]
    panels += [(label, shown["masks"], shown["ious"]) for label, shown in examples.items()]
    backgrounds = [0.25 + 0.5 * np.asarray(s.image.convert("L"), dtype=np.float64) / 255 for s in samples]
    for row, (label, masks, ious) in enumerate(panels):
        for col, sample in enumerate(samples):
            ax = axes[row, col]
            ax.imshow(backgrounds[col], cmap="gray", vmin=0, vmax=1)
            overlay = np.zeros((*masks[col].shape, 4))
            overlay[masks[col]] = (0.0, 0.9, 1.0, 0.7) if ious is None else (1.0, 0.1, 0.1, 0.6)
            ax.imshow(overlay)
            if ious is not None and sample.mask.any():
                ax.contour(sample.mask, levels=[0.5], colors="cyan", linewidths=0.8)
            title = label if ious is None else f"{label}: IoU {ious[col]:.2f}"
            if row == 0:
                title = textwrap.fill(f"{sample.prompt} ({sample.family})", 34) + f"\n{title}"
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle("SynthSeg masks: target (cyan), predicted (red)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
