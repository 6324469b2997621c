"""Scoring against a ground truth: COCO metrics of the output and inputs, and each signal's correlation.

The output, and for comparison each input under plain NMS, are scored with the COCO API of
faster-coco-eval (:mod:`locconf.evaluation.coco`: AP, AP50, AP75, AP90, APs/m/l, AR100) on every
image of the ground truth, as COCO's own evaluation does (an image without records counts its
objects as missed). The Pearson / Spearman correlation of each confidence signal with the true IoU
of the matched boxes (IoU > 0.5; :func:`locconf.evaluation.confidence_correlation`) is reported for
the input candidates and for the output. Beside COCO's metrics, each row gets DeepForest's box
precision and recall (:func:`locconf.evaluation.box_precision_recall`: one-to-one matching per
image, IoU > 0.4, score >= 0.1 by default), overall, per site and per image.

The ground truth may be in any format of :func:`locconf.io.read_annotations` (COCO instances, CSV,
vector file with its rasters); its images and categories are the run's mapping of image keys and
labels (:mod:`locconf.io.keys`).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from ..evaluation.coco import add_precision_recall, coco_metrics, format_table, gt_targets, load_coco
from ..evaluation.correlation import confidence_correlation
from ..evaluation.matching import match_to_ground_truth
from ..evaluation.precision_recall import IOU_THRESHOLD, SCORE_THRESHOLD, box_precision_recall
from ..io import read_annotations
from ..io.keys import Categories, ImageKeys


class _Scorer:
    """Collects, per named row, the COCO records to score and the matched boxes to correlate.

    Args:
        gt_path: the ground truth, any format (``gt_format``; ``images``: its images / rasters).
        pr_iou_threshold, pr_score_threshold: of the box precision and recall.
    """

    def __init__(self, gt_path: str | os.PathLike, gt_format: Optional[str] = None, images: Any = None,
                 pr_iou_threshold: float = IOU_THRESHOLD, pr_score_threshold: float = SCORE_THRESHOLD):
        box_precision_recall([], [], pr_iou_threshold, pr_score_threshold)  # checks the thresholds first
        data = read_annotations(gt_path, gt_format, images=images)
        self.gt = load_coco(data, source=gt_path)
        self.keys = ImageKeys(list(self.gt.imgs.values()))
        self.labels = Categories(list(self.gt.cats.values()))
        self.pr_thresholds = (pr_iou_threshold, pr_score_threshold)
        self.images = set(self.gt.getImgIds())
        self.categories = set(self.gt.getCatIds())
        self.rows: dict[str, list[dict]] = {}
        self.matched: dict[str, list[dict]] = {}
        self._targets: dict[int, dict] = {}

    def target(self, image_id: int) -> dict:
        """The ground truth of one image as a target dict (a one-image cache: memory stays bounded)."""
        if image_id not in self._targets:
            anns = self.gt.imgToAnns.get(image_id, [])
            xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
            self._targets = {image_id: {
                "image_id": image_id, "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
                "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)}}
        return self._targets[image_id]

    def expect(self, rows: Sequence[str], correlated: Sequence[str]) -> None:
        """Declare the rows in table order (so that a file without records still gets its row)."""
        self.rows = {r: [] for r in rows}
        self.matched = {r: [] for r in correlated}

    def add(self, row: str, image_id: int, records: list[dict]) -> None:
        keys = ("image_id", "category_id", "bbox", "score")
        self.rows[row].extend({k: r[k] for k in keys} for r in records)

    def correlate(self, row: str, image_id: int, cand: dict) -> None:
        """Keep the candidates whose true IoU is > 0.5 (all that the correlation uses)."""
        if cand["scores"].shape[0] == 0:
            return
        target = self.target(image_id)
        det = {"boxes": cand["boxes"], "labels": cand["category"]}
        keep = match_to_ground_truth(det, target) > 0.5
        if bool(keep.any()):
            kept = {"image_id": image_id, "boxes": cand["boxes"][keep], "labels": cand["category"][keep],
                    "scores": cand["scores"][keep]}
            if cand.get("quality") is not None:
                kept["quality"] = cand["quality"][keep]
            self.matched[row].append(kept)

    def _precision_recall(self, records: list[dict], targets: list[dict]) -> dict:
        """Box precision and recall of one row's records on every image of the ground truth."""
        boxes: dict[int, list] = {}
        scores: dict[int, list] = {}
        for r in records:
            boxes.setdefault(r["image_id"], []).append(r["bbox"])
            scores.setdefault(r["image_id"], []).append(r["score"])
        dets = []
        for t in targets:
            xywh = torch.tensor(boxes.get(t["image_id"], []), dtype=torch.float64).reshape(-1, 4)
            dets.append({"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                         "scores": torch.tensor(scores.get(t["image_id"], []), dtype=torch.float64)})
        return box_precision_recall(dets, targets, *self.pr_thresholds)

    def report(self) -> dict:
        metrics = {}
        precision_recall = {}
        image_ids = sorted(self.images)
        targets = gt_targets(self.gt, image_ids)
        for row, records in self.rows.items():
            with contextlib.redirect_stdout(io.StringIO()):
                dt = self.gt.loadRes(records)
            metrics[row] = coco_metrics(self.gt, dt, image_ids)
            precision_recall[row] = self._precision_recall(records, targets)
            add_precision_recall(metrics[row], precision_recall[row], per_image=False)
        correlation = {}
        for row, cands in self.matched.items():
            targets = [self.target(c["image_id"]) for c in cands] if cands else []
            correlation[row] = confidence_correlation(cands, targets) if cands else {}
        return {"metrics": metrics, "correlation": correlation, "table": format_table(metrics),
                "precision_recall": precision_recall}


def format_correlation(correlation: Mapping[str, Mapping]) -> str:
    """Markdown table of the correlations of :func:`postprocess_file`'s report."""
    lines = ["| boxes | signal | Pearson | Spearman | n |", "|---|---|---:|---:|---:|"]
    for row, signals in correlation.items():
        for signal, c in signals.items():
            lines.append(f"| {row} | {signal} | {c['pearson']:+.3f} | {c['spearman']:+.3f} | {c['n']} |")
    return "\n".join(lines)


def format_sites(precision_recall: Mapping[str, Mapping]) -> str:
    """Markdown table of the box precision and recall per site of :func:`postprocess_file`'s report
    (empty when the images record no site)."""
    lines = []
    for row, pr in precision_recall.items():
        for site, m in pr.get("sites", {}).items():
            cells = [("-" if m[k] == -1 else f"{100 * m[k]:.1f}") for k in ("box_precision", "box_recall")]
            lines.append(f"| {row} | {site} | {cells[0]} | {cells[1]} | {m['tp']} | {m['predictions']} | {m['objects']} |")
    if not lines:
        return ""
    return "\n".join(["| boxes | site | box_precision | box_recall | TP | predictions | objects |",
                      "|---|---|---:|---:|---:|---:|---:|"] + lines)
