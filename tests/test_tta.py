"""Test-time augmentation: the eight symmetries, mapping boxes and variances back, merging the passes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from locconf.tta import (
    MERGES,
    SPECS,
    TRANSFORMS,
    TTA_SETS,
    TestTimeAugmentation,
    check_transforms,
    fuse_passes,
    inverse_boxes,
    inverse_variances,
    pool_passes,
    split_passes,
    transform_boxes,
    transform_image,
    transform_variances,
    tta_candidates,
    tta_model,
)

# The symmetries written with torch's own operations, an independent reference for transform_image.
REFERENCE = {
    "identity": lambda im: im,
    "hflip": lambda im: im.flip(-1),
    "vflip": lambda im: im.flip(-2),
    "rot180": lambda im: torch.rot90(im, 2, dims=(-2, -1)),
    "transpose": lambda im: im.transpose(-2, -1),
    "rot90": lambda im: torch.rot90(im, 1, dims=(-2, -1)),
    "rot270": lambda im: torch.rot90(im, 3, dims=(-2, -1)),
    "antitranspose": lambda im: torch.rot90(im, 1, dims=(-2, -1)).flip(-1),
}


def _found_box(image: torch.Tensor) -> list[float]:
    """The pixel-edge box (x1, y1, x2, y2) of the non-zero pixels of a (C, H, W) image."""
    ys, xs = torch.nonzero(image.abs().sum(0), as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_the_eight_transforms_are_the_symmetries_of_a_rectangle():
    assert len(TRANSFORMS) == 8 and TRANSFORMS[0] == "identity"
    assert TTA_SETS["all"] == TRANSFORMS and TTA_SETS["flips"] == ("identity", "hflip", "vflip")
    image = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(2, 5, 7)
    seen = set()
    for name in TRANSFORMS:
        out = transform_image(image, name)
        assert torch.equal(out, REFERENCE[name](image)), name
        seen.add(tuple(out.flatten().tolist()))
    assert len(seen) == 8  # all distinct


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_box_drawn_on_an_image_is_found_where_the_transform_says_and_maps_back_exactly(name):
    """Draw a box, transform the image, find the box's pixels there: the found box is transform_boxes of
    the drawn one, and inverse_boxes of the found box is the drawn box, exactly."""
    height, width = 30, 50
    box = [7.0, 4.0, 19.0, 25.0]
    image = torch.zeros(3, height, width)
    image[:, 4:25, 7:19] = 1.0
    found = _found_box(transform_image(image, name))
    assert transform_boxes(torch.tensor([box]), name, (height, width)).tolist() == [found]
    assert inverse_boxes(torch.tensor([found]), name, (height, width)).tolist() == [box]


boxes_strategy = st.lists(
    st.tuples(st.floats(0, 60), st.floats(0, 40), st.floats(0, 60), st.floats(0, 40)), min_size=0, max_size=8)


@settings(max_examples=60, deadline=None)
@given(raw=boxes_strategy, name=st.sampled_from(TRANSFORMS), size=st.tuples(st.integers(1, 80), st.integers(1, 80)))
def test_forward_then_inverse_is_the_identity_on_boxes_and_variances(raw, name, size):
    b = torch.tensor([[min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)] for x1, y1, x2, y2 in raw],
                     dtype=torch.float64).reshape(-1, 4)
    t = transform_boxes(b, name, size)
    assert (t[:, 2:] >= t[:, :2]).all()  # still x2 >= x1, y2 >= y1
    torch.testing.assert_close(inverse_boxes(t, name, size), b, rtol=0, atol=1e-12)
    torch.testing.assert_close(transform_boxes(inverse_boxes(b, name, size), name, size), b, rtol=0, atol=1e-12)
    v = torch.rand(b.shape[0], 4, dtype=torch.float64) + 0.1
    assert torch.equal(inverse_variances(transform_variances(v, name), name), v)
    # the box's width and height follow the transform: swapped exactly where the spec swaps x and y
    wh = torch.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    twh = torch.stack([t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]], 1)
    torch.testing.assert_close(twh, wh.flip(1) if SPECS[name][0] else wh, rtol=0, atol=1e-9)


class _SideDetector(torch.nn.Module):
    """Boxes the non-zero pixels and 'predicts' each coordinate's variance as the mean grey level of the
    box's border on that side (left, top, right, bottom, corners excluded): a variance that belongs to
    one side of the object, wherever a transform puts it."""

    def candidates(self, images):  # the detector protocol: locconf.candidates.candidates_of
        self.calls = getattr(self, "calls", 0) + 1
        out = []
        for im in images:
            x1, y1, x2, y2 = (int(v) for v in _found_box(im))
            g = im[0]
            var = torch.stack([g[y1 + 1:y2 - 1, x1].mean(), g[y1, x1 + 1:x2 - 1].mean(),
                               g[y1 + 1:y2 - 1, x2 - 1].mean(), g[y2 - 1, x1 + 1:x2 - 1].mean()])
            out.append({"boxes": torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), "scores": torch.tensor([0.9]),
                        "labels": torch.tensor([1]), "quality": torch.tensor([0.7]), "variances": var[None]})
        return out


def _sided_object(height=24, width=40):
    """An object at x 5..17, y 3..20 whose border is 0.2 on the left, 0.4 on top, 0.6 right, 0.8 bottom."""
    image = torch.zeros(3, height, width)
    image[:, 3:20, 5:17] = 1.0
    image[:, 4:19, 5] = 0.2
    image[:, 3, 6:16] = 0.4
    image[:, 4:19, 16] = 0.6
    image[:, 19, 6:16] = 0.8
    return image, [5.0, 3.0, 17.0, 20.0], [0.2, 0.4, 0.6, 0.8]


def test_each_pass_maps_boxes_and_per_coordinate_variances_back_to_the_original_sides():
    image, box, var = _sided_object()
    det = _SideDetector()
    passes = tta_candidates(det, [image, image.clone()], "all")
    assert det.calls == 8 and len(passes) == 2 and all(len(p) == 8 for p in passes)
    for name, cands in zip(TRANSFORMS, passes[0]):
        assert cands["boxes"].tolist() == [box], name
        torch.testing.assert_close(cands["variances"], torch.tensor([var]), msg=name)
        assert cands["quality"].tolist() == pytest.approx([0.7])
    # without mapping the variances back, the transforms that move sides would disagree
    raw = _SideDetector().candidates([transform_image(image, "rot90")])[0]["variances"]
    assert not torch.allclose(raw, torch.tensor([var]))


def test_pool_split_and_fuse_the_passes():
    image, box, var = _sided_object()
    passes = tta_candidates(_SideDetector(), [image], "flips")[0]
    pooled = pool_passes(passes)
    assert pooled["tta_pass"].tolist() == [0, 1, 2] and pooled["boxes"].shape == (3, 4)
    back = split_passes(pooled)
    assert [p["boxes"].tolist() for p in back] == [[box]] * 3
    for merge in ("fuse-score", "fuse-quality", "fuse-variance"):
        fused = fuse_passes(pooled, merge, "nms")
        assert fused["boxes"].tolist() == [box] and fused["scores"].tolist() == pytest.approx([0.9])
        assert fused["quality"].tolist() == pytest.approx([0.7])
    # three equal passes fused by inverse variance: the fused variance is a third of each
    torch.testing.assert_close(fuse_passes(passes, "fuse-variance")["variances"], torch.tensor([var]) / 3)
    no_signal = [{k: v for k, v in p.items() if k not in ("quality", "variances")} for p in passes]
    with pytest.raises(ValueError, match="needs 'quality'"):
        fuse_passes(no_signal, "fuse-quality")
    with pytest.raises(ValueError, match="merge must be one of"):
        fuse_passes(passes, "concat")
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    assert fuse_passes([empty, empty])["boxes"].shape == (0, 4)
    assert pool_passes([empty, empty])["tta_pass"].shape == (0,)


def test_wrapper_and_bad_arguments():
    image, box, _ = _sided_object()
    det = _SideDetector()
    assert tta_model(det, "none") is det
    concat = TestTimeAugmentation(det, "all")([image])[0]
    assert concat["boxes"].tolist() == [box] * 8 and sorted(concat["tta_pass"].tolist()) == list(range(8))
    fused = TestTimeAugmentation(det, ["identity", "rot90"], merge="fuse-variance", method="nms")([image])[0]
    assert fused["boxes"].tolist() == [box]
    with pytest.raises(ValueError, match="tta must be one of"):
        check_transforms("rotations")
    with pytest.raises(ValueError, match="transform must be one of"):
        check_transforms(["identity", "rot45"])
    with pytest.raises(ValueError, match="distinct"):
        check_transforms(["hflip", "hflip"])
    with pytest.raises(ValueError, match="merge must be one of"):
        TestTimeAugmentation(det, "flips", merge="wbf")
    with pytest.raises(ValueError, match="boxes must be"):
        inverse_boxes(torch.zeros(3), "hflip", (4, 4))
    with pytest.raises(ValueError, match="size must be"):
        inverse_boxes(torch.zeros(0, 4), "hflip", (4,))


def test_cli_choices_match_the_library():
    from locconf.cli import choices

    assert choices.TTA == tuple(TTA_SETS) and choices.TTA_MERGES == MERGES


class _FixedDetector(torch.nn.Module):
    """Always box [1, 2, 5, 7] with variances [1, 2, 3, 4]; remembers its input."""

    def candidates(self, images):  # the detector protocol: locconf.candidates.candidates_of
        self.seen = images
        return [{"boxes": torch.tensor([[1.0, 2.0, 5.0, 7.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([1]), "variances": torch.tensor([[1.0, 2.0, 3.0, 4.0]])} for _ in images]


def test_hand_computed_flips_and_rotations_of_a_fixed_box():
    image = torch.rand(3, 10, 20)  # H = 10, W = 20
    det = _FixedDetector()
    expected = {  # (box in the original image, its variances), worked out by hand
        "hflip": ([15.0, 2.0, 19.0, 7.0], [3.0, 2.0, 1.0, 4.0]),
        "vflip": ([1.0, 3.0, 5.0, 8.0], [1.0, 4.0, 3.0, 2.0]),
        # rot90: the detector sees a (20, 10) image; its (x, y) is the original's (y, W - x)
        "rot90": ([13.0, 1.0, 18.0, 5.0], [4.0, 1.0, 2.0, 3.0]),
        "transpose": ([2.0, 1.0, 7.0, 5.0], [2.0, 1.0, 4.0, 3.0]),
    }
    for name, (box, var) in expected.items():
        out = tta_candidates(det, [image], [name])[0][0]
        assert torch.equal(det.seen[0], transform_image(image, name))
        assert out["boxes"].tolist() == [box] and out["variances"].tolist() == [var], name


def test_fusing_the_passes_averages_their_boxes_where_pooled_nms_keeps_one(tmp_path):
    """Three passes see one object 2 px to the lower right, 2 px to the upper left and exactly, equally
    scored. Fused by score, the box is their mean, the object itself: AP 1 at every IoU threshold.
    Pooled and NMS'd, the first pass's box survives the tie: IoU 38^2 / (2 * 40^2 - 38^2) = 0.822 with
    the object, so AP is 1 at the thresholds 0.50 ... 0.80 and 0 above: 7 / 10."""
    import json

    from locconf.evaluation import evaluate_methods
    from locconf.tta import evaluate_fused

    gt = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "crown"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600,
                           "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 1, "bbox": [30, 20, 40, 40], "area": 1600,
                           "iscrowd": 0}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    candidates = []
    for image_id, (x, y) in ((1, (10.0, 10.0)), (2, (30.0, 20.0))):
        passes = [{"boxes": torch.tensor([[x + d, y + d, x + 40 + d, y + 40 + d]]), "scores": torch.tensor([0.9]),
                   "labels": torch.tensor([1]), "quality": torch.tensor([0.8])} for d in (2.0, -2.0, 0.0)]
        candidates.append(dict(pool_passes(passes), image_id=image_id))
    fused = evaluate_fused(candidates, str(tmp_path / "gt.json"), ["nms", "quality"], {1: 1}, "fuse-score",
                           per_site=False, progress=False)
    assert fused["nms"]["AP"] == pytest.approx(1.0) and fused["quality"]["AP"] == pytest.approx(1.0)
    pooled = evaluate_methods(candidates, str(tmp_path / "gt.json"), ["nms"], {1: 1}, per_site=False, progress=False)
    assert pooled["nms"]["AP"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="needs 'variances'"):
        evaluate_fused(candidates, str(tmp_path / "gt.json"), ["nms"], {1: 1}, "fuse-variance", progress=False)
