"""Render Screenshots/panel.png: the engine's result on a generated phantom, drawn headlessly (no Slicer).

The image that CMake's EXTENSION_SCREENSHOTURLS (and the .s4ext) name must exist before a real screenshot of the
Slicer panel can be taken. Until then this script stands in with a rendering of what the panel writes: the shipped
demo model runs through `segvolgru.InteractiveSession` (the engine behind the panel) on the demo's CT-like phantom,
with a box around the largest organ and two corrective clicks placed by the challenge's click rule; three orthogonal
slices show the segment, the box and the clicks. The caption inside the image says it is a headless rendering.

Deterministic: fixed phantom seed, click seeds and torch seed, CPU, and a PNG written by Pillow with no timestamp.
Rerun with:

    .venv/bin/python scripts/render_screenshot.py [--out Screenshots/panel.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from segvolgru.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "Screenshots" / "panel.png"
CLICKS = 2
CT_WINDOW = (-160.0, 240.0)  # a soft-tissue window in Hounsfield units
SEGMENT_RGB = (128 / 255, 174 / 255, 128 / 255)  # the colour Slicer gives a first segment
BOX_RGB = (1.0, 0.6, 0.1)
MINUS = "\u2212"
CAPTION = ("Headless rendering of the SegVolGRU engine's result by scripts/render_screenshot.py: "
           "NOT a screenshot of the Slicer panel.\n"
           "Shipped DEMO model (trained on phantoms, not for clinical use) on a generated CT-like phantom, on CPU.")


def run_engine():
    """The phantom, its reference mask, the box, the clicks and the Dice after each step."""
    import torch

    import segvolgru
    from segvolgru.clicks import mask_to_box_kji, simulate_click
    from segvolgru.demo import sample_case
    from segvolgru.metrics import dice

    torch.manual_seed(0)
    model = segvolgru.load_model(segvolgru.demo_model_path())
    volume, labels, spacing, target = sample_case()
    reference = labels == target
    session = segvolgru.InteractiveSession(model, volume, spacing=spacing)
    box = mask_to_box_kji(reference)
    result = session.set_box(box)
    scores = [dice(result.mask, reference)]
    clicks = []
    for n in range(CLICKS):
        click = simulate_click(result.mask.astype(bool), reference, seed=42 + n)
        if click is None:
            break
        result = session.add_click((click.k, click.j, click.i), click.positive)
        clicks.append(click)
        scores.append(dice(result.mask, reference))
    return volume, spacing, reference, result.mask.astype(bool), box, clicks, scores


def draw(volume, spacing, reference, segment, box, clicks, scores, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle
    from PIL import Image

    sk, sj, si = spacing
    k0, j0, i0, k1, j1, i1 = box
    centre = np.round(np.argwhere(segment | reference).mean(axis=0)).astype(int)
    for axis in range(3):  # each view passes through the click nearest the structure's centre along its axis
        if clicks:
            centre[axis] = min(((c.k, c.j, c.i)[axis] for c in clicks), key=lambda v: (abs(v - centre[axis]), v))
    # One view per sliced axis k, j, i: (title, 2-D slice, (column axis, row axis) as k/j/i indices, aspect, origin)
    views = [
        (f"axial  k = {centre[0]}", lambda a: a[centre[0]], (2, 1), sj / si, "upper"),
        (f"coronal  j = {centre[1]}", lambda a: a[:, centre[1]], (2, 0), sk / si, "lower"),
        (f"sagittal  i = {centre[2]}", lambda a: a[:, :, centre[2]], (1, 0), sk / sj, "lower"),
    ]
    lows, highs = (k0, j0, i0), (k1, j1, i1)
    fill = ListedColormap([SEGMENT_RGB])

    fig, axes = plt.subplots(1, 3, figsize=(12.0, 5.2), dpi=100)
    fig.patch.set_facecolor("black")
    for axis, (ax, (title, take, (col, row), aspect, origin)) in enumerate(zip(axes, views)):
        ax.imshow(take(volume), cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=aspect, origin=origin,
                  interpolation="nearest")
        seg = take(segment)
        ax.imshow(np.ma.masked_where(~seg, seg), cmap=fill, alpha=0.45, aspect=aspect, origin=origin,
                  interpolation="nearest")
        if seg.any():
            ax.contour(seg, levels=[0.5], colors=[SEGMENT_RGB], linewidths=1.4)
        if take(reference).any():
            ax.contour(take(reference), levels=[0.5], colors="yellow", linewidths=0.9, linestyles="dashed")
        ax.add_patch(Rectangle((lows[col] - 0.5, lows[row] - 0.5), highs[col] - lows[col] + 1,
                               highs[row] - lows[row] + 1, fill=False, edgecolor=BOX_RGB, linewidth=1.5))
        for number, click in enumerate(clicks, start=1):
            kji = (click.k, click.j, click.i)
            in_plane = kji[axis] == centre[axis]
            colour, sign, offset = ("lime", "+", (-20, 6)) if click.positive else ("red", MINUS, (7, -14))
            ax.plot(kji[col], kji[row], marker="o", markersize=9, markeredgewidth=2, linestyle="none",
                    markeredgecolor=colour, markerfacecolor=colour if in_plane else "none")
            ax.annotate(f"{sign}{number}", (kji[col], kji[row]), color=colour,
                        xytext=offset, textcoords="offset points", fontsize=11, fontweight="bold")
        ax.set_title(title, color="white", fontsize=11)
        ax.axis("off")

    steps = " \u2192 ".join(f"{s:.2f}" for s in scores)
    kinds = ", ".join("positive" if c.positive else "negative" for c in clicks)
    fig.suptitle(f"SegVolGRU: box + {len(clicks)} clicks ({kinds}); Dice to the phantom's label after each step: "
                 f"{steps}", color="white", fontsize=12)
    fig.text(0.5, 0.105, "green: segment   yellow dashed: phantom label   orange: box   "
             "circles: clicks (filled in this slice, hollow projected from another)", color="white", ha="center",
             fontsize=9.5)
    fig.text(0.5, 0.012, CAPTION, color="#ffcc66", ha="center", va="bottom", fontsize=10, fontweight="bold",
             linespacing=1.4)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.89, bottom=0.15, wspace=0.04)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    write_atomic(out, lambda temporary: image.save(temporary, format="PNG", optimize=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default: {DEFAULT_OUT})")
    args = parser.parse_args()
    volume, spacing, reference, segment, box, clicks, scores = run_engine()
    draw(volume, spacing, reference, segment, box, clicks, scores, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB); Dice per step: "
          + ", ".join(f"{s:.3f}" for s in scores))


if __name__ == "__main__":
    main()
