import pytest
import torch

from locconf.data.transforms import (
    ColorJitter,
    Compose,
    RandomHorizontalFlip,
    RandomRot90,
    RandomVerticalFlip,
    Resize,
    build_transforms,
    resize_scale,
)
from locconf.data import transforms as T


def _block_image(h, w, box):
    """Image with a white block exactly covering the integer box (x1, y1, x2, y2), black elsewhere."""
    img = torch.zeros(3, h, w)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = 1.0
    return img, {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([1])}


def _tight_box(img):
    ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_hflip_vflip_known_box():
    img, t = _block_image(6, 10, (1, 2, 4, 5))
    out, t2 = RandomHorizontalFlip(p=1.0)(img, t)
    assert t2["boxes"].tolist() == [[6.0, 2.0, 9.0, 5.0]]
    assert _tight_box(out) == [6, 2, 9, 5]
    out, t3 = RandomVerticalFlip(p=1.0)(img, t)
    assert t3["boxes"].tolist() == [[1.0, 1.0, 4.0, 4.0]]
    assert _tight_box(out) == [1, 1, 4, 4]
    # inputs untouched
    assert t["boxes"].tolist() == [[1.0, 2.0, 4.0, 5.0]]
    assert _tight_box(img) == [1, 2, 4, 5]


def test_flip_probability_zero_is_identity():
    img, t = _block_image(6, 10, (1, 2, 4, 5))
    for tr in (RandomHorizontalFlip(p=0.0), RandomVerticalFlip(p=0.0), RandomRot90(p=0.0)):
        out, t2 = tr(img, t)
        assert torch.equal(out, img) and torch.equal(t2["boxes"], t["boxes"])


def test_rot90_hand_computed():
    # W=10, H=8; one counter-clockwise quarter turn: (x, y) -> (y, W - x)
    img, t = _block_image(8, 10, (1, 2, 7, 5))
    out, t2 = T.rot90(img, t, 1)
    assert out.shape == (3, 10, 8)
    assert t2["boxes"].tolist() == [[2.0, 3.0, 5.0, 9.0]]
    # a single marked pixel at row 0, col W-1 (top right) goes to the top left
    img = torch.zeros(3, 8, 10)
    img[:, 0, 9] = 1.0
    out, _ = T.rot90(img, {"boxes": torch.zeros(0, 4)}, 1)
    assert out[0, 0, 0] == 1.0 and out.sum() == 3.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_box_bounds_rotated_block(k):
    img, t = _block_image(9, 13, (2, 1, 7, 4))
    out, t2 = T.rot90(img, t, k)
    assert t2["boxes"][0].tolist() == _tight_box(out)


def test_rot90_four_times_is_identity():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 7, 11, generator=g)
    boxes = torch.tensor([[0.5, 1.25, 3.0, 6.5], [2.0, 0.0, 11.0, 7.0]])
    out, t = img, {"boxes": boxes}
    for _ in range(4):
        out, t = T.rot90(out, t, 1)
    assert torch.equal(out, img)
    assert torch.allclose(t["boxes"], boxes)
    out2, t2 = T.rot90(img, {"boxes": boxes}, 4)
    assert torch.equal(out2, img) and torch.equal(t2["boxes"], boxes)


def test_random_geometric_pipeline_keeps_box_tight():
    """Any sequence of flips and quarter turns keeps the box exactly on the block."""
    pipe = Compose([RandomHorizontalFlip(0.5), RandomVerticalFlip(0.5), RandomRot90(0.75)])
    img, t = _block_image(12, 17, (3, 2, 9, 5))
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out, t2 = pipe(img, t)
        assert t2["boxes"][0].tolist() == _tight_box(out)
        seen.add((tuple(out.shape), tuple(t2["boxes"][0].tolist())))
    assert len(seen) == 8  # all eight symmetries of the rectangle occur


def test_rot90_uses_all_orientations_and_generator():
    img, t = _block_image(4, 6, (0, 0, 1, 1))  # marked top-left pixel
    corners = set()
    g = torch.Generator().manual_seed(0)
    tr = RandomRot90(generator=g)
    for _ in range(60):
        out, _ = tr(img, t)
        corners.add(tuple(_tight_box(out)[:2]))
    assert len(corners) == 4
    # the same generator seed gives the same sequence of orientations
    def orientations(seed):
        tr = RandomRot90(generator=torch.Generator().manual_seed(seed))
        return [tuple(_tight_box(tr(img, t)[0])) for _ in range(10)]

    assert orientations(5) == orientations(5)
    assert orientations(5) != orientations(6)


def test_global_seed_reproducible():
    pipe = build_transforms(train=True, min_size=32, max_size=64)
    img = torch.rand(3, 20, 30)
    t = {"boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0]]), "area": torch.tensor([90.0])}
    torch.manual_seed(123)
    o1, t1 = pipe(img, t)
    torch.manual_seed(123)
    o2, t2 = pipe(img, t)
    assert torch.equal(o1, o2) and torch.equal(t1["boxes"], t2["boxes"])


def test_resize_rule():
    assert resize_scale(400, 600, 800, 1333) == 2.0
    assert resize_scale(400, 1000, 800, 1333) == pytest.approx(1.333)
    img = torch.rand(3, 400, 600)
    t = {"boxes": torch.tensor([[10.0, 20.0, 110.0, 70.0]]), "area": torch.tensor([5000.0])}
    out, t2 = Resize(800, 1333)(img, t)
    assert out.shape == (3, 800, 1200)
    assert t2["boxes"].tolist() == [[20.0, 40.0, 220.0, 140.0]]
    assert t2["area"].item() == pytest.approx(20000.0)
    # long side limited: 400x1000 -> 533x1333
    out, t3 = Resize(800, 1333)(torch.rand(3, 400, 1000), t)
    assert out.shape == (3, 533, 1333)
    assert t3["boxes"][0, 2].item() == pytest.approx(110 * 1333 / 1000)
    assert t3["boxes"][0, 3].item() == pytest.approx(70 * 533 / 400)
    # downscale keeps values in range
    out, _ = Resize(100, 1000)(torch.rand(3, 400, 600), t)
    assert out.shape == (3, 100, 150) and out.min() >= 0 and out.max() <= 1


def test_resize_multiscale_choice():
    tr = Resize((10, 20), 100, generator=torch.Generator().manual_seed(0))
    sizes = {tr(torch.rand(3, 5, 5), {"boxes": torch.zeros(0, 4)})[0].shape[-1] for _ in range(30)}
    assert sizes == {10, 20}


def test_color_jitter():
    img = torch.rand(3, 16, 16)
    t = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]])}
    torch.manual_seed(0)
    out, t2 = ColorJitter(0.5, 0.5, 0.5)(img, t)
    assert not torch.equal(out, img)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(t2["boxes"], t["boxes"])
    # zero strength is the identity; saturation leaves a grey image grey
    assert torch.equal(ColorJitter(0, 0, 0)(img, t)[0], img)
    grey = torch.full((3, 4, 4), 0.4)
    out, _ = ColorJitter(0, 0, 0.9)(grey, t)
    assert torch.allclose(out, grey, atol=1e-6)
    # brightness factor scales
    torch.manual_seed(1)
    out, _ = ColorJitter(0.5, 0, 0)(grey, t)
    f = out[0, 0, 0] / 0.4
    assert 0.5 <= f <= 1.5 and torch.allclose(out, grey * f)


def test_build_transforms_structure():
    tr = build_transforms(train=True, min_size=400, max_size=666)
    kinds = [type(t).__name__ for t in tr.transforms]
    assert kinds == ["RandomHorizontalFlip", "RandomVerticalFlip", "RandomRot90", "ColorJitter", "Resize"]
    ev = build_transforms(train=False, min_size=400, max_size=666)
    assert [type(t).__name__ for t in ev.transforms] == ["Resize"]
    assert build_transforms(train=True, flips=False, rot90=False, jitter=False).transforms == []


def test_horizontal_only_flips():
    """vertical_flip=False: half the draws mirror left-right, none moves a box vertically."""
    tr = build_transforms(train=True, rot90=False, jitter=False, vertical_flip=False)
    assert [type(t).__name__ for t in tr.transforms] == ["RandomHorizontalFlip"]
    img, t = _block_image(20, 30, (2, 3, 10, 15))
    torch.manual_seed(0)
    outs = [tr(img, t)[1]["boxes"][0].tolist() for _ in range(200)]
    assert all(b[1] == 3 and b[3] == 15 for b in outs)
    flipped = sum(b == [20.0, 3.0, 28.0, 15.0] for b in outs)
    assert flipped + sum(b == [2.0, 3.0, 10.0, 15.0] for b in outs) == 200 and 70 < flipped < 130
    # the default keeps both flips
    assert [type(t).__name__ for t in build_transforms(train=True, rot90=False, jitter=False).transforms] == [
        "RandomHorizontalFlip", "RandomVerticalFlip"]
    with pytest.raises(ValueError, match="vertical_flip"):
        build_transforms(train=True, vertical_flip="no")


def test_empty_boxes_pass_through():
    img = torch.rand(3, 10, 20)
    t = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    torch.manual_seed(0)
    out, t2 = build_transforms(True, 20, 40)(img, t)
    assert t2["boxes"].shape == (0, 4)


def test_bad_inputs():
    t = {"boxes": torch.zeros(0, 4)}
    with pytest.raises(ValueError, match="image"):
        RandomHorizontalFlip(1.0)(torch.rand(10, 10), t)
    with pytest.raises(ValueError, match="boxes"):
        RandomHorizontalFlip(1.0)(torch.rand(3, 10, 10), {"boxes": torch.zeros(4)})
    with pytest.raises(ValueError, match="p must"):
        RandomVerticalFlip(1.5)
    with pytest.raises(ValueError, match="min_size"):
        Resize(0, 10)
    with pytest.raises(ValueError, match="brightness"):
        ColorJitter(brightness=2.0)


# -- RandomScaleJitter -------------------------------------------------------------------------


def _fixed_scale(s, **kw):
    return T.RandomScaleJitter((s, s), **kw)


def test_scale_jitter_zoom_in_follows_content():
    img, t = _block_image(40, 40, (10, 12, 20, 26))
    t["area"] = torch.tensor([140.0])
    t["iscrowd"] = torch.tensor([0])
    for seed in range(5):
        out, t2 = _fixed_scale(1.5, generator=torch.Generator().manual_seed(seed))(img, t)
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
        if t2["boxes"].shape[0] == 0:
            continue
        box = t2["boxes"][0].tolist()
        # the white block is where the box says (bilinear edges: +-1 px), unless clipped
        tight = _tight_box(out)
        assert all(abs(a - b) <= 1 for a, b in zip(box, tight))
        full = 15.0 * 21.0
        visible = (box[2] - box[0]) * (box[3] - box[1]) / full
        assert t2["area"].item() == pytest.approx(140.0 * 2.25 * visible, rel=1e-5)
        assert t2["labels"].tolist() == [1] and t2["iscrowd"].tolist() == [0]
    # inputs untouched
    assert t["boxes"].tolist() == [[10.0, 12.0, 20.0, 26.0]] and _tight_box(img) == [10, 12, 20, 26]


def test_scale_jitter_zoom_out_pads_with_mean_colour():
    img, t = _block_image(40, 40, (10, 10, 30, 30))
    out, t2 = _fixed_scale(0.5, generator=torch.Generator().manual_seed(3))(img, t)
    assert out.shape == img.shape
    box = t2["boxes"][0].tolist()
    assert box[2] - box[0] == pytest.approx(10.0) and box[3] - box[1] == pytest.approx(10.0)
    assert all(abs(a - b) <= 1 for a, b in zip(box, _tight_box(out)))
    # the canvas outside the pasted 20x20 image holds the input's mean colour (0.25)
    mean = img.mean().item()
    assert (out == mean).sum() >= 3 * (40 * 40 - 20 * 20)


def test_scale_jitter_drops_mostly_cut_boxes_with_their_entries():
    img = torch.rand(3, 100, 100)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 60.0, 60.0], [90.0, 90.0, 100.0, 100.0]])
    t = {"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "area": torch.tensor([100.0, 400.0, 100.0]),
         "iscrowd": torch.tensor([0, 0, 1]), "image_id": 7}
    # zoom x2 (200 x 200) and a random 100 x 100 window: entries stay with their boxes
    counts, seen = set(), set()
    for seed in range(30):
        _, t2 = _fixed_scale(2.0, generator=torch.Generator().manual_seed(seed))(img, t)
        n = t2["boxes"].shape[0]
        assert t2["labels"].shape[0] == n and t2["area"].shape[0] == n and t2["iscrowd"].shape[0] == n
        assert t2["image_id"] == 7
        b = t2["boxes"]
        assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 100).all() and (b[:, 2:] > b[:, :2]).all()
        for box, label, crowd in zip(b.tolist(), t2["labels"].tolist(), t2["iscrowd"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            assert w * h >= 0.5 * 400 * (4 if label == 2 else 1) - 1e-6  # kept: >= half visible
            if label == 1:
                assert box[:2] == [0.0, 0.0] and crowd == 0
            if label == 3:
                assert box[2:] == [100.0, 100.0] and crowd == 1
        counts.add(n)
        seen.update(t2["labels"].tolist())
    assert min(counts) == 0 and len(seen) >= 2  # some windows drop every box, others keep some


def test_scale_jitter_identity_reproducible_and_checks():
    img = torch.rand(3, 30, 30)
    t = {"boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0]])}
    out, t2 = _fixed_scale(1.0)(img, t)
    assert torch.equal(out, img) and torch.equal(t2["boxes"], t["boxes"])
    out, t2 = T.RandomScaleJitter((0.5, 2.0), p=0.0)(img, t)
    assert out is img
    a = T.RandomScaleJitter((0.5, 2.0), generator=torch.Generator().manual_seed(9))
    b = T.RandomScaleJitter((0.5, 2.0), generator=torch.Generator().manual_seed(9))
    for _ in range(5):
        (oa, ta), (ob, tb) = a(img, t), b(img, t)
        assert torch.equal(oa, ob) and torch.equal(ta["boxes"], tb["boxes"])
    # factors are drawn from [lo, hi]: the box width scales by s
    tr = T.RandomScaleJitter((0.5, 2.0), min_visible=1e-6, generator=torch.Generator().manual_seed(1))
    box = {"boxes": torch.tensor([[10.0, 10.0, 12.0, 12.0]])}
    sizes = [tr(img, box)[1]["boxes"] for _ in range(30)]
    widths = [(b[0, 2] - b[0, 0]).item() for b in sizes if len(b) and 0 < b[0, 0] and b[0, 2] < 30]
    assert len(set(round(w, 3) for w in widths)) > 1
    assert all(2 * 0.5 - 0.1 <= w <= 2 * 2.0 + 0.1 for w in widths)
    with pytest.raises(ValueError, match="scale"):
        T.RandomScaleJitter((1.5, 1.0))
    with pytest.raises(ValueError, match="scale"):
        T.RandomScaleJitter((0.0, 1.0))
    with pytest.raises(ValueError, match="min_visible"):
        T.RandomScaleJitter(min_visible=0.0)


def test_build_transforms_scale_jitter_and_strength_options():
    tr = build_transforms(train=True, scale_jitter=(0.8, 1.25), jitter_strength=0.4)
    kinds = [type(t).__name__ for t in tr.transforms]
    assert kinds == ["RandomHorizontalFlip", "RandomVerticalFlip", "RandomRot90", "RandomScaleJitter", "ColorJitter"]
    assert tr.transforms[3].scale == (0.8, 1.25)
    cj = tr.transforms[4]
    assert (cj.brightness, cj.contrast, cj.saturation) == (0.4, 0.4, 0.4)
    # defaults unchanged; eval pipelines never jitter
    assert "RandomScaleJitter" not in repr(build_transforms(train=True))
    assert build_transforms(train=False, scale_jitter=(0.5, 2.0)).transforms == []
