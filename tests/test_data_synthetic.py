import numpy as np
import pytest
import torch

from locconf.data import CocoDetection, SyntheticScenes, write_synthetic_coco
from locconf.data.transforms import RandomHorizontalFlip


def _same(a, b):
    (ia, ta), (ib, tb) = a, b
    return torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])


def test_output_form():
    ds = SyntheticScenes(4, image_size=(96, 128), num_classes=3, seed=0, min_size=12, max_size=40)
    img, t = ds[0]
    assert img.shape == (3, 96, 128) and img.dtype == torch.float32
    assert 0 <= img.min() and img.max() <= 1
    n = len(t["boxes"])
    assert t["boxes"].shape == (n, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (n,) and t["labels"].dtype == torch.int64
    assert t["iscrowd"].tolist() == [0] * n and t["image_id"] == 1
    b = t["boxes"]
    assert torch.allclose(t["area"], (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))


def test_deterministic_and_order_independent():
    ds = SyntheticScenes(10, image_size=64, seed=7, min_size=8, max_size=32)
    forward = [ds[i] for i in range(10)]
    backward = [SyntheticScenes(10, image_size=64, seed=7, min_size=8, max_size=32)[i] for i in reversed(range(10))]
    assert all(_same(a, b) for a, b in zip(forward, reversed(backward)))
    assert _same(ds[3], ds[-7])
    other = SyntheticScenes(10, image_size=64, seed=8, min_size=8, max_size=32)
    assert not torch.equal(ds[3][0], other[3][0])
    assert not torch.equal(ds[3][0], ds[4][0])


def test_boxes_are_tight_on_visible_masks():
    ds = SyntheticScenes(20, image_size=80, num_classes=4, min_objects=3, max_objects=8, min_size=10, max_size=40, seed=1)
    for i in range(len(ds)):
        _, t = ds.scene(i, return_masks=True)
        masks = t["masks"]
        assert masks.shape[0] == len(t["boxes"])
        assert int(masks.sum(0).max()) <= 1  # visible masks are disjoint
        for box, m in zip(t["boxes"].tolist(), masks):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_visible_masks_are_exactly_the_drawn_pixels():
    """Independent check: the same seed with no objects renders the same background and clutter,
    so the pixels that objects changed must be exactly the union of the visible masks."""
    kw = dict(image_size=72, num_classes=3, min_size=10, max_size=36, seed=3, clutter=3)
    with_objects = SyntheticScenes(8, min_objects=1, max_objects=6, **kw)
    background = SyntheticScenes(8, min_objects=0, max_objects=0, **kw)
    for i in range(8):
        img, t = with_objects.scene(i, return_masks=True)
        bg, bt = background.scene(i)
        assert bt["boxes"].shape == (0, 4)
        changed = (img != bg).any(0)
        assert torch.equal(changed, t["masks"].any(0))


def test_labels_sizes_counts():
    ds = SyntheticScenes(30, image_size=128, num_classes=5, min_objects=2, max_objects=6, min_size=16, max_size=48, seed=2)
    labels, counts = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        b = t["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 128).all() and (b[:, 3] <= 128).all()
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        labels += t["labels"].tolist()
        counts.append(len(b))
    assert set(labels) == {1, 2, 3, 4, 5}
    assert max(counts) <= 6 and np.mean(counts) >= 3
    assert ds.class_names[:4] == ["__background__", "rectangle_1", "ellipse_2", "triangle_3"]


def test_empty_scenes_and_transforms():
    img, t = SyntheticScenes(2, image_size=32, min_objects=0, max_objects=0, min_size=8, max_size=16)[1]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    plain = SyntheticScenes(2, image_size=32, min_size=8, max_size=16)
    flipped = SyntheticScenes(2, image_size=32, min_size=8, max_size=16, transforms=RandomHorizontalFlip(1.0))
    (a, ta), (b, tb) = plain[0], flipped[0]
    assert torch.equal(b, a.flip(-1))
    assert torch.equal(tb["boxes"][:, [2, 0]], 32 - ta["boxes"][:, [0, 2]])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_images=-1), "num_images"),
        (dict(num_images=1, image_size=4), "image_size"),
        (dict(num_images=1, num_classes=0), "num_classes"),
        (dict(num_images=1, min_objects=3, max_objects=2), "min_objects"),
        (dict(num_images=1, min_size=2), "min_size"),
        (dict(num_images=1, image_size=32, max_size=64), "max_size"),
        (dict(num_images=1, min_visible=0), "min_visible"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticScenes(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        SyntheticScenes(3, image_size=32, min_size=8, max_size=16)[3]


def test_write_coco_round_trip_and_eval(tmp_path):
    ds = SyntheticScenes(6, image_size=(64, 80), num_classes=3, min_size=10, max_size=30, seed=4)
    path = write_synthetic_coco(ds, tmp_path, split="val", progress=False)
    assert path == tmp_path / "val.json"
    coco = CocoDetection(tmp_path, path)
    assert len(coco) == 6 and coco.num_classes == 3
    assert coco.label_to_cat_id == {1: 1, 2: 2, 3: 3}
    assert coco.class_names == ds.class_names
    for i in range(6):
        img, t = coco[i]
        ref_img, ref = ds[i]
        assert torch.equal(t["boxes"], ref["boxes"]) and torch.equal(t["labels"], ref["labels"])
        assert t["image_id"] == ref["image_id"]
        assert (img - ref_img).abs().max() <= 0.5 / 255 + 1e-6  # PNG quantisation only

    # ground truth used as detections scores AP 1 with the COCO tools
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO(str(path))
    dets = []
    for i in range(6):
        t = coco.target(i)
        for b, lab in zip(t["boxes"].tolist(), coco.category_ids(t["labels"]).tolist()):
            dets.append({"image_id": t["image_id"], "category_id": lab, "score": 1.0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    ev = COCOeval_faster(gt, gt.loadRes(dets), "bbox", print_function=lambda *a: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
