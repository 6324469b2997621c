"""Property-based tests (hypothesis) of the public box algebra, PrRoIPool and the COCO loader.

Each property is checked against an independent statement of what the function means (a
plain-Python reference, an invariance, an exact identity of the integral) on generated inputs:
boxes anywhere in a bounded plane (zero-size ones included), feature maps and boxes of any size,
and COCO files with boxes inside, across and outside their images. Deterministic (derandomized,
no example database) so that a failure replays.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from locconf import boxes as B
from locconf.data import CocoDetection
from locconf.prroi_pool import prroi_pool

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Coordinates on a 1/8 px grid: exact in floating point, so that shifted and scaled boxes are
# exactly the same boxes (no rounding of 1e-70 px widths against 100 px offsets).
coord = st.integers(-800, 800).map(lambda v: v / 8)
size = st.integers(0, 480).map(lambda v: v / 8)
positive = st.integers(4, 480).map(lambda v: v / 8)
moderate = st.integers(4, 240).map(lambda v: v / 8)


def xyxy(sizes):
    return st.tuples(coord, coord, sizes, sizes).map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]])


def box_tensor(sizes=size, min_size=0, max_size=8):
    return st.lists(xyxy(sizes), min_size=min_size, max_size=max_size).map(
        lambda b: torch.tensor(b, dtype=torch.float64).reshape(-1, 4))


def ref_iou(a, b):
    """Plain-Python IoU of two xyxy boxes, 0 for an empty union."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# -- boxes ----------------------------------------------------------------------------------------


@settings(max_examples=60, **SETTINGS)
@given(box_tensor(), box_tensor())
def test_iou_matches_reference_and_is_symmetric(a, b):
    iou = B.box_iou(a, b)
    assert iou.shape == (len(a), len(b))
    assert torch.equal(iou, B.box_iou(b, a).T)
    for i in range(len(a)):
        for j in range(len(b)):
            assert iou[i, j].item() == pytest.approx(ref_iou(a[i].tolist(), b[j].tolist()), abs=1e-12)
    assert ((iou >= 0) & (iou <= 1)).all()


@settings(max_examples=60, **SETTINGS)
@given(box_tensor(min_size=1), box_tensor(min_size=1), st.tuples(coord, coord), st.integers(-3, 3))
def test_iou_purity_integrity_invariant_to_shift_and_scale(a, b, shift, log2_scale):
    """Exactly: grid coordinates shifted on the grid and scaled by powers of two stay exact."""
    def moved(x):
        return (x + torch.tensor(shift * 2, dtype=x.dtype)) * 2.0 ** log2_scale

    for fn in (B.box_iou, B.box_purity, B.box_integrity):
        assert torch.equal(fn(moved(a), moved(b)), fn(a, b))


@settings(max_examples=60, **SETTINGS)
@given(box_tensor(min_size=1), box_tensor(min_size=1))
def test_purity_of_a_is_integrity_of_b_and_bounds_iou(a, b):
    purity, integrity, iou = B.box_purity(a, b), B.box_integrity(a, b), B.box_iou(a, b)
    torch.testing.assert_close(purity, B.box_integrity(b, a).T)
    assert (iou <= torch.minimum(purity, integrity) + 1e-12).all()
    assert ((purity >= 0) & (purity <= 1 + 1e-12)).all()


@settings(max_examples=60, **SETTINGS)
@given(box_tensor(positive, min_size=1))
def test_self_iou_is_one_and_elementwise_is_the_diagonal(a):
    torch.testing.assert_close(B.elementwise_box_iou(a, a), torch.ones(len(a), dtype=a.dtype))
    b = a.roll(1, 0)
    torch.testing.assert_close(B.elementwise_box_iou(a, b), B.box_iou(a, b).diagonal())
    torch.testing.assert_close(B.elementwise_purity(a, b), B.box_purity(a, b).diagonal())


@settings(max_examples=60, **SETTINGS)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(box_tensor(moderate, n, n), box_tensor(moderate, n, n))))
def test_encode_decode_round_trips(pair):
    """Within the decoder's scale clamp (size ratios up to 1000 / 16; here at most 60)."""
    boxes, reference = pair
    torch.testing.assert_close(B.decode_boxes(B.encode_boxes(boxes, reference), reference), boxes,
                               atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(B.decode_corners(B.encode_corners(boxes, reference), reference), boxes,
                               atol=1e-9, rtol=1e-9)


@settings(max_examples=60, **SETTINGS)
@given(box_tensor(), st.integers(0, 80), st.integers(0, 80))
def test_clip_stays_inside_is_idempotent_and_keeps_inner_boxes(a, h, w):
    c = B.clip_boxes(a, (h, w))
    assert ((c[:, 0::2] >= 0) & (c[:, 0::2] <= w) & (c[:, 1::2] >= 0) & (c[:, 1::2] <= h)).all()
    assert torch.equal(B.clip_boxes(c, (h, w)), c)
    inside = (a[:, :2] >= 0).all(1) & (a[:, 2] <= w) & (a[:, 3] <= h)
    assert torch.equal(c[inside], a[inside])


@settings(max_examples=40, **SETTINGS)
@given(box_tensor(min_size=1), st.data())
def test_check_boxes_rejects_any_inverted_or_non_finite_box(a, data):
    i = data.draw(st.integers(0, len(a) - 1))
    bad = a.clone()
    kind = data.draw(st.sampled_from(["inverted", "nan", "inf"]))
    if kind == "inverted":
        bad[i, 2] = bad[i, 0] - data.draw(st.integers(1, 80)) / 8
    else:
        bad[i, data.draw(st.integers(0, 3))] = float(kind)
    match = "must satisfy x2 >= x1" if kind == "inverted" else "contains NaN or inf"
    with pytest.raises(ValueError, match=f"gt_boxes {match}"):
        B.box_purity(a, bad)
    assert B.check_boxes(a, "gt_boxes") is a


@settings(max_examples=25, **SETTINGS)
@given(box_tensor(st.integers(16, 320).map(lambda v: v / 8), min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_jitter_boxes_fall_in_their_iou_bins(gt, seed):
    bins = (0.5, 0.7, 0.9, 1.0)
    boxes, source = B.jitter_boxes(gt, num_per_box=6, bins=bins, generator=torch.Generator().manual_seed(seed))
    assert boxes.shape[0] == source.shape[0] <= len(gt) * 6
    assert ((source >= 0) & (source < len(gt))).all()
    if len(boxes):
        iou = B.elementwise_box_iou(boxes, gt[source])
        assert ((iou >= bins[0] - 1e-12) & (iou <= bins[-1] + 1e-12)).all()
        per_bin = torch.bucketize(iou.clamp(max=0.999999), torch.tensor(bins, dtype=iou.dtype), right=True)
        counts = torch.bincount(source * 4 + per_bin, minlength=len(gt) * 4)
        assert counts.max() <= 2  # ceil(6 / 3) per (box, bin)


# -- PrRoIPool --------------------------------------------------------------------------------------


@st.composite
def maps_and_rois(draw, inside: bool = False, max_rois: int = 5):
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    feats = torch.tensor(draw(st.lists(st.floats(-10, 10), min_size=b * c * h * w, max_size=b * c * h * w)),
                         dtype=torch.float64).view(b, c, h, w)
    rois = []
    for _ in range(draw(st.integers(0, max_rois))):  # corners on a 1/8 px grid (see `coord`)
        if inside:  # within the pixel centres [0, W-1] x [0, H-1]
            x1, x2 = sorted(draw(st.integers(0, 8 * (w - 1))) / 8 for _ in range(2))
            y1, y2 = sorted(draw(st.integers(0, 8 * (h - 1))) / 8 for _ in range(2))
        else:
            x1, y1 = draw(st.integers(-24, 8 * (w + 2))) / 8, draw(st.integers(-24, 8 * (h + 2))) / 8
            x2, y2 = x1 + draw(st.integers(0, 8 * (w + 2))) / 8, y1 + draw(st.integers(0, 8 * (h + 2))) / 8
        rois.append([float(draw(st.integers(0, b - 1))), x1, y1, x2, y2])
    return feats, torch.tensor(rois, dtype=torch.float64).reshape(-1, 5)


@settings(max_examples=40, **SETTINGS)
@given(maps_and_rois(inside=True), st.floats(-5, 5))
def test_constant_map_pools_to_the_constant_inside(data, value):
    """Inside the pixel centres the bilinear interpolant of a constant map is that constant."""
    feats, rois = data
    out = prroi_pool(torch.full_like(feats, value), rois, (2, 3))
    assert out.shape == (len(rois), feats.shape[1], 2, 3)
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    expected = torch.where(area[:, None, None, None] > 0, torch.tensor(value, dtype=out.dtype), torch.zeros(()))
    # a box of zero width or height has bins of zero area, which pool to 0
    torch.testing.assert_close(out, expected.expand_as(out), atol=1e-9, rtol=1e-9)


@settings(max_examples=40, **SETTINGS)
@given(maps_and_rois(inside=True))
def test_ramp_map_pools_to_the_bin_centre(data):
    """On F[i, j] = j the interpolant is x, so a bin's mean is the x of its centre."""
    feats, rois = data
    ramp = torch.arange(feats.shape[-1], dtype=feats.dtype).expand_as(feats).contiguous()
    out = prroi_pool(ramp, rois, (1, 4))
    x1, x2 = rois[:, 1:2], rois[:, 3:4]
    centres = x1 + (x2 - x1) * (torch.arange(4, dtype=feats.dtype) + 0.5) / 4
    positive = ((rois[:, 3] > rois[:, 1]) & (rois[:, 4] > rois[:, 2]))
    torch.testing.assert_close(out[positive, :, 0, :], centres[positive, None, :].expand(-1, feats.shape[1], -1),
                               atol=1e-9, rtol=1e-9)


@settings(max_examples=40, **SETTINGS)
@given(maps_and_rois(), st.integers(1, 4), st.integers(1, 4), st.floats(-3, 3))
def test_pooling_is_linear_and_bins_average_to_the_whole_box(data, oh, ow, a):
    feats, rois = data
    other = feats.flip(-1).roll(1, 1)
    fine = prroi_pool(feats, rois, (oh, ow))
    torch.testing.assert_close(prroi_pool(a * feats + other, rois, (oh, ow)),
                               a * fine + prroi_pool(other, rois, (oh, ow)), atol=1e-9, rtol=1e-9)
    positive = (rois[:, 3] > rois[:, 1]) & (rois[:, 4] > rois[:, 2])
    torch.testing.assert_close(fine.mean(dim=(2, 3))[positive], prroi_pool(feats, rois, 1)[positive, :, 0, 0],
                               atol=1e-9, rtol=1e-9)


@settings(max_examples=40, **SETTINGS)
@given(maps_and_rois(), st.floats(0.05, 0.95))
def test_list_form_equals_k5_form_and_fractional_indices_are_refused(data, frac):
    feats, rois = data
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(feats.shape[0])]
    order = torch.argsort(rois[:, 0], stable=True)
    torch.testing.assert_close(prroi_pool(feats, per_image, 2), prroi_pool(feats, rois, 2)[order])
    if len(rois):
        bad = rois.clone()
        bad[-1, 0] = bad[-1, 0] + frac if bad[-1, 0] == 0 else bad[-1, 0] - frac
        with pytest.raises(ValueError, match="rois has a non-integral batch index"):
            prroi_pool(feats, bad, 2)


# -- the COCO loader ----------------------------------------------------------------------------------


@st.composite
def coco_files(draw):
    """A COCO dict: images of random sizes, boxes inside, across and outside them, shuffled category ids."""
    cat_ids = draw(st.lists(st.integers(1, 99), min_size=1, max_size=4, unique=True))
    images = [{"id": i + 1, "file_name": f"{i}.png", "width": draw(st.integers(1, 40)),
               "height": draw(st.integers(1, 40))} for i in range(draw(st.integers(1, 4)))]
    anns = []
    for k in range(draw(st.integers(0, 12))):
        im = draw(st.sampled_from(images))
        bbox = [draw(st.floats(-20, 50)), draw(st.floats(-20, 50)), draw(st.floats(-5, 30)), draw(st.floats(-5, 30))]
        anns.append({"id": k + 1, "image_id": im["id"], "category_id": draw(st.sampled_from(cat_ids)), "bbox": bbox})
    cats = [{"id": c, "name": f"c{c}"} for c in cat_ids]
    return {"images": images, "annotations": anns, "categories": cats}


def expected_targets(coco):
    """Per image: the boxes clipped to it, those of zero area after clipping dropped (plain Python)."""
    labels = {c: k + 1 for k, c in enumerate(sorted(c["id"] for c in coco["categories"]))}
    out = {im["id"]: [] for im in coco["images"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for a in coco["annotations"]:
        w_img, h_img = sizes[a["image_id"]]
        x, y, w, h = a["bbox"]
        if w <= 0 or h <= 0:
            continue
        x1, x2 = min(max(x, 0), w_img), min(max(x + w, 0), w_img)
        y1, y2 = min(max(y, 0), h_img), min(max(y + h, 0), h_img)
        if x2 > x1 and y2 > y1:
            out[a["image_id"]].append(([x1, y1, x2, y2], labels[a["category_id"]]))
    return out


@settings(max_examples=40, **SETTINGS)
@given(coco_files())
def test_loader_targets_match_the_clipped_annotations(tmp_path, coco):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    ds = CocoDetection(tmp_path, path, check_files=False)
    expected = expected_targets(coco)
    assert ds.image_ids == [im["id"] for im in coco["images"]]
    kept = 0
    for i, im in enumerate(coco["images"]):
        t = ds.target(i)
        boxes, labels = [b for b, _ in expected[im["id"]]], [lab for _, lab in expected[im["id"]]]
        torch.testing.assert_close(t["boxes"], torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        assert t["labels"].tolist() == labels and t["image_id"] == im["id"]
        assert ((t["boxes"][:, 2:] > t["boxes"][:, :2]).all() and (t["boxes"][:, 2] <= im["width"]).all()
                and (t["boxes"][:, 3] <= im["height"]).all() and (t["boxes"] >= 0).all())
        kept += len(boxes)
    assert ds.num_boxes() == kept == len(coco["annotations"]) - sum(ds.skipped.values())
    assert ds.category_ids(torch.arange(1, ds.num_classes + 1)).tolist() == sorted(c["id"] for c in coco["categories"])


@settings(max_examples=30, **SETTINGS)
@given(coco_files().filter(lambda c: len(c["annotations"]) >= 2), st.data())
def test_loader_refuses_any_repeated_annotation_id(tmp_path, coco, data):
    i, j = sorted(data.draw(st.lists(st.integers(0, len(coco["annotations"]) - 1), min_size=2, max_size=2,
                                     unique=True)))
    coco["annotations"][j]["id"] = coco["annotations"][i]["id"]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=rf"ann\.json: annotations\[{j}\] repeats annotation id "
                                         rf"{coco['annotations'][i]['id']}\b"):
        CocoDetection(tmp_path, path, check_files=False)


def test_properties_cover_degenerate_inputs():
    """The strategies above include the edge cases that matter (not left to chance)."""
    assert B.box_iou(torch.zeros(0, 4), torch.zeros(2, 4)).shape == (0, 2)
    zero = torch.tensor([[1.0, 1.0, 1.0, 3.0]])
    assert B.box_iou(zero, zero).item() == 0.0 and not math.isnan(B.box_purity(zero, zero).item())
