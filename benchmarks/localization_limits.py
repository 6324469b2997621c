"""What limits AP75 of a trained detector: box regression, ranking, or the labels themselves?

    OMP_NUM_THREADS=1 python benchmarks/localization_limits.py --checkpoint runs/recipe/lite0_3000/checkpoint_0003000.pth

For the val split and for the training tiles themselves (no augmentation), it keeps every candidate
once and reports, per ground-truth crown, the best IoU that *any* candidate reaches (the candidate
set's recall at IoU 0.5 / 0.75 / 0.9: what a perfect ranking could keep) beside the recall of the
boxes that hard NMS keeps (top 100 per image) and the COCO AP / AP75 after NMS:

- candidate recall@0.75 low          -> the regressor never produces a tight box: box loss, scale,
                                        refinement are where the room is;
- candidate recall high, NMS low     -> the boxes exist but the ranking drops them: that is what a
                                        localization confidence (IoU-Net, DIR, KL) is for;
- both low on the training tiles too -> the outlines themselves are ambiguous (or the model
                                        underfits): no post-processing helps.

A second table asks whether the model's confidence signals rank its candidates by localization on
each split: the Pearson and Spearman correlation of the classification score and, for a model with a
quality head (IoU-Net, DIR, CLQ), of the predicted IoU and of sqrt(score x IoU) with the true IoU
(candidates with IoU > 0.5, as DIR's Figure 4), and the AP / AP75 of quality NMS beside NMS. A head
that ranks the training tiles well but not val has learnt what does not transfer.

Writes a Markdown table (``--out``, default ``benchmarks/results/localization_limits.md``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torchvision.ops import box_iou

from locconf.data import collate_fn
from locconf.evaluation import collect_candidates, evaluate_methods
from locconf.evaluation.correlation import confidence_correlation
from locconf.experiment import build_datasets, load_trained
from locconf.postprocess import postprocess

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.5, 0.75, 0.9)


def best_iou_per_gt(boxes: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(G,) the largest IoU of each ground-truth box with any of ``boxes`` (0 without boxes)."""
    if gt.numel() == 0:
        return gt.new_zeros(0)
    if boxes.numel() == 0:
        return gt.new_zeros(gt.shape[0])
    return box_iou(gt, boxes).amax(dim=1)


def split_report(model, dataset, gt_json: Path, device: str) -> dict:
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate_fn)
    candidates = collect_candidates(model, loader, torch.device(device), progress=True)
    cand_best, nms_best = [], []
    for cand, i in zip(candidates, range(len(dataset))):
        gt = dataset.target(i)["boxes"].float()
        cand_best.append(best_iou_per_gt(cand["boxes"].float(), gt))
        kept = postprocess(cand, "nms", max_detections=100)
        nms_best.append(best_iou_per_gt(kept["boxes"].float(), gt))
    cand_best, nms_best = torch.cat(cand_best), torch.cat(nms_best)
    has_quality = any(c.get("quality") is not None for c in candidates)
    methods = ["nms", "quality"] if has_quality else ["nms"]
    by_method = evaluate_methods(candidates, str(gt_json), methods, dataset.label_to_cat_id, progress=False)
    metrics = by_method["nms"]
    return {
        "correlation": confidence_correlation(candidates, dataset, min_iou=0.5),
        "mean_quality": (float(torch.cat([c["quality"].float() for c in candidates]).mean())
                         if has_quality else None),
        "quality_nms": ({k: by_method["quality"][k] for k in ("AP", "AP50", "AP75")} if has_quality else None),
        "crowns": int(cand_best.numel()),
        "candidates_per_image": sum(len(c["scores"]) for c in candidates) / max(1, len(candidates)),
        "candidate_recall": {t: float((cand_best >= t).float().mean()) for t in THRESHOLDS},
        "nms_recall": {t: float((nms_best >= t).float().mean()) for t in THRESHOLDS},
        "median_best_iou": {"candidates": float(cand_best.median()), "nms": float(nms_best.median())},
        "AP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics["AP75"],
    }


def _corr(c: dict | None) -> str:
    return "-" if c is None else f"{c['pearson']:+.2f} / {c['spearman']:+.2f}"


def correlation_table(reports: dict) -> list[str]:
    """Markdown lines: each signal's correlation with the true IoU, and quality NMS, per split."""
    lines = ["Confidence against the true IoU (candidates with IoU > 0.5; Pearson / Spearman) and, for a",
             "model with a quality head, quality NMS (ranking by sqrt(score x predicted IoU)) beside NMS:", "",
             "| split | n | score | predicted IoU | sqrt(score x IoU) | mean predicted IoU (all candidates) "
             "| NMS AP / AP75 | quality NMS AP / AP75 |",
             "|---|---:|---|---|---|---:|---|---|"]
    for split, r in reports.items():
        c, q = r["correlation"], r["quality_nms"]
        quality = "-" if q is None else f"{100 * q['AP']:.1f} / {100 * q['AP75']:.1f}"
        mean_q = "-" if r["mean_quality"] is None else f"{r['mean_quality']:.2f}"
        lines.append(f"| {split} | {c['score']['n']} | {_corr(c.get('score'))} | {_corr(c.get('quality'))} | "
                     f"{_corr(c.get('combined'))} | {mean_q} | {100 * r['AP']:.1f} / {100 * r['AP75']:.1f} | {quality} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="config.yaml must lie beside it")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "localization_limits.md")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, cfg = load_trained(args.checkpoint, device=args.device)
    _, val_ds, val_json = build_datasets(**cfg["data"])
    train_json = Path(val_json).with_name("train.json")
    # the training tiles as an evaluation split: same images, no augmentation
    train_ds = type(val_ds)(Path(cfg["data"].get("root", "data/neon")), train_json)
    reports = {"val": split_report(model, val_ds, val_json, args.device),
               "train (no augmentation)": split_report(model, train_ds, train_json, args.device)}
    rows = []
    for split, r in reports.items():
        cr, nr = r["candidate_recall"], r["nms_recall"]
        rows.append(f"| {split} | {r['crowns']} | {r['candidates_per_image']:.0f} | "
                    + " | ".join(f"{100 * cr[t]:.1f}" for t in THRESHOLDS) + " | "
                    + " | ".join(f"{100 * nr[t]:.1f}" for t in THRESHOLDS) + " | "
                    f"{r['median_best_iou']['candidates']:.2f} / {r['median_best_iou']['nms']:.2f} | "
                    f"{100 * r['AP']:.1f} | {100 * r['AP50']:.1f} | {100 * r['AP75']:.1f} |")
    text = "\n".join([
        "# What limits AP75: candidate recall vs NMS recall, on val and on the training tiles",
        "",
        f"Written by `python benchmarks/localization_limits.py --checkpoint {args.checkpoint}`.",
        "Recall = share of ground-truth crowns whose best box reaches the IoU; 'candidates' = every scored",
        "box before NMS (score > 0.05, what a perfect ranking could keep), 'NMS' = the top 100 boxes per",
        "image kept by hard NMS at IoU 0.5. AP after NMS. Percent.",
        "",
        "| split | crowns | candidates/img | cand. R@0.5 | cand. R@0.75 | cand. R@0.9 | NMS R@0.5 | NMS R@0.75 "
        "| NMS R@0.9 | median best IoU (cand. / NMS) | AP | AP50 | AP75 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        *rows,
        "",
        *correlation_table(reports),
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"checkpoint": str(args.checkpoint), "reports": reports}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
