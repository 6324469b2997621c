"""One self-contained HTML page of an evaluation: what ``locconf eval --html report.html`` writes.

The page holds the AP table of every post-processing method, one table per site, the calibration
of the confidence signals (ECE before and after calibration, AP with calibrated quality), the
correlation of each signal with the true IoU, the confidence scatter and reliability plots, and a
gallery of detections coloured by their predicted quality (by their score when the detector
predicts no quality), with a legend and a colour bar under each image, at most 25 boxes per image
(the highest scores; :func:`gallery_item`), the images sampled across sites (:func:`gallery_indices`).
Images are embedded as base64 PNG and the style sheet is inline: the file
needs nothing else, and renders offline (``benchmarks/render_report.sh`` screenshots it with
headless Chromium).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ..boxes import check_boxes
from ..files import atomic_write_text
from .coco import METRICS
from .precision_recall import PR_METRICS
from .plots import figure, image_array, show_image

__all__ = ["write_report", "render_report", "detections_png", "detections_figure", "gallery_item", "gallery_indices", "METRIC_COLUMNS"]

#: Metric columns of the AP tables, in order (the evaluation's :data:`locconf.evaluation.coco.METRICS`,
#: then DeepForest's box precision and recall where the results have them).
METRIC_COLUMNS = METRICS + PR_METRICS

#: The legend above the gallery of :func:`render_report` (what :func:`gallery_item` draws).
GALLERY_NOTE = ("Dashed white boxes: ground truth. Solid boxes: detections with a score of at least 0.3, at most "
                "25 per image (the highest scores; the caption says how many more are hidden), coloured by "
                "their predicted IoU (by their score where the detector predicts none): the colour bar under "
                "each image gives the scale, dark purple 0 to yellow 1. Images are sampled across sites and, "
                "within a site, evenly through its images.")

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1180px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.92em; }
th, td { padding: 0.28em 0.7em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f5f5f5; }
td.best { font-weight: bold; } figure { margin: 0.8em 0; } figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; }
.gallery figure { margin: 0; border: 1px solid #ddd; padding: 4px; background: #fafafa; }
.gallery img { width: 100%; display: block; }
.note { color: #555; font-size: 0.92em; }
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _pct(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return ""
    return "-" if v == -1 else f"{100.0 * v:.1f}"


def _num(v: Any, fmt: str) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
        return ""
    return format(v, fmt)


def _png_src(png: bytes | str | os.PathLike) -> str:
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"not a PNG image: {png if not isinstance(png, bytes) else 'bytes'}")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _metrics_table(rows: Mapping[str, Mapping], columns: Sequence[str] = METRIC_COLUMNS) -> str:
    """A table of metrics x 100, one row per name; the best value of each column in bold."""
    columns = [c for c in columns if any(c in m for m in rows.values())]
    best = {}
    for c in columns:
        values = [m[c] for m in rows.values() if isinstance(m.get(c), (int, float)) and m[c] != -1]
        best[c] = max(values) if values and max(values) > min(values) else None  # bold only where they differ
    out = ["<table><tr><th>method</th>" + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr>"]
    for name, m in rows.items():
        cells = []
        for c in columns:
            v = m.get(c)
            cls = ' class="best"' if best[c] is not None and v == best[c] else ""
            cells.append(f"<td{cls}>{_pct(v)}</td>")
        out.append(f"<tr><td>{_esc(name)}</td>{''.join(cells)}</tr>")
    return "\n".join(out) + "</table>"


def _sites_tables(results: Mapping[str, Mapping]) -> str:
    sites = list(dict.fromkeys(s for m in results.values() for s in (m.get("sites") or {})))
    parts = []
    for site in sites:
        rows = {method: m["sites"][site] for method, m in results.items() if site in (m.get("sites") or {})}
        parts.append(f"<h3>{_esc(site)}</h3>\n{_metrics_table(rows)}")
    return "\n".join(parts)


def _correlation_table(correlation: Mapping[str, Mapping], sites: Optional[Mapping[str, Mapping]]) -> str:
    out = ["<table><tr><th>images</th><th>signal</th><th>Pearson</th><th>Spearman</th><th>n</th></tr>"]
    groups = {"all": correlation, **(sites or {})}
    for group, signals in groups.items():
        for signal, c in signals.items():
            out.append(f"<tr><td>{_esc(group)}</td><td>{_esc(signal)}</td><td>{_num(c.get('pearson'), '+.3f')}</td>"
                       f"<td>{_num(c.get('spearman'), '+.3f')}</td><td>{_esc(c.get('n', ''))}</td></tr>")
    return "\n".join(out) + "</table>"


def _calibration_section(calibration: Mapping[str, Any]) -> str:
    parts = []
    ece = calibration.get("ece") or {}
    if ece:
        parts.append("<table><tr><th>signal</th><th>ECE</th><th>ECE calibrated (out-of-fold)</th><th>n</th></tr>")
        for signal, e in ece.items():
            parts.append(f"<tr><td>{_esc(signal)}</td><td>{_num(e.get('raw'), '.3f')}</td>"
                         f"<td>{_num(e.get('calibrated'), '.3f')}</td><td>{_esc(e.get('n', ''))}</td></tr>")
        parts.append("</table>")
    if calibration.get("methods"):
        parts.append("<p class=\"note\">AP of the methods that use the quality, on the raw and on the "
                     "calibrated quality:</p>")
        parts.append(_metrics_table(calibration["methods"]))
    if calibration.get("note"):
        parts.append(f"<p class=\"note\">{_esc(calibration['note'])}</p>")
    return "\n".join(parts)


def render_report(
    title: str,
    results: Mapping[str, Mapping],
    correlation: Optional[Mapping[str, Mapping]] = None,
    correlation_sites: Optional[Mapping[str, Mapping]] = None,
    calibration: Optional[Mapping[str, Any]] = None,
    figures: Optional[Mapping[str, bytes | str | os.PathLike]] = None,
    gallery: Sequence[Mapping[str, Any]] = (),
    meta: Optional[str] = None,
    gallery_note: str = GALLERY_NOTE,
) -> str:
    """The HTML text of the report.

    Args:
        title: page title.
        results: :func:`locconf.evaluation.evaluate_methods`'s ``{method: metrics}`` (with
            ``sites`` per method where the images have sites).
        correlation, correlation_sites: :func:`locconf.evaluation.confidence_correlation` results
            (all images, and ``{site: ...}``).
        calibration: ``{"ece": {signal: {"raw", "calibrated", "n"}}, "methods": {row: metrics},
            "note": str}`` (any part may be missing).
        figures: ``{caption: PNG}`` (bytes or a file), shown in order.
        gallery: ``[{"png": bytes, "caption": str}]`` (:func:`gallery_item`).
        meta: a line under the title (data, checkpoint, ...).
        gallery_note: the legend above the gallery.
    """
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict {{method: metrics}}, got {type(results).__name__}")
    body = [f"<h1>{_esc(title)}</h1>"]
    if meta:
        body.append(f"<p class=\"meta\">{_esc(meta)}</p>")
    body.append("<h2>COCO box AP per post-processing method</h2>")
    body.append(_metrics_table(results) if results else "<p class=\"note\">no results</p>")
    body.append("<p class=\"note\">Metrics x 100 on the same candidates; best per column in bold (where the "
                "methods differ); - where undefined.</p>")
    sites = _sites_tables(results)
    if sites:
        body.append("<h2>Per site</h2>\n" + sites)
    if calibration:
        body.append("<h2>Calibration of the localization confidence</h2>\n" + _calibration_section(calibration))
    if correlation:
        body.append("<h2>Correlation with the true IoU</h2>\n" + _correlation_table(correlation, correlation_sites))
    for caption, png in (figures or {}).items():
        body.append(f"<figure><img alt=\"{_esc(caption)}\" src=\"{_png_src(png)}\">"
                    f"<figcaption>{_esc(caption)}</figcaption></figure>")
    if gallery:
        body.append("<h2>Detections</h2>")
        body.append(f"<p class=\"note\">{_esc(gallery_note)}</p>\n<div class=\"gallery\">")
        for item in gallery:
            body.append(f"<figure><img alt=\"{_esc(item.get('caption', ''))}\" src=\"{_png_src(item['png'])}\">"
                        f"<figcaption>{_esc(item.get('caption', ''))}</figcaption></figure>")
        body.append("</div>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(path: str | os.PathLike, title: str, results: Mapping[str, Mapping], **sections: Any) -> Path:
    """Write :func:`render_report`'s page to ``path`` (through a temporary file renamed at the end)."""
    text = render_report(title, results, **sections)
    return atomic_write_text(path, text)


def detections_png(
    image: Tensor,
    detections: Mapping[str, Tensor],
    gt: Optional[Mapping[str, Tensor]] = None,
    score_threshold: float = 0.3,
    max_side: int = 400,
    max_boxes: int = 25,
) -> bytes:
    """:func:`detections_figure` as PNG bytes (100 dpi: one figure pixel per picture pixel)."""
    fig = detections_figure(image, detections, gt=gt, score_threshold=score_threshold, max_side=max_side,
                            max_boxes=max_boxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def detections_figure(
    image: Tensor,
    detections: Mapping[str, Tensor],
    gt: Optional[Mapping[str, Tensor]] = None,
    score_threshold: float = 0.3,
    max_side: int = 400,
    max_boxes: int = 25,
):
    """A matplotlib figure of an image with its detections coloured by predicted quality (viridis, 0 to 1).

    Under the image: a legend (dashed white: ground truth; solid: a detection, its colour the
    predicted IoU, or the score where the detector predicts no quality; how many detections are
    hidden) and the colour bar with its ticks and label.

    Args:
        image: (3, H, W) float in [0, 1] (or uint8).
        detections: one image's detections (:class:`locconf.candidates.Candidates`, ``quality``
            optional); boxes with a score below ``score_threshold`` are not drawn, and of the others
            only the ``max_boxes`` highest-scoring are (the legend says how many are hidden).
        gt: optional ``boxes`` (M, 4), drawn dashed white.
        max_side: the longer side of the image in the picture, in pixels.
        max_boxes: the most detections drawn (at least 1).

    Returns:
        The ``Figure`` (on its own Agg canvas): its axes are the image, the legend row and the
        colour bar, in that order.
    """
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError("image must be a (3, H, W) or (1, H, W) tensor")
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes < 1:
        raise ValueError(f"max_boxes must be a positive int, got {max_boxes!r}")
    boxes = check_boxes(detections["boxes"], "detections['boxes']").detach().cpu().double()
    scores = detections["scores"].detach().cpu().double()
    quality = detections.get("quality")
    colour_by = (quality if quality is not None else scores).detach().cpu().double().clamp(0, 1)
    shown, hidden = _top_boxes(scores, score_threshold, max_boxes)
    img = image_array(image)
    h, w = img.shape[:2]
    scale = max_side / max(h, w, 1)
    width, height = max(w * scale, 260.0) / 100.0, h * scale / 100.0  # inches at 100 dpi
    footer = 0.62  # legend row, colour bar, its tick labels and its label
    fig = figure(width, height + footer)
    total = height + footer
    ax = fig.add_axes((0.5 - w * scale / 100.0 / width / 2, footer / total, w * scale / 100.0 / width, height / total))
    show_image(ax, img, gt, interpolation="bilinear", gt_width=0.8)
    cmap = colormaps["viridis"]
    order = shown[torch.argsort(colour_by[shown], stable=True)]  # best drawn last, on top
    from .plots import _box_outlines

    ax.add_collection(_box_outlines(boxes[order], [cmap(float(v)) for v in colour_by[order]], lw=1.6))
    what = "predicted IoU (quality)" if quality is not None else "score (no quality predicted)"
    handles = [Line2D([], [], color=cmap(0.85), lw=1.6, label="detection")]
    if gt is not None:
        handles.append(Line2D([], [], color="0.35", lw=0.9, ls="--", label="ground truth"))
    legend_ax = fig.add_axes((0.0, 0.40 / total, 1.0, 0.22 / total))
    legend_ax.set_axis_off()
    legend_ax.legend(handles=handles, loc="center left", ncol=len(handles), fontsize=6.5, frameon=False,
                     handlelength=1.8, columnspacing=1.0, borderaxespad=0.1)
    note = f"{len(shown)} shown, {hidden} more hidden" if hidden else f"{len(shown)} shown"
    legend_ax.text(0.99, 0.5, note, fontsize=6.5, ha="right", va="center", transform=legend_ax.transAxes)
    bar = fig.add_axes((0.06, 0.27 / total, 0.88, 0.1 / total))
    bar.imshow(torch.linspace(0, 1, 256)[None, :].numpy(), aspect="auto", cmap=cmap, extent=(0, 1, 0, 1))
    bar.set_yticks([])
    bar.set_xticks([0, 0.25, 0.5, 0.75, 1])
    bar.set_xticklabels(["0", "0.25", "0.5", "0.75", "1"])
    bar.tick_params(labelsize=6.5, length=2, pad=1)
    bar.set_xlabel(what, fontsize=6.5, labelpad=1)
    return fig


def _top_boxes(scores: Tensor, score_threshold: float, max_boxes: int) -> tuple[Tensor, int]:
    """Indices of the ``max_boxes`` best scores at or above ``score_threshold``, and how many more there are."""
    above = torch.nonzero(scores >= score_threshold).flatten()
    best = above[torch.argsort(scores[above], descending=True, stable=True)]
    return best[:max_boxes], max(0, len(best) - max_boxes)


def gallery_item(image: Tensor, detections: Mapping[str, Tensor], gt: Optional[Mapping[str, Tensor]] = None,
                 title: str = "", score_threshold: float = 0.3, max_boxes: int = 25) -> dict[str, Any]:
    """One gallery entry of :func:`render_report`: ``{"png", "caption"}`` (:func:`detections_png`).

    The caption is ``title`` followed by how many detections score at least ``score_threshold``, how
    many of them are shown (the ``max_boxes`` best) and hidden, and how many objects ``gt`` has.
    """
    scores = detections["scores"].detach().cpu()
    shown, hidden = _top_boxes(scores, score_threshold, max_boxes)
    caption = (f"{title}: " if title else "") + f"{len(shown) + hidden} detections with score >= {score_threshold:g}"
    if hidden:
        caption += f" ({len(shown)} best shown, {hidden} more hidden)"
    if gt is not None:
        caption += f", {len(gt['boxes'])} objects"
    return {"png": detections_png(image, detections, gt=gt, score_threshold=score_threshold, max_boxes=max_boxes),
            "caption": caption}


def gallery_indices(sites: Sequence[Optional[str]], count: int) -> list[int]:
    """Which images a gallery of ``count`` shows: spread over the sites and, within a site, over its images.

    ``sites[i]`` is image i's site (``None`` where the data records none: one group). Each site gets
    an equal share of ``count`` (a site with fewer images gives its unused share to the others),
    and a site's share is taken evenly spaced through its images, first and last included.
    Deterministic; the result is grouped by site in the order the sites first appear, and by image
    index within a site.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    groups: dict[Any, list[int]] = {}
    for i, site in enumerate(sites):
        groups.setdefault(site, []).append(i)
    quota = {site: 0 for site in groups}
    left = min(count, len(sites))
    while left:  # one more image for each site that still has some, in turn
        for site, members in groups.items():
            if left and quota[site] < len(members):
                quota[site] += 1
                left -= 1
    picked = []
    for site, members in groups.items():
        q = quota[site]
        if q:
            positions = [round(k * (len(members) - 1) / (q - 1)) for k in range(q)] if q > 1 else [0]
            picked += [members[p] for p in positions]
    return picked
