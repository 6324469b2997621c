"""`locconf postprocess` end to end on files the tests write: COCO results JSON and JSON Lines in,
COCO results out, scoring against a small COCO ground truth, fusion of several files, and every
bad-record case (named by index and key, nothing written).

References: the same candidates grouped by image here and passed to the Python API
(`locconf.postprocess.postprocess`, `locconf.fusion.fuse`, `evaluate_methods`,
`confidence_correlation`); the file plumbing is what is under test.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from locconf.evaluation import confidence_correlation
from locconf.cli import run_command as main  # exceptions propagate
from locconf.evaluation import evaluate_methods
from locconf.fusion import fuse
from locconf.postprocess import postprocess
from locconf.postprocess_files import fuse_files, postprocess_file, read_detections
from locconf.postprocess_files.source import _Source

# Three images; COCO category ids 7 and 3 (not contiguous); image 3 has no objects.
GT = [(1, 7, [10, 10, 100, 80]), (1, 3, [150, 150, 90, 100]), (1, 7, [40, 30, 60, 60]),
      (2, 7, [50, 20, 120, 100]), (2, 3, [20, 180, 60, 70])]


def write_gt(folder: Path) -> Path:
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, (im, c, b) in enumerate(GT)]
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": 300, "height": 300} for i in (1, 2, 3)],
            "annotations": anns, "categories": [{"id": 7, "name": "tree"}, {"id": 3, "name": "bush"}]}
    path = folder / "gt.json"
    path.write_text(json.dumps(data))
    return path


def make_records(seed: int = 0, per_object: int = 6, quality: bool = True, variance: bool = True) -> list[dict]:
    """Candidates jittered around each object (quality ~ how close), plus false positives."""
    rng = random.Random(seed)
    recs = []
    for image_id in (1, 2, 3):
        for im, cat, (x, y, w, h) in GT:
            if im != image_id:
                continue
            for _ in range(per_object):
                e = [rng.gauss(0, 0.08) for _ in range(4)]
                box = [x + e[0] * w, y + e[1] * h, w * (1 + e[2]), h * (1 + e[3])]
                rec = {"image_id": image_id, "category_id": cat, "bbox": box, "score": rng.random()}
                if quality:
                    rec["quality"] = max(0.0, min(1.0, 1 - 2 * sum(abs(v) for v in e) + rng.gauss(0, 0.05)))
                if variance:
                    rec["variance"] = [1 + 400 * abs(v) + rng.random() for v in e]
                recs.append(rec)
        for _ in range(2):
            rec = {"image_id": image_id, "category_id": rng.choice([7, 3]),
                   "bbox": [rng.uniform(0, 250), rng.uniform(0, 250), rng.uniform(5, 40), rng.uniform(5, 40)],
                   "score": rng.random() * 0.5}
            if quality:
                rec["quality"] = rng.random() * 0.3
            if variance:
                rec["variance"] = [rng.uniform(50, 100) for _ in range(4)]
            recs.append(rec)
    return recs


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, records: list, shuffle: int | None = None) -> Path:
    records = list(records)
    if shuffle is not None:
        random.Random(shuffle).shuffle(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def grouped(records: list[dict]) -> dict[int, dict]:
    """Per image, the candidate tensors the Python API takes (labels = category ids)."""
    out = {}
    for image_id in sorted({r["image_id"] for r in records}):
        rs = [r for r in records if r["image_id"] == image_id]
        xywh = torch.tensor([r["bbox"] for r in rs], dtype=torch.float64)
        cand = {"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                "scores": torch.tensor([r["score"] for r in rs], dtype=torch.float64),
                "labels": torch.tensor([r["category_id"] for r in rs])}
        if "quality" in rs[0]:
            cand["quality"] = torch.tensor([r["quality"] for r in rs], dtype=torch.float64)
        if "variance" in rs[0]:
            cand["variances"] = torch.tensor([r["variance"] for r in rs], dtype=torch.float64)
        out[image_id] = cand
    return out


def to_records(image_id: int, det: dict) -> list[dict]:
    b = det["boxes"]
    xywh = torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1)
    return [{"image_id": image_id, "category_id": int(det["labels"][i]), "bbox": xywh[i].tolist(),
             "score": float(det["scores"][i])} for i in range(len(b))]


def assert_same_detections(got: list[dict], want: list[dict], tol: float = 1e-9) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["image_id"], g["category_id"]) == (w["image_id"], w["category_id"])
        assert g["score"] == pytest.approx(w["score"], abs=tol)
        assert g["bbox"] == pytest.approx(w["bbox"], abs=tol)


def run(*argv) -> int:
    return main(["postprocess", *map(str, argv), "--no-progress"])


# --------------------------------------------------------------------------------------------
# Post-processing one file
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, params", [("nms", {}), ("soft-gaussian", {"sigma": 0.3}), ("quality", {}),
                                            ("iou-guided", {"iou_threshold": 0.6}), ("var-voting", {})])
def test_json_and_jsonl_match_the_python_api(tmp_path, method, params):
    records = make_records()
    outs = []
    for src in (write_json(tmp_path / "c.json", records), write_jsonl(tmp_path / "c.jsonl", records, shuffle=1)):
        out = tmp_path / f"{src.name}.out.json"
        args = [src, "--out", out, "--method", method] + sum((["--param", f"{k}={v}"] for k, v in params.items()), [])
        assert run(*args) == 0
        outs.append(json.loads(out.read_text()))
    want = []
    for image_id, cand in grouped(records).items():
        det = postprocess(cand, method, 100, **params)
        recs = to_records(image_id, det)
        for r, i in zip(recs, range(len(recs))):
            r["quality"], r["variance"] = float(det["quality"][i]), det["variances"][i].tolist()
        want += recs
    for got in outs:
        assert_same_detections(got, want)
        assert [r["quality"] for r in got] == pytest.approx([r["quality"] for r in want])
        assert sum((r["variance"] for r in got), []) == pytest.approx(sum((r["variance"] for r in want), []))
    assert outs[0] == outs[1]  # JSON array and shuffled JSON Lines in: the same file out


def test_boxes_pass_through_unchanged_unless_the_method_moves_them(tmp_path):
    records = make_records()
    src = write_json(tmp_path / "c.json", records)
    inputs = {json.dumps(r["bbox"]) for r in records}
    assert run(src, "--out", tmp_path / "nms.json") == 0
    assert all(json.dumps(r["bbox"]) in inputs for r in json.loads((tmp_path / "nms.json").read_text()))
    assert run(src, "--out", tmp_path / "vv.json", "--method", "var-voting") == 0
    assert not all(json.dumps(r["bbox"]) in inputs for r in json.loads((tmp_path / "vv.json").read_text()))


def test_output_order_jsonl_output_threshold_and_cap(tmp_path):
    records = make_records()
    src = write_jsonl(tmp_path / "c.jsonl", records, shuffle=3)
    out = tmp_path / "out.jsonl"
    assert run(src, "--out", out, "--method", "none", "--score-threshold", "0.4", "--max-detections", "5") == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = []
    for image_id in (1, 2, 3):
        rs = sorted((r for r in records if r["image_id"] == image_id and r["score"] >= 0.4), key=lambda r: -r["score"])
        want += rs[:5]
    assert got == want  # every field of the kept records, unchanged, images by id, scores decreasing


def test_params_as_json_and_repeated(tmp_path):
    records = make_records()
    src = write_json(tmp_path / "c.json", records)
    out = tmp_path / "out.json"
    assert run(src, "--out", out, "--method", "var-voting+soft", "--params", '{"sigma_t": 0.05, "soft_sigma": 0.3}',
               "--param", "min_score=0.01") == 0
    want = []
    for image_id, cand in grouped(records).items():
        want += to_records(image_id, postprocess(cand, "var-voting+soft", 100, sigma_t=0.05, soft_sigma=0.3,
                                                 min_score=0.01))
    assert_same_detections(json.loads(out.read_text()), want)


def test_class_agnostic(tmp_path):
    records = [{"image_id": 1, "category_id": 7, "bbox": [10, 10, 50, 50], "score": 0.9},
               {"image_id": 1, "category_id": 3, "bbox": [12, 10, 50, 50], "score": 0.8}]
    src = write_json(tmp_path / "c.json", records)
    assert run(src, "--out", tmp_path / "a.json") == 0
    assert len(json.loads((tmp_path / "a.json").read_text())) == 2
    assert run(src, "--out", tmp_path / "b.json", "--class-agnostic") == 0
    assert json.loads((tmp_path / "b.json").read_text()) == records[:1]


def test_empty_input_gives_empty_output(tmp_path):
    for name, text in (("e.json", "[]"), ("e.jsonl", ""), ("b.jsonl", "\n\n")):
        src = tmp_path / name
        src.write_text(text)
        assert run(src, "--out", tmp_path / "out.json") == 0
        assert json.loads((tmp_path / "out.json").read_text()) == []


def test_grouped_jsonl_is_indexed_by_image_not_by_record(tmp_path):
    """The first pass keeps one run per image for a grouped file (bounded memory), one per run otherwise."""
    records = make_records()
    grouped_src = _Source(write_jsonl(tmp_path / "g.jsonl", sorted(records, key=lambda r: r["image_id"])))
    assert grouped_src.num_records == len(records) and len(grouped_src._runs[0]) == 3
    interleaved = [records[0], records[-1], records[1]]  # images 1, 3, 1: three runs
    src = _Source(write_jsonl(tmp_path / "i.jsonl", interleaved))
    assert len(src._runs[0]) == 3 and src.image_ids == [1, 3]
    assert [r["bbox"] for r in read_detections(tmp_path / "i.jsonl")] == [records[0]["bbox"], records[1]["bbox"],
                                                                         records[-1]["bbox"]]


# --------------------------------------------------------------------------------------------
# Scoring against a ground truth
# --------------------------------------------------------------------------------------------


def test_gt_scoring_matches_evaluate_methods_and_prints_tables(tmp_path, capsys):
    gt = write_gt(tmp_path)
    records = make_records()
    src = write_jsonl(tmp_path / "c.jsonl", records, shuffle=0)
    out = tmp_path / "out.json"
    assert run(src, "--out", out, "--method", "quality", "--gt", gt) == 0
    printed = capsys.readouterr().out
    assert "| input (nms) |" in printed and "| output (quality) |" in printed and "AP90" in printed
    assert "correlation with the true IoU" in printed and "| input candidates | quality |" in printed

    report = postprocess_file(src, tmp_path / "again.json", method="quality", gt=gt, progress=False)
    # every image of the ground truth has candidates here, so evaluate_methods scores the same images
    cands = [dict(c, image_id=i) for i, c in grouped(records).items()]
    want = evaluate_methods(cands, gt, ["nms", "quality"], {7: 7, 3: 3}, per_site=False, progress=False)
    assert report["metrics"]["input (nms)"] == pytest.approx(want["nms"])
    assert report["metrics"]["output (quality)"] == pytest.approx(want["quality"])
    assert list(report["metrics"]) == ["input (nms)", "output (quality)"]
    # the correlation of the input candidates, as confidence_correlation computes it on all of them
    targets = []
    for image_id in (1, 2, 3):
        objs = [(c, b) for im, c, b in GT if im == image_id]
        xywh = torch.tensor([b for _, b in objs], dtype=torch.float64).reshape(-1, 4)
        targets.append({"image_id": image_id, "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                        "labels": torch.tensor([c for c, _ in objs], dtype=torch.int64)})
    want_corr = confidence_correlation(cands, targets)
    got_corr = report["correlation"]["input candidates"]
    assert set(got_corr) == {"score", "quality", "combined"}
    for signal, c in want_corr.items():
        assert got_corr[signal]["n"] == c["n"] > 10
        assert got_corr[signal]["pearson"] == pytest.approx(c["pearson"])
        assert got_corr[signal]["spearman"] == pytest.approx(c["spearman"])


def test_gt_scoring_counts_images_without_records_as_missed(tmp_path):
    gt = write_gt(tmp_path)
    perfect = [{"image_id": im, "category_id": c, "bbox": b, "score": 0.9} for im, c, b in GT]
    src = write_json(tmp_path / "p.json", perfect)
    report = postprocess_file(src, tmp_path / "o.json", gt=gt, progress=False)
    assert report["metrics"]["output (nms)"]["AP"] == pytest.approx(1.0)
    assert report["correlation"]["input candidates"]["score"]["n"] == len(GT)
    src = write_json(tmp_path / "half.json", [r for r in perfect if r["image_id"] == 1])
    report = postprocess_file(src, tmp_path / "o.json", gt=gt, progress=False)
    assert report["metrics"]["output (nms)"]["AR100"] < 1.0  # image 2's objects are missed, not ignored
    src = write_json(tmp_path / "none.json", [])
    report = postprocess_file(src, tmp_path / "o.json", gt=gt, progress=False)
    assert list(report["metrics"]) == ["input (nms)", "output (nms)"]
    assert report["metrics"]["output (nms)"]["AP"] == 0.0 and report["correlation"]["input candidates"] == {}
    report = fuse_files([src, src], tmp_path / "o.json", gt=gt, progress=False)
    assert list(report["metrics"]) == [f"{src} [0] (nms)", f"{src} [1] (nms)", "fused (score)"]


# --------------------------------------------------------------------------------------------
# Fusion of several files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", ["score", "quality", "variance"])
def test_fuse_matches_the_python_api(tmp_path, weight, capsys):
    gt = write_gt(tmp_path)
    models = [make_records(seed) for seed in (1, 2, 3)]
    models[2] = [r for r in models[2] if r["image_id"] != 2]  # a model with nothing on image 2
    files = [write_json(tmp_path / "a.json", models[0]), write_jsonl(tmp_path / "b.jsonl", models[1], shuffle=0),
             write_json(tmp_path / "c.json", models[2])]
    out = tmp_path / "fused.json"
    assert run("--fuse", *files, "--out", out, "--weight", weight, "--model-weights", "1", "2", "1",
               "--fuse-iou", "0.6", "--gt", gt) == 0
    printed = capsys.readouterr().out
    assert f"| fused ({weight}) |" in printed and f"| {files[1]} (nms) |" in printed
    per_model = [grouped(m) for m in models]
    want = []
    for image_id in (1, 2, 3):
        dets = []
        for g in per_model:
            if image_id in g:
                d = postprocess(g[image_id], "nms", 100)
                dets.append({k: d[k] for k in ("boxes", "scores", "labels", "quality", "variances")})
            else:
                dets.append({"boxes": torch.zeros(0, 4, dtype=torch.float64), "scores": torch.zeros(0).double(),
                             "labels": torch.zeros(0, dtype=torch.int64), "quality": torch.zeros(0).double(),
                             "variances": torch.zeros(0, 4).double()})
        want += to_records(image_id, fuse(dets, weight=weight, iou_threshold=0.6, model_weights=[1, 2, 1]))
    got = json.loads(out.read_text())
    assert_same_detections(got, want)
    assert all("quality" in r and len(r["variance"]) == 4 for r in got)


def test_fusing_copies_of_one_file_gives_its_nms_output(tmp_path):
    """Two identical models: every cluster holds a box and its copy, so WBF returns the NMS output."""
    records = make_records()
    src = write_json(tmp_path / "c.json", records)
    assert run(src, "--out", tmp_path / "nms.json") == 0
    assert run("--fuse", src, src, "--out", tmp_path / "fused.json", "--fuse-iou", "0.99") == 0
    nms = sorted(json.loads((tmp_path / "nms.json").read_text()), key=lambda r: (r["image_id"], -r["score"]))
    assert_same_detections(json.loads((tmp_path / "fused.json").read_text()), nms)


def test_fuse_without_the_signal_is_an_error(tmp_path):
    a = write_json(tmp_path / "a.json", make_records(quality=False))
    b = write_json(tmp_path / "b.json", make_records(1))
    with pytest.raises(ValueError, match=r"a\.json: weight 'quality' needs a 'quality' in every record"):
        run("--fuse", a, b, "--out", tmp_path / "f.json", "--weight", "quality")
    with pytest.raises(ValueError, match="model_weights must have one weight per"):
        run("--fuse", a, b, "--out", tmp_path / "f.json", "--model-weights", "1")
    with pytest.raises(ValueError, match="weight must be one of"):
        fuse_files([a, b], tmp_path / "f.json", weight="iou")
    assert not (tmp_path / "f.json").exists()


# --------------------------------------------------------------------------------------------
# Bad records and arguments: a ValueError naming the index and the key; nothing written
# --------------------------------------------------------------------------------------------

BAD = 35  # the last record, of image 3: images 1 and 2 are already written when it is read


def _bad(update=None, drop=None, replace=None):
    def make(records):
        records = [dict(r) for r in records]
        if replace is not None:
            records[BAD] = replace
        if update:
            records[BAD].update(update)
        if drop:
            records[BAD].pop(drop)
        return records
    return make


BAD_CASES = {
    "not an object": (_bad(replace=5), "must be a JSON object"),
    "no image_id": (_bad(drop="image_id"), "missing key 'image_id'"),
    "no category_id": (_bad(drop="category_id"), "missing key 'category_id'"),
    "no bbox": (_bad(drop="bbox"), "missing key 'bbox'"),
    "no score": (_bad(drop="score"), "missing key 'score'"),
    "string image_id among integers": (_bad({"image_id": "3"}), "named both by integer ids and by strings"),
    "bool image_id": (_bad({"image_id": True}), "'image_id' must be a 64-bit integer"),
    "huge image_id": (_bad({"image_id": -2**63 - 1}), "'image_id' must be a 64-bit integer"),
    "float category_id": (_bad({"category_id": 7.5}), "'category_id' must be a 64-bit integer"),
    "huge category_id": (_bad({"category_id": 2**64}), "'category_id' must be a 64-bit integer"),
    "huge number in bbox": (_bad({"bbox": [10, 10**400, 1, 5]}), r"'bbox' must be a list of 4 numbers"),
    "short bbox": (_bad({"bbox": [1, 2, 3]}), r"'bbox' must be a list of 4 numbers"),
    "string in bbox": (_bad({"bbox": [1, 2, "3", 4]}), r"'bbox' must be a list of 4 numbers"),
    "negative width": (_bad({"bbox": [10, 10, -1, 5]}), "'bbox' has a negative width or height"),
    "negative height": (_bad({"bbox": [10, 10, 1, -5]}), "'bbox' has a negative width or height"),
    "NaN in bbox": (_bad({"bbox": [10, math.nan, 1, 5]}), r"'bbox' must be finite"),
    "inf score": (_bad({"score": math.inf}), r"'score' must be finite"),
    "string score": (_bad({"score": "0.5"}), "'score' must be a number"),
    "no quality": (_bad(drop="quality"), "missing key 'quality'"),
    "NaN quality": (_bad({"quality": math.nan}), r"'quality' must be finite"),
    "zero variance": (_bad({"variance": [1, 1, 0, 1]}), "'variance' must be finite and positive"),
    "short variance": (_bad({"variance": [1, 1, 1]}), "'variance' must be a list of 4 numbers"),
}


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_names_index_and_key_and_writes_nothing(tmp_path, case, fmt):
    make, match = BAD_CASES[case]
    records = make_records()
    assert records[BAD]["image_id"] == 3 and records[BAD - 1]["image_id"] == 3
    bad = make(records)
    src = write_json(tmp_path / "c.json", bad) if fmt == "json" else write_jsonl(tmp_path / "c.jsonl", bad)
    out = tmp_path / "out.json"
    out.write_text("previous output")
    where = f"record {BAD}" + (f" \\(line {BAD + 1}\\)" if fmt == "jsonl" else "")
    with pytest.raises(ValueError, match=f"{src.name}: {where}: .*{match}"):
        run(src, "--out", out)
    assert out.read_text() == "previous output"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "out.json"])  # no temporary left


@pytest.mark.parametrize("record, match", [
    ({"image_id": 99, "category_id": 7, "bbox": [1, 1, 5, 5], "score": 0.5},
     "'image_id' 99 is not an image of the ground truth"),
    ({"image_id": 3, "category_id": 99, "bbox": [1, 1, 5, 5], "score": 0.5},
     "'category_id' 99 is not a category of the ground truth"),
])
def test_ids_unknown_to_the_ground_truth(tmp_path, record, match):
    gt = write_gt(tmp_path)
    records = make_records(quality=False, variance=False)
    records[BAD] = record
    src = write_jsonl(tmp_path / "c.jsonl", records)
    with pytest.raises(ValueError, match=f"record {BAD} \\(line {BAD + 1}\\): {match}"):
        run(src, "--out", tmp_path / "out.json", "--gt", gt)
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(ValueError, match=f"{src.name}: record {BAD}"):
        run("--fuse", src, src, "--out", tmp_path / "out.json", "--gt", gt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "gt.json"]


def test_bad_json_and_bad_arguments(tmp_path):
    good = write_json(tmp_path / "c.json", make_records())
    lines = (tmp_path / "c.jsonl")
    lines.write_text(json.dumps(make_records()[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"c\.jsonl: record 1 \(line 2\): not valid JSON"):
        run(lines, "--out", tmp_path / "o.json")
    (tmp_path / "obj.json").write_text('"text"')
    with pytest.raises(ValueError, match="neither a JSON array nor JSON Lines"):
        run(tmp_path / "obj.json", "--out", tmp_path / "o.json")
    with pytest.raises(ValueError, match="no such file"):
        run(tmp_path / "missing.json", "--out", tmp_path / "o.json")
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices: usage and "invalid choice" on stderr
        run(good, "--out", tmp_path / "o.json", "--method", "wbf")
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="params: .*'sigmaa'"):
        run(good, "--out", tmp_path / "o.json", "--method", "soft-gaussian", "--param", "sigmaa=0.5")
    with pytest.raises(ValueError, match="params: sigma must be a positive number"):
        run(good, "--out", tmp_path / "o.json", "--method", "soft-gaussian", "--param", "sigma=-1")
    with pytest.raises(ValueError, match="--param must be KEY=VALUE"):
        run(good, "--out", tmp_path / "o.json", "--param", "sigma")
    with pytest.raises(ValueError, match="--params must be a JSON object"):
        run(good, "--out", tmp_path / "o.json", "--params", "[1]")
    with pytest.raises(ValueError, match="max_detections must be a positive int"):
        run(good, "--out", tmp_path / "o.json", "--max-detections", "0")
    with pytest.raises(ValueError, match="either one INPUT file or --fuse"):
        run("--out", tmp_path / "o.json")
    with pytest.raises(ValueError, match="either one INPUT file or --fuse"):
        run(good, "--fuse", good, "--out", tmp_path / "o.json")
    with pytest.raises(ValueError, match="is the input"):
        run(good, "--out", good)
    with pytest.raises(ValueError, match="output folder .* does not exist"):
        run(good, "--out", tmp_path / "nowhere" / "o.json")
    no_quality = write_json(tmp_path / "nq.json", make_records(quality=False))
    with pytest.raises(ValueError, match=r"nq\.json: method 'quality' needs a 'quality' in every record"):
        run(no_quality, "--out", tmp_path / "o.json", "--method", "quality")
    assert not (tmp_path / "o.json").exists()
