"""The evaluation report: ``report.md`` plus PNG figures (mean curves with spread, per-case curves, overlays)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import save_figure, write_text_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(path: Path, results: dict, summary: dict) -> None:
    plt = _pyplot()
    steps = np.arange(len(summary["dsc_per_step"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "dsc_per_step", "Dice"), (axes[1], "nsd_per_step", "NSD (2 mm)")):
        values = np.array([r[key] for _, r in results.values()])
        mean, std = values.mean(axis=0), values.std(axis=0)
        ax.plot(steps, mean, marker="o", color="black", label="mean")
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color="gray", label="± 1 std")
        for name, (_, r) in results.items():
            ax.plot(steps, r[key], alpha=0.4, linewidth=0.8)
        ax.set_xticks(steps, ["box"] + [str(s) for s in steps[1:]])
        ax.set_ylim(0, 1)
        ax.set_title(f"{title} per step (thin lines: cases)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def _overlay(path: Path, case, result: dict, title: str) -> None:
    plt = _pyplot()
    gt, final = case.gts, result["preds"][-1]
    k = int(np.argmax((gt > 0).sum(axis=(1, 2))))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for ax, labels, name in ((axes[0], gt, "reference"), (axes[1], final, "after click 5")):
        ax.imshow(case.image[k], cmap="gray")
        masked = np.ma.masked_where(labels[k] == 0, labels[k])
        ax.imshow(masked, alpha=0.45, cmap="tab10", vmin=0, vmax=10)
        ax.set_title(f"{name}, slice {k}")
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(out: Path, results: dict, summary: dict) -> None:
    """Write ``report.md``, ``curves.png`` and the best/worst overlays into ``out``."""
    lines = ["# SegVolGRU interactive evaluation (CVPR 2025 protocol)", "",
             f"Cases: {summary['cases']}; failed: {len(summary['failed'])}.", "",
             "| metric | value |", "|---|---|"]
    for key in ("dsc_auc", "nsd_auc", "dsc_final", "nsd_final"):
        lines.append(f"| {key} | {summary[key]:.4f} |")
    lines += ["", "| step | mean Dice | std | mean NSD | mean seconds |", "|---|---|---|---|---|"]
    for step, (d, s, n, t) in enumerate(zip(summary["dsc_per_step"], summary["dsc_per_step_std"],
                                            summary["nsd_per_step"], summary["time_per_step_s"])):
        lines.append(f"| {'box' if step == 0 else f'click {step}'} | {d:.4f} | {s:.4f} | {n:.4f} | {t:.2f} |")
    lines += ["", "| case | DSC-AUC | NSD-AUC | final DSC | final NSD |", "|---|---|---|---|---|"]
    for name, (_, r) in results.items():
        lines.append(f"| {name} | {r['dsc_auc']:.4f} | {r['nsd_auc']:.4f} | {r['dsc_final']:.4f} | "
                     f"{r['nsd_final']:.4f} |")
    if summary["failed"]:
        lines += ["", "## Failed cases", ""] + [f"- {f['case']}: {f['error']}" for f in summary["failed"]]
    if results:
        _curves(out / "curves.png", results, summary)
        ranked = sorted(results.items(), key=lambda item: item[1][1]["dsc_final"])
        _overlay(out / "worst.png", ranked[0][1][0], ranked[0][1][1], f"worst: {ranked[0][0]}")
        _overlay(out / "best.png", ranked[-1][1][0], ranked[-1][1][1], f"best: {ranked[-1][0]}")
        lines += ["", "![curves](curves.png)", "", "![best](best.png) ![worst](worst.png)"]
    write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
