"""Localization-confidence analysis: how well does a confidence signal predict the true IoU?

DIR (seed 002, Figure 4) matches each box to its ground truth and correlates the true IoU with the
detector's confidence: the classification score correlates poorly (Pearson 0.209 for Faster R-CNN)
for boxes with IoU > 0.5, a predicted IoU much better (0.755). This module computes those numbers
for any candidates, and draws the scatter plots and detection visualisations. It also reads each
signal as a predicted IoU and asks whether it is calibrated: :func:`reliability_diagram` bins it
against the true IoU and gives the expected calibration error (:func:`calibration_bins`), drawn by
:func:`plot_reliability` (the maps that calibrate a signal are in :mod:`locconf.calibration`).

Signals: ``"score"`` (classification score), ``"quality"`` (predicted IoU / localization quality)
and ``"combined"`` (``sqrt(score * quality)``, the ranking of DIR / PAA). A signal that the
candidates lack is skipped.

Pearson and Spearman correlations are implemented here in float64 torch (Spearman with average
ranks for ties); an undefined correlation (fewer than two samples, or a constant input) is NaN.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .boxes import box_iou, check_boxes

logger = logging.getLogger(__name__)

__all__ = [
    "SIGNALS",
    "rankdata",
    "pearson",
    "spearman",
    "match_to_ground_truth",
    "confidence_correlation",
    "calibration_bins",
    "reliability_diagram",
    "plot_confidence",
    "plot_reliability",
    "draw_detections",
]

#: Confidence signals, in plot order.
SIGNALS = ("score", "quality", "combined")

_SIGNAL_LABELS = {
    "score": "classification score",
    "quality": "predicted IoU (quality)",
    "combined": "sqrt(score x quality)",
}


# --------------------------------------------------------------------------------------------
# Correlation coefficients
# --------------------------------------------------------------------------------------------


def _as_vector(x: Any, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return t


def _as_pair(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    x, y = _as_vector(x, "x"), _as_vector(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.numel()} and {y.numel()}")
    return x, y


def rankdata(x: Tensor | Sequence[float]) -> Tensor:
    """Ranks 1..n of ``x`` (n,), ties getting the average of the ranks they span. Returns float64 (n,)."""
    x = _as_vector(x, "x")
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).to(torch.float64)  # rank of the last element of each group
    first = last - counts + 1
    return ((first + last) / 2)[inverse]


def pearson(x: Tensor | Sequence[float], y: Tensor | Sequence[float]) -> float:
    """Pearson correlation of ``x`` and ``y`` (n,) each; NaN when n < 2 or either is constant."""
    x, y = _as_pair(x, y)
    if x.numel() < 2 or x.min() == x.max() or y.min() == y.max():
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    r = (xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum())
    return float(r.clamp(-1.0, 1.0))


def spearman(x: Tensor | Sequence[float], y: Tensor | Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN when n < 2 or either is constant."""
    x, y = _as_pair(x, y)
    if x.numel() < 2:
        return math.nan
    return pearson(rankdata(x), rankdata(y))


# --------------------------------------------------------------------------------------------
# Matching boxes to ground truth
# --------------------------------------------------------------------------------------------


def _targets_list(gts: Any) -> list[Mapping]:
    """Accept a list of target dicts, or a data set with ``target(i)`` (e.g. ``CocoDetection``)."""
    if hasattr(gts, "target") and hasattr(gts, "__len__"):
        return [gts.target(i) for i in range(len(gts))]
    if isinstance(gts, Mapping) or not isinstance(gts, Sequence):
        raise ValueError("gts must be a list of target dicts or a data set with a target(i) method")
    return list(gts)


def _pair(candidates: Sequence[Mapping], gts: Any) -> list[tuple[Mapping, Mapping]]:
    """Pair per-image candidates with targets: by ``image_id`` when candidates have one, else by position."""
    if isinstance(candidates, Mapping) or not isinstance(candidates, Sequence):
        raise ValueError("candidates must be a list of per-image dicts")
    targets = _targets_list(gts)
    if candidates and all("image_id" in c for c in candidates):
        by_id = {}
        for t in targets:
            if "image_id" in t:
                by_id[int(t["image_id"])] = t
        pairs = []
        for i, c in enumerate(candidates):
            image_id = int(c["image_id"])
            if image_id not in by_id:
                raise ValueError(f"candidates[{i}] has image_id {image_id}, which no target in gts has")
            pairs.append((c, by_id[image_id]))
        return pairs
    if len(candidates) != len(targets):
        raise ValueError(f"candidates ({len(candidates)}) and gts ({len(targets)}) must have the same length "
                         "when candidates have no image_id")
    return list(zip(candidates, targets))


def _match_one(det: Mapping, target: Mapping) -> Tensor:
    for name, d in (("detections", det), ("targets", target)):
        if not isinstance(d, Mapping) or "boxes" not in d or "labels" not in d:
            raise ValueError(f"{name} must be dicts with 'boxes' and 'labels'")
    boxes = check_boxes(det["boxes"], "detections['boxes']")
    gt_boxes = check_boxes(target["boxes"], "targets['boxes']").to(boxes)
    labels, gt_labels = det["labels"], target["labels"].to(boxes.device)
    if labels.shape != boxes.shape[:1]:
        raise ValueError(f"detections['labels'] must have shape ({boxes.shape[0]},), got {tuple(labels.shape)}")
    if gt_labels.shape != gt_boxes.shape[:1]:
        raise ValueError(f"targets['labels'] must have shape ({gt_boxes.shape[0]},), got {tuple(gt_labels.shape)}")
    if boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return boxes.new_zeros(boxes.shape[0])
    same_class = labels[:, None] == gt_labels[None, :]
    if "iscrowd" in target:
        same_class &= target["iscrowd"].to(boxes.device)[None, :] == 0
    iou = box_iou(boxes, gt_boxes).masked_fill(~same_class, 0.0)
    return iou.amax(dim=1)


def match_to_ground_truth(
    detections: Mapping | Sequence[Mapping],
    targets: Mapping | Sequence[Mapping],
) -> Tensor | list[Tensor]:
    """True IoU of every box: its best IoU with a ground truth of the same class (0 if none).

    Crowd ground truths (``iscrowd == 1``) are not matched.

    Args:
        detections: one image's dict with ``boxes`` (N, 4) and ``labels`` (N,), or a list of them
            (paired with ``targets`` by ``image_id`` when they have one, else by position).
        targets: the matching target dict(s) with ``boxes`` (M, 4) and ``labels`` (M,), or a data
            set with a ``target(i)`` method.

    Returns:
        (N,) IoU for one image, or a list of them.
    """
    if isinstance(detections, Mapping):
        if not isinstance(targets, Mapping):
            raise ValueError("targets must be a dict when detections is a dict")
        return _match_one(detections, targets)
    return [_match_one(d, t) for d, t in _pair(detections, targets)]


def _signal(cand: Mapping, signal: str) -> Tensor | None:
    scores, quality = cand.get("scores"), cand.get("quality")
    if signal == "score":
        return scores
    if quality is None:
        return None
    if signal == "quality":
        return quality
    return torch.sqrt(scores.clamp(0, 1) * quality.to(scores.dtype).clamp(0, 1))


def _matched_signals(
    candidates: Sequence[Mapping], gts: Any, signals: Sequence[str], min_iou: float, min_score: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """True IoU (M,) of the matched candidates (IoU > min_iou, score >= min_score) and each signal (M,)."""
    for s in signals:
        if s not in SIGNALS:
            raise ValueError(f"signals: {s!r} is not one of {SIGNALS}")
    if not (isinstance(min_iou, (int, float)) and 0.0 <= min_iou < 1.0):
        raise ValueError(f"min_iou must be a number in [0, 1), got {min_iou!r}")
    ious: list[Tensor] = []
    values: dict[str, list[Tensor]] = {s: [] for s in signals}
    present: dict[str, set[bool]] = {s: set() for s in signals}
    for i, (cand, target) in enumerate(_pair(candidates, gts)):
        if "scores" not in cand:
            raise ValueError(f"candidates[{i}] needs 'scores'")
        true_iou = _match_one(cand, target)
        keep = (true_iou > min_iou) & (cand["scores"] >= min_score)
        ious.append(true_iou[keep].double().cpu())
        for s in signals:
            v = _signal(cand, s)
            if cand["boxes"].shape[0] > 0:
                present[s].add(v is not None)
            if v is not None:
                values[s].append(v[keep].double().cpu())
    iou = torch.cat(ious) if ious else torch.zeros(0, dtype=torch.float64)
    out: dict[str, Tensor] = {}
    for s in signals:
        if present[s] == {True, False}:
            raise ValueError(f"some candidates have the fields of signal {s!r} and some do not")
        if False in present[s] or not values[s]:
            logger.warning("signal %r skipped: the candidates have no 'quality'", s)
            continue
        out[s] = torch.cat(values[s])
    return iou, out


def confidence_correlation(
    candidates: Sequence[Mapping],
    gts: Any,
    signals: Sequence[str] = SIGNALS,
    min_iou: float = 0.5,
    min_score: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Correlation of each confidence signal with the true IoU (DIR, Fig. 4).

    Args:
        candidates: per-image dicts with ``boxes`` (N, 4), ``labels`` (N,), ``scores`` (N,) and
            optionally ``quality`` (N,) (raw candidates or post-processed detections).
        gts: per-image targets (``boxes`` (M, 4), ``labels`` (M,), ``image_id``) or a data set
            with ``target(i)``; paired by ``image_id`` (else by position).
        signals: any of ``"score"``, ``"quality"``, ``"combined"``; missing ones are skipped.
        min_iou: only candidates whose true IoU is greater than this are used.
        min_score: only candidates with a score at least this are used.

    Returns:
        ``{signal: {"pearson": r, "spearman": rho, "n": n}}`` (NaN where undefined).
    """
    iou, values = _matched_signals(candidates, gts, signals, min_iou, min_score)
    return {
        s: {"pearson": pearson(v, iou), "spearman": spearman(v, iou), "n": int(iou.numel())}
        for s, v in values.items()
    }


# --------------------------------------------------------------------------------------------
# Calibration: does a predicted IoU of 0.8 mean an IoU of 0.8?
# --------------------------------------------------------------------------------------------


def calibration_bins(pred: Tensor | Sequence[float], true: Tensor | Sequence[float], bins: int = 10) -> dict:
    """Reliability diagram of predictions ``pred`` (n,) of ``true`` (n,) values, and its ECE.

    ``bins`` equal-width bins of [0, 1] by ``pred`` (bin ``k`` holds ``k/bins <= pred < (k+1)/bins``,
    the last one includes 1; predictions outside [0, 1] fall into the end bins). The expected
    calibration error is ``sum_k n_k / n * |mean pred_k - mean true_k|``.

    Returns:
        JSON-ready ``{"edges": [bins + 1], "count": [bins], "mean_pred": [bins], "mean_true": [bins],
        "ece": float, "n": int}``; the means of an empty bin are None, the ECE of no data is NaN.
    """
    pred, true = _as_pair(pred, true)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    index = (pred * bins).floor().clamp(0, bins - 1).long()
    count = torch.bincount(index, minlength=bins).to(torch.float64)
    sum_pred = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, pred)
    sum_true = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, true)
    n = int(pred.numel())
    ece = float((sum_pred - sum_true).abs().sum() / n) if n else math.nan
    safe = count.clamp(min=1)
    mean_pred, mean_true = (sum_pred / safe).tolist(), (sum_true / safe).tolist()
    empty = (count == 0).tolist()
    return {"edges": [k / bins for k in range(bins + 1)], "count": [int(c) for c in count.tolist()],
            "mean_pred": [None if e else m for m, e in zip(mean_pred, empty)],
            "mean_true": [None if e else m for m, e in zip(mean_true, empty)], "ece": ece, "n": n}


def reliability_diagram(
    candidates: Sequence[Mapping],
    gts: Any,
    signals: Sequence[str] = SIGNALS,
    bins: int = 10,
    min_iou: float = 0.5,
    min_score: float = 0.0,
) -> dict[str, dict]:
    """Each confidence signal read as a predicted IoU: :func:`calibration_bins` against the true IoU.

    The candidates are matched as in :func:`confidence_correlation` (best IoU with a ground truth of
    their class, kept when it is greater than ``min_iou`` and the score is at least ``min_score``);
    a signal the candidates lack is skipped.

    Returns:
        ``{signal: calibration_bins(...)}``.
    """
    iou, values = _matched_signals(candidates, gts, signals, min_iou, min_score)
    return {s: calibration_bins(v, iou, bins) for s, v in values.items()}


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas, no pyplot: no global backend state)
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float, dpi: float = 100.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_path: str | os.PathLike, **kwargs: Any) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", **kwargs)
    return out_path


def plot_confidence(
    candidates: Sequence[Mapping],
    gts: Any,
    out_path: str | os.PathLike,
    signals: Sequence[str] = SIGNALS,
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
    iou, values = _matched_signals(candidates, gts, signals, min_iou, min_score)
    stats = {s: {"pearson": pearson(v, iou), "spearman": spearman(v, iou), "n": int(iou.numel())}
             for s, v in values.items()}
    shown = list(values) or ["score"]
    idx = np.arange(iou.numel())
    if idx.size > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx.size, max_points, replace=False))
    fig = _figure(4.2 * len(shown), 4.4)
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
    _save(fig, out_path, dpi=110)
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
    fig = _figure(4.2 * len(signals), 5.2)
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
    return _save(fig, out_path, dpi=110)


def draw_detections(
    image: Tensor,
    detections: Mapping,
    out_path: str | os.PathLike,
    gt: Mapping | None = None,
    score_threshold: float = 0.3,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Draw detections (and optionally ground truth) on an image and save it as a PNG.

    Args:
        image: (3, H, W) float in [0, 1] or uint8 (a (1, H, W) image is shown in grey).
        detections: ``boxes`` (N, 4) xyxy, ``scores`` (N,), optional ``labels`` (N,) and
            ``quality`` (N,); each box is labelled ``name score`` and ``q=quality``.
        out_path: PNG path (parent folders are created).
        gt: optional target with ``boxes`` (M, 4) (drawn dashed white).
        score_threshold: only detections with a score at least this are drawn.
        class_names: ``class_names[label]`` names the classes (default: the label number).

    Returns:
        ``out_path`` as a ``Path``.
    """
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) or (1, H, W) tensor, got {shape}")
    if not isinstance(detections, Mapping) or "boxes" not in detections or "scores" not in detections:
        raise ValueError("detections must be a dict with 'boxes' and 'scores'")
    boxes = check_boxes(detections["boxes"], "detections['boxes']").detach().cpu()
    scores = detections["scores"].detach().cpu()
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"detections['scores'] must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    labels = detections.get("labels")
    quality = detections.get("quality")
    keep = scores >= score_threshold

    img = image.detach().cpu()
    img = img.float() / 255.0 if not img.is_floating_point() else img.float()
    img = img.expand(3, -1, -1).permute(1, 2, 0).clamp(0, 1).numpy()
    h, w = img.shape[:2]
    scale = max(1.0, 640.0 / max(h, w))  # small images are enlarged so that the text stays legible
    fig = _figure(w * scale / 100.0, h * scale / 100.0)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    ax.set(xlim=(0, w), ylim=(h, 0))

    from matplotlib.patches import Rectangle

    if gt is not None:
        for x1, y1, x2, y2 in check_boxes(gt["boxes"], "gt['boxes']").detach().cpu().tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", lw=1.2, ls="--"))
    cmap = [f"C{i}" for i in range(10)]
    for i in torch.nonzero(keep).flatten().tolist():
        x1, y1, x2, y2 = boxes[i].tolist()
        label = int(labels[i]) if labels is not None else 0
        color = cmap[label % 10]
        name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
        text = f"{name} {float(scores[i]):.2f}"
        if quality is not None:
            text += f" q={float(quality[i]):.2f}"
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec=color, lw=1.5))
        inside = y1 < 14.0 / scale  # no room above the box: write the label inside it
        ax.text(x1, y1, text, fontsize=7, color="white", va="top" if inside else "bottom", ha="left", clip_on=True,
                bbox={"facecolor": color, "alpha": 0.8, "pad": 1, "lw": 0})
    return _save(fig, out_path)
