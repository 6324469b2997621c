"""Scoring against a ground truth: COCO metrics of the output and inputs, and each signal's correlation.

The output, and for comparison each input under plain NMS, are scored with the COCO API of
faster-coco-eval (:mod:`locconf.evaluation.coco`: AP, AP50, AP75, AP90, APs/m/l, AR100) on every
image of the ground truth, as COCO's own evaluation does (an image without records counts its
objects as missed). The Pearson / Spearman correlation of each confidence signal with the true IoU
of the matched boxes (IoU > 0.5; :func:`locconf.evaluation.confidence_correlation`) is reported for
the input candidates and for the output.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence

import torch

from ..evaluation.coco import coco_metrics, format_table, load_coco
from ..evaluation.correlation import confidence_correlation
from ..evaluation.matching import match_to_ground_truth


class _Scorer:
    """Collects, per named row, the COCO records to score and the matched boxes to correlate."""

    def __init__(self, gt_path: str | os.PathLike):
        self.gt = load_coco(gt_path)
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

    def report(self) -> dict:
        metrics = {}
        image_ids = sorted(self.images)
        for row, records in self.rows.items():
            with contextlib.redirect_stdout(io.StringIO()):
                dt = self.gt.loadRes(records)
            metrics[row] = coco_metrics(self.gt, dt, image_ids)
        correlation = {}
        for row, cands in self.matched.items():
            targets = [self.target(c["image_id"]) for c in cands] if cands else []
            correlation[row] = confidence_correlation(cands, targets) if cands else {}
        return {"metrics": metrics, "correlation": correlation, "table": format_table(metrics)}


def format_correlation(correlation: Mapping[str, Mapping]) -> str:
    """Markdown table of the correlations of :func:`postprocess_file`'s report."""
    lines = ["| boxes | signal | Pearson | Spearman | n |", "|---|---|---:|---:|---:|"]
    for row, signals in correlation.items():
        for signal, c in signals.items():
            lines.append(f"| {row} | {signal} | {c['pearson']:+.3f} | {c['spearman']:+.3f} | {c['n']} |")
    return "\n".join(lines)
