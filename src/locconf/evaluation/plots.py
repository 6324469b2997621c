"""Plots of an evaluation: confidence against true IoU, reliability diagrams, detections on an image.

matplotlib's Agg canvas only (:func:`figure`), no pyplot: no global backend state, and matplotlib is
imported only when something is drawn. :func:`plot_confidence` draws :mod:`.correlation`'s
scatter (DIR, Fig. 4), :func:`plot_reliability` :mod:`.calibration`'s reliability diagrams, and
:func:`draw_detections` one image's detections (:class:`locconf.candidates.Candidates`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..boxes import check_boxes
from .correlation import signal_correlations
from .matching import CONFIDENCE_SIGNALS, matched_signals

__all__ = ["figure", "save_png", "image_array", "show_image", "plot_confidence", "plot_reliability", "draw_detections"]

_SIGNAL_LABELS = {
    "score": "classification score",
    "quality": "predicted IoU (quality)",
    "combined": "sqrt(score x quality)",
}


def figure(width: float, height: float, dpi: float = 100.0):
    """A matplotlib ``Figure`` on its own Agg canvas (no pyplot, no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, out_path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save ``fig`` as a PNG at ``out_path`` (parent folders are created)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", **kwargs)
    return out_path


def image_array(image: Tensor) -> np.ndarray:
    """A (C, H, W) image (float in [0, 1] or uint8; C = 1: grey) as an (H, W, 3) float array in [0, 1]."""
    img = image.detach().cpu()
    img = img.float() / 255.0 if not img.is_floating_point() else img.float()
    return img.expand(3, -1, -1).permute(1, 2, 0).clamp(0, 1).numpy()


def show_image(ax, img: np.ndarray, gt: Mapping | None = None, interpolation: str = "nearest",
               gt_width: float = 1.2) -> None:
    """Show an (H, W, 3) image (:func:`image_array`) on ``ax`` in pixel coordinates (y down, no axis),
    with the ground-truth boxes ``gt["boxes"]`` (M, 4), if given, drawn dashed white ``gt_width`` wide."""
    from matplotlib.patches import Rectangle

    h, w = img.shape[:2]
    ax.imshow(img, interpolation=interpolation)
    ax.set_axis_off()
    ax.set(xlim=(0, w), ylim=(h, 0))
    if gt is not None:
        for x1, y1, x2, y2 in check_boxes(gt["boxes"], "gt['boxes']").detach().cpu().tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", lw=gt_width, ls="--"))


def plot_confidence(
    candidates: Sequence[Mapping],
    gts: Any,
    out_path: str | os.PathLike,
    signals: Sequence[str] = CONFIDENCE_SIGNALS,
    min_iou: float = 0.5,
    min_score: float = 0.0,
    max_points: int = 20000,
    title: str | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Scatter plot of each signal against the true IoU, one panel per signal (DIR, Fig. 4).

    Writes one PNG to ``out_path``; panel titles give Pearson r, Spearman rho and n. At most
    ``max_points`` random points are drawn per panel (the correlations use all of them).

    Returns:
        The :func:`confidence_correlation` result.
    """
    if not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points must be a positive int, got {max_points!r}")
    iou, values = matched_signals(candidates, gts, signals, min_iou, min_score)
    stats = signal_correlations(iou, values)
    shown = list(values) or ["score"]
    idx = np.arange(iou.numel())
    if idx.size > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx.size, max_points, replace=False))
    fig = figure(4.2 * len(shown), 4.4)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, s in zip(axes, shown):
        ax.plot([min_iou, 1.0], [min_iou, 1.0], color="0.6", lw=1, ls="--", zorder=1)
        ax.set(xlim=(min_iou, 1.0), ylim=(0.0, 1.02), xlabel="IoU with matched ground truth",
               ylabel=_SIGNAL_LABELS[s])
        ax.grid(alpha=0.3)
        if s not in values or iou.numel() == 0:
            ax.set_title(f"{_SIGNAL_LABELS[s]}\nno matched candidates (IoU > {min_iou:g})", fontsize=10)
            continue
        ax.scatter(iou.numpy()[idx], values[s].numpy()[idx], s=4, alpha=0.35, lw=0, color="tab:blue",
                   rasterized=True, zorder=2)
        st = stats[s]
        ax.set_title(f"{_SIGNAL_LABELS[s]}\nPearson r = {st['pearson']:.3f}, "
                     f"Spearman = {st['spearman']:.3f}, n = {st['n']}", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, out_path, dpi=110)
    return stats


def plot_reliability(
    diagrams: Mapping[str, Mapping[str, Mapping]],
    out_path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Reliability diagrams, one panel per signal, one curve per series (e.g. raw and calibrated).

    Args:
        diagrams: ``{series: {signal: calibration_bins(...)}}`` (:func:`reliability_diagram` per series).
        out_path: PNG path. Each panel plots the mean true IoU against the mean prediction of each
            non-empty bin (the diagonal is perfect calibration), gives each series' ECE in the
            legend, and shows the bin counts of the first series as bars below.
        title: optional figure title.

    Returns:
        ``out_path`` as a ``Path``.
    """
    if not isinstance(diagrams, Mapping) or not diagrams:
        raise ValueError("diagrams must be a non-empty dict {series: {signal: bins}}")
    signals = list(dict.fromkeys(s for d in diagrams.values() for s in d)) or ["score"]
    fig = figure(4.2 * len(signals), 5.2)
    grid = fig.add_gridspec(2, len(signals), height_ratios=(3, 1))
    for col, s in enumerate(signals):
        ax = fig.add_subplot(grid[0, col])
        hist = fig.add_subplot(grid[1, col], sharex=ax)
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="mean true IoU", title=_SIGNAL_LABELS.get(s, s))
        ax.grid(alpha=0.3)
        first = True
        for k, (series, per_signal) in enumerate(diagrams.items()):
            d = per_signal.get(s)
            if d is None:
                continue
            pts = [(p, t) for p, t in zip(d["mean_pred"], d["mean_true"]) if p is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=4, color=f"C{k}", label=f"{series}: ECE {d['ece']:.3f} (n={d['n']})")
            if first:
                edges = d["edges"]
                widths = [b - a for a, b in zip(edges, edges[1:])]
                hist.bar(edges[:-1], d["count"], width=widths, align="edge", color="0.7", edgecolor="0.4", lw=0.5)
                first = False
        if ax.get_legend_handles_labels()[0]:  # no matched candidate: nothing to label
            ax.legend(fontsize=8, loc="upper left")
        hist.set(xlabel="signal value (read as a predicted IoU)", ylabel="boxes")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, out_path, dpi=110)


def draw_detections(
    image: Tensor,
    detections: Mapping,
    out_path: str | os.PathLike,
    gt: Mapping | None = None,
    score_threshold: float = 0.3,
    class_names: Sequence[str] | None = None,
    label_threshold: float = 0.5,
    max_labels: int = 50,
) -> Path:
    """Draw detections (and optionally ground truth) on an image and save it as a PNG.

    Readable at any density: every box scoring at least ``score_threshold`` is drawn (in its class's
    colour), but a text label ``name score q=quality`` is written only on boxes scoring at least
    ``label_threshold``, best first, at most ``max_labels`` of them, and never over a label already
    written (labels that would overlap are left out). A legend under the image says what the
    colours and line styles mean and how many boxes are drawn and labelled.

    Args:
        image: (3, H, W) float in [0, 1] or uint8 (a (1, H, W) image is shown in grey).
        detections: one image's detections or candidates (:class:`locconf.candidates.Candidates`;
            ``labels`` and ``quality`` optional).
        out_path: PNG path (parent folders are created).
        gt: optional target with ``boxes`` (M, 4) (drawn dashed white).
        score_threshold: only detections with a score at least this are drawn.
        class_names: ``class_names[label]`` names the classes (default: the label number).
        label_threshold: only detections with a score at least this get a text label (1.0 or
            more: no labels, the legend alone).
        max_labels: the most text labels written (the highest scores first); 0: none.

    Returns:
        ``out_path`` as a ``Path``.
    """
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) or (1, H, W) tensor, got {shape}")
    if not isinstance(detections, Mapping) or "boxes" not in detections or "scores" not in detections:
        raise ValueError("detections must be a dict with 'boxes' and 'scores'")
    for name, value in (("score_threshold", score_threshold), ("label_threshold", label_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if isinstance(max_labels, bool) or not isinstance(max_labels, int) or max_labels < 0:
        raise ValueError(f"max_labels must be a non-negative int, got {max_labels!r}")
    boxes = check_boxes(detections["boxes"], "detections['boxes']").detach().cpu().double()
    scores = detections["scores"].detach().cpu().double()
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"detections['scores'] must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    labels = detections.get("labels")
    labels = labels.detach().cpu().long() if labels is not None else torch.zeros(len(boxes), dtype=torch.long)
    quality = detections.get("quality")
    quality = quality.detach().cpu().double() if quality is not None else None

    img = image_array(image)
    h, w = img.shape[:2]
    scale = max(1.0, 640.0 / max(h, w))  # small images are enlarged so that the text stays legible
    text_scale = max(1.0, w * scale / 1200.0)  # large drawings (predict's overview) get larger text
    footer = 0.3 * text_scale  # inches under the image for the legend
    fig = figure(w * scale / 100.0, h * scale / 100.0 + footer)
    frac = footer / (h * scale / 100.0 + footer)
    ax = fig.add_axes((0, frac, 1, 1 - frac))
    show_image(ax, img, gt, interpolation="nearest", gt_width=1.2)

    from matplotlib.lines import Line2D

    order = torch.argsort(scores, descending=True, stable=True)
    drawn = order[scores[order] >= score_threshold]
    colours = [f"C{i}" for i in range(10)]

    def name_of(label: int) -> str:
        return str(class_names[label]) if class_names is not None and 0 <= label < len(class_names) else str(label)

    ax.add_collection(_box_outlines(boxes[drawn.flip(0)], [colours[c % 10] for c in labels[drawn.flip(0)].tolist()],
                                    lw=1.5))  # best drawn last, on top
    labelled = _place_labels(boxes, scores, labels, quality, drawn, name_of, label_threshold, max_labels,
                             scale / text_scale)
    for i, (x, y, text, inside) in labelled.items():
        ax.text(x, y, text, fontsize=7 * text_scale, color="white", va="top" if inside else "bottom", ha="left", clip_on=True,
                bbox={"facecolor": colours[int(labels[i]) % 10], "alpha": 0.8, "pad": 1, "lw": 0})

    handles = [Line2D([], [], color=colours[c % 10], lw=2, label=name_of(c))
               for c in sorted(set(labels[drawn].tolist()))[:10]]
    if gt is not None:
        handles.append(Line2D([], [], color="0.3", lw=1.2, ls="--", label="ground truth"))
    note = (f"{len(drawn)} boxes with score >= {score_threshold:g}; {len(labelled)} labelled "
            f"(score >= {label_threshold:g}{', q = predicted IoU' if quality is not None else ''})")
    handles.append(Line2D([], [], lw=0, label=note))  # the counts, right after the colours
    leg_ax = fig.add_axes((0, 0, 1, frac))
    leg_ax.set_axis_off()
    leg_ax.legend(handles=handles, loc="center left", ncol=len(handles), fontsize=7 * text_scale, frameon=False,
                  handlelength=1.6, columnspacing=1.0, borderaxespad=0.2)
    return save_png(fig, out_path)


def _box_outlines(boxes: Tensor, colours, lw: float):
    """The outlines of ``boxes`` (N, 4) as one matplotlib ``PolyCollection`` (one artist for any N)."""
    from matplotlib.collections import PolyCollection

    x1, y1, x2, y2 = boxes.double().unbind(1)
    corners = torch.stack([torch.stack([x1, y1], 1), torch.stack([x2, y1], 1), torch.stack([x2, y2], 1),
                           torch.stack([x1, y2], 1)], 1)
    return PolyCollection(corners.numpy(), closed=True, facecolors="none", edgecolors=colours, linewidths=lw)


def _place_labels(boxes: Tensor, scores: Tensor, labels: Tensor, quality: Tensor | None, drawn: Tensor,
                  name_of, label_threshold: float, max_labels: int, scale: float) -> dict[int, tuple]:
    """``{index: (x, y, text, inside)}`` of the labels to write: the best-scoring boxes at or above
    ``label_threshold`` whose label does not overlap one already placed, at most ``max_labels``.

    Label sizes are estimated from a 7 pt font at 100 dpi (about 5.9 x 12 px per character and line),
    in image pixels: ``scale`` is drawing pixels per image pixel divided by the text's enlargement.
    """
    placed: dict[int, tuple] = {}
    rects: list[tuple[float, float, float, float]] = []
    if max_labels == 0:
        return placed
    char_w, line_h = 5.9 / scale, 12.0 / scale
    candidates = drawn[scores[drawn] >= label_threshold].tolist()
    for i in candidates:
        text = f"{name_of(int(labels[i]))} {float(scores[i]):.2f}"
        if quality is not None:
            text += f" q={float(quality[i]):.2f}"
        x1, y1 = float(boxes[i, 0]), float(boxes[i, 1])
        inside = y1 < 14.0 / scale  # no room above the box: write the label inside it
        rect = (x1, y1 if inside else y1 - line_h, x1 + len(text) * char_w + 2 / scale,
                (y1 + line_h) if inside else y1)
        if any(rect[0] < r[2] and r[0] < rect[2] and rect[1] < r[3] and r[1] < rect[3] for r in rects):
            continue
        rects.append(rect)
        placed[i] = (x1, y1, text, inside)
        if len(placed) == max_labels:
            break
    return placed
