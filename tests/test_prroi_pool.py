"""Tests of Precise RoI Pooling against independent references (dense numerical integration,
hand-derived closed forms, finite differences) and against torchvision's FPN level mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops.poolers import _setup_scales

from locconf.prroi_pool import MultiScalePrRoIPool, PrRoIPool2d, map_levels, prroi_pool

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ----------------------------------------------------------------------------------------------
# independent reference: midpoint rule on the bilinear interpolant, float64 numpy
# ----------------------------------------------------------------------------------------------
def bilinear(fmap: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of (C, H, W) at points x, y (any shape); pixels at integer
    coordinates, zero outside the map. Returns (C, *x.shape)."""
    c, h, w = fmap.shape
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    u, v = x - x0, y - y0
    out = np.zeros((c,) + x.shape)
    for dy, wy in ((0, 1 - v), (1, v)):
        for dx, wx in ((0, 1 - u), (1, u)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            vals = fmap[:, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)] * inside
            out += vals * (wy * wx)
    return out


def reference_pool(fmap: np.ndarray, box, output_size, spatial_scale=1.0, n: int = 160) -> np.ndarray:
    """(C, oh, ow): mean of the interpolant over each bin, n x n midpoint samples per bin."""
    oh, ow = output_size
    x1, y1, x2, y2 = (float(v) * spatial_scale for v in box)
    bw, bh = (x2 - x1) / ow, (y2 - y1) / oh
    out = np.zeros((fmap.shape[0], oh, ow))
    if bw <= 0 or bh <= 0:
        return out
    t = (np.arange(n) + 0.5) / n
    for p in range(oh):
        for q in range(ow):
            xx, yy = np.meshgrid(x1 + bw * (q + t), y1 + bh * (p + t))
            out[:, p, q] = bilinear(fmap, xx, yy).mean(axis=(1, 2))
    return out


CASES = [  # (box, output_size, spatial_scale) on an 8 x 9 map
    ((1.3, 0.7, 6.2, 5.9), (2, 2), 1.0),  # inside
    ((-2.6, -1.2, 3.3, 4.4), (3, 2), 1.0),  # straddles the top-left border
    ((5.5, 4.2, 11.7, 10.1), (2, 3), 1.0),  # straddles the bottom-right border
    ((-9.0, -7.0, -1.5, -1.2), (2, 2), 1.0),  # entirely outside (zero)
    ((-0.8, 6.6, 0.4, 7.9), (1, 1), 1.0),  # in the fading border strip
    ((3.21, 2.37, 3.26, 2.41), (2, 2), 1.0),  # tiny
    ((-40.0, -30.0, 55.0, 47.0), (4, 3), 1.0),  # huge
    ((4.6, 2.8, 22.1, 13.4), (3, 3), 0.5),  # spatial scale
    ((10.0, 9.0, 29.0, 27.0), (2, 1), 0.25),
    ((0.37, 1.5, 3.9, 4.0), (5, 4), 2.0),
]


@pytest.mark.parametrize("box,output_size,scale", CASES)
def test_matches_dense_integration(box, output_size, scale):
    torch.manual_seed(0)
    fmap = torch.randn(1, 3, 8, 9, dtype=torch.float64)
    rois = torch.tensor([[0.0, *box]], dtype=torch.float64)
    out = prroi_pool(fmap, rois, output_size, spatial_scale=scale)
    ref = reference_pool(fmap[0].numpy(), box, output_size, scale)
    assert out.shape == (1, 3, *output_size)
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-4, rtol=0)


def test_float32_tiny_bins_on_large_structured_map():
    """Sub-pixel bins far from the origin of a large map with a strong ramp (where prefix sums
    are large) must stay accurate in float32."""
    torch.manual_seed(1)
    h = w = 120
    ramp = torch.linspace(0, 50, h)[:, None] + torch.linspace(0, 30, w)[None, :]
    fmap = (torch.rand(1, 2, h, w) + ramp).to(torch.float32)
    boxes = [(100.3, 110.1, 100.6, 110.35), (57.2, 80.9, 57.9, 81.3), (3.3, 4.4, 90.1, 101.7)]
    rois = torch.tensor([[0.0, *b] for b in boxes])
    out = prroi_pool(fmap, rois, 3)
    for i, box in enumerate(boxes):
        ref = reference_pool(fmap[0].double().numpy(), box, (3, 3))
        np.testing.assert_allclose(out[i].double().numpy(), ref, rtol=1e-6, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# hand-derived closed forms
# ----------------------------------------------------------------------------------------------
def test_unit_cell_is_mean_of_corners():
    fmap = torch.tensor([[[[1.0, 2.0], [3.0, 7.0]]]], dtype=torch.float64)
    out = prroi_pool(fmap, torch.tensor([[0, 0.0, 0.0, 1.0, 1.0]], dtype=torch.float64), 1)
    assert out.item() == pytest.approx((1 + 2 + 3 + 7) / 4, abs=1e-12)


def test_integer_grid_cells_are_means_of_corners():
    torch.manual_seed(2)
    fmap = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    h, w = 5, 6
    rois = torch.tensor([[1, 0.0, 0.0, w - 1.0, h - 1.0]], dtype=torch.float64)
    out = prroi_pool(fmap, rois, (h - 1, w - 1))[0]
    f = fmap[1]
    expected = (f[:, :-1, :-1] + f[:, 1:, :-1] + f[:, :-1, 1:] + f[:, 1:, 1:]) / 4
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_centred_cells_are_1_6_1_filter():
    """Over [j-1/2, j+1/2] the hat of pixel j integrates to 3/4 and each neighbour's to 1/8, so
    unit cells centred on the pixels give the separable filter (1/8, 3/4, 1/8), zero padded."""
    torch.manual_seed(3)
    fmap = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    rois = torch.tensor([[0, -0.5, -0.5, 4.5, 3.5]], dtype=torch.float64)
    out = prroi_pool(fmap, rois, (4, 5))[0]
    k = torch.tensor([1 / 8, 3 / 4, 1 / 8], dtype=torch.float64)
    kernel = (k[:, None] * k[None, :]).expand(2, 1, 3, 3)
    expected = torch.nn.functional.conv2d(fmap, kernel, padding=1, groups=2)[0]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_single_pixel_pyramid_and_border():
    """A 1 x 1 map of value a is the pyramid a * hat(x) * hat(y): volume a over [-1, 1]^2;
    over [0, 1]^2 the integral is a/4; beyond the fading strip it is zero."""
    fmap = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    rois = torch.tensor([[0, -1.0, -1.0, 1.0, 1.0], [0, 0.0, 0.0, 1.0, 1.0], [0, 1.0, -3.0, 4.0, 3.0]],
                        dtype=torch.float64)
    out = prroi_pool(fmap, rois, 1).flatten()
    torch.testing.assert_close(out, torch.tensor([2.0 / 4, 2.0 / 4, 0.0], dtype=torch.float64))


def test_spatial_scale_hand_case():
    fmap = torch.tensor([[[[1.0, 2.0], [3.0, 7.0]]]], dtype=torch.float64)
    rois = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)
    assert prroi_pool(fmap, rois, 1, spatial_scale=0.25).item() == pytest.approx(13 / 4, abs=1e-12)


def test_zero_area_bin_gives_zero_without_nan_grad():
    fmap = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    coords = torch.tensor([[1.0, 1.0, 1.0, 3.0], [0.5, 2.0, 2.5, 2.0]], dtype=torch.float64, requires_grad=True)
    rois = torch.cat([torch.zeros(2, 1, dtype=torch.float64), coords], 1)
    out = prroi_pool(fmap, rois, 2)
    assert torch.all(out == 0)
    out.sum().backward()
    assert torch.isfinite(coords.grad).all() and torch.isfinite(fmap.grad).all()


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
def _rois(coords, bidx):
    return torch.cat([bidx[:, None].to(coords.dtype), coords], 1)


def test_gradcheck_features_and_boxes():
    torch.manual_seed(4)
    fmap = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    coords = torch.tensor([[0.3, 0.6, 3.7, 4.2], [-1.4, 1.25, 2.1, 5.6], [2.2, -0.7, 6.6, 2.9],
                           [1.05, 1.1, 1.6, 1.95]], dtype=torch.float64, requires_grad=True)
    bidx = torch.tensor([0, 1, 1, 0])
    assert torch.autograd.gradcheck(lambda f, c: prroi_pool(f, _rois(c, bidx), (2, 3), 0.9), (fmap, coords))


def test_gradcheck_boxes_only_and_gradgrad_free_path():
    torch.manual_seed(5)
    fmap = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    coords = torch.tensor([[1.3, 2.2, 5.1, 6.4], [-0.5, -0.5, 7.5, 7.5]], dtype=torch.float64, requires_grad=True)
    bidx = torch.zeros(2, dtype=torch.long)
    assert torch.autograd.gradcheck(lambda c: prroi_pool(fmap, _rois(c, bidx), 3), (coords,))


def test_box_gradient_matches_reference_finite_difference():
    """The coordinate gradient agrees with central differences of the *dense reference*."""
    torch.manual_seed(6)
    fmap = torch.randn(1, 1, 6, 6, dtype=torch.float64)
    box = [1.3, 0.8, 4.1, 4.6]
    coords = torch.tensor([box], dtype=torch.float64, requires_grad=True)
    prroi_pool(fmap, _rois(coords, torch.zeros(1)), 1).sum().backward()
    eps = 1e-3
    for i in range(4):
        up, dn = list(box), list(box)
        up[i] += eps
        dn[i] -= eps
        fd = (reference_pool(fmap[0].numpy(), up, (1, 1), n=400) - reference_pool(fmap[0].numpy(), dn, (1, 1), n=400))
        assert coords.grad[0, i].item() == pytest.approx(fd.sum() / (2 * eps), abs=2e-3)


# ----------------------------------------------------------------------------------------------
# input forms, batches, modules
# ----------------------------------------------------------------------------------------------
def test_list_input_equals_k5_input_and_batches():
    torch.manual_seed(7)
    fmap = torch.randn(3, 4, 10, 12)
    b0 = torch.tensor([[1.0, 2.0, 8.0, 7.5], [0.0, 0.0, 3.0, 3.0]])
    b1 = torch.zeros(0, 4)
    b2 = torch.tensor([[4.5, 1.5, 11.0, 9.0]])
    out_list = prroi_pool(fmap, [b0, b1, b2], 3)
    rois = torch.cat([torch.cat([torch.zeros(2, 1), b0], 1), torch.cat([torch.full((1, 1), 2.0), b2], 1)])
    out_k5 = prroi_pool(fmap, rois, 3)
    torch.testing.assert_close(out_list, out_k5)
    # each box uses its own image only
    torch.testing.assert_close(out_k5[2:], prroi_pool(fmap[2:], torch.cat([torch.zeros(1, 1), b2], 1), 3))
    ref = reference_pool(fmap[2].double().numpy(), b2[0].tolist(), (3, 3))
    np.testing.assert_allclose(out_k5[2].double().numpy(), ref, atol=1e-4)
    assert out_k5.is_contiguous() and out_k5.dtype == torch.float32


def test_module_and_chunking(monkeypatch):
    import locconf.prroi_pool._integral as mod

    torch.manual_seed(8)
    fmap = torch.randn(2, 3, 16, 16, requires_grad=True)
    xy = torch.rand(40, 2) * 12
    rois = torch.cat([torch.randint(0, 2, (40, 1)).float(), xy, xy + torch.rand(40, 2) * 6 + 0.5], 1)
    full = PrRoIPool2d(4, 1.0)(fmap, rois)
    (g_full,) = torch.autograd.grad(full.square().sum(), fmap)
    monkeypatch.setattr(mod, "_CHUNK_BYTES", 1)  # one box per chunk
    chunked = PrRoIPool2d((4, 4))(fmap, rois)
    (g_chunk,) = torch.autograd.grad(chunked.square().sum(), fmap)
    torch.testing.assert_close(full, chunked)
    torch.testing.assert_close(g_full, g_chunk)


def test_multiscale_levels_match_torchvision():
    torch.manual_seed(9)
    image_shapes = [(800, 800), (640, 736)]
    x = {f"p{k}": torch.randn(2, 2, 800 // 2**k, 800 // 2**k) for k in (2, 3, 4, 5)}
    sizes = torch.cat([torch.tensor([8.0, 16, 55.9, 56.0, 111.9, 112.0, 223.9, 224.0, 448.0, 447.9, 600, 790]),
                       torch.rand(100) * 780 + 4])
    ctr = torch.rand(len(sizes), 2) * 400 + 200
    aspect = torch.rand(len(sizes)) + 0.5
    half = torch.stack([sizes * aspect, sizes / aspect], 1) / 2
    boxes_all = torch.cat([ctr - half, ctr + half], 1)
    boxes = [boxes_all[:60], boxes_all[60:]]
    pooler = MultiScalePrRoIPool(["p2", "p3", "p4", "p5"], 7, 2)
    scales, levels = pooler.levels(x, boxes, image_shapes)
    tv_scales, tv_mapper = _setup_scales(list(x.values()), image_shapes, 224, 4)
    assert scales == tv_scales
    tv_levels = tv_mapper(boxes)
    assert torch.equal(levels, tv_levels)
    assert set(tv_levels.tolist()) == {0, 1, 2, 3}

    # each box is pooled from its level at that level's scale
    out = pooler(x, boxes, image_shapes)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    names = list(x)
    for lvl in range(4):
        sel = tv_levels == lvl
        expected = prroi_pool(x[names[lvl]], rois[sel], 7, spatial_scale=tv_scales[lvl])
        torch.testing.assert_close(out[sel], expected, atol=1e-5, rtol=1e-5)


def test_map_levels_canonical():
    b = torch.tensor([[0.0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 111, 111], [0, 0, 2000, 2000], [0, 0, 1, 1]])
    assert map_levels(b, 2, 5).tolist() == [2, 1, 0, 3, 0]


# ----------------------------------------------------------------------------------------------
# validation and empty input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rois,match", [
    (torch.tensor([[0, 3.0, 1.0, 2.0, 4.0]]), "rois.*x2 < x1"),
    (torch.tensor([[0, 1.0, 1.0, 2.0, float("nan")]]), "rois.*NaN"),
    (torch.tensor([[2, 1.0, 1.0, 2.0, 2.0]]), "rois.*batch index"),
    (torch.tensor([[-1, 1.0, 1.0, 2.0, 2.0]]), "rois.*batch index"),
    (torch.tensor([[0.6, 1.0, 1.0, 2.0, 2.0]]), "rois.*non-integral batch index"),  # torchvision truncates, round pooled 1
    (torch.tensor([[0.0, 1.0, 1.0, 2.0, 2.0], [1.5, 1.0, 1.0, 2.0, 2.0]]), "rois.*non-integral batch index"),
    (torch.zeros(3, 4), "rois.*\\(K, 5\\)"),
    ([torch.zeros(2, 5)], "rois\\[0\\].*\\(K_i, 4\\)"),
])
def test_validation_errors(rois, match):
    with pytest.raises(ValueError, match=match):
        prroi_pool(torch.zeros(2, 1, 4, 4), rois, 2)


def test_validation_other_arguments():
    rois = torch.tensor([[0, 1.0, 1.0, 2.0, 2.0]])
    with pytest.raises(ValueError, match="features"):
        prroi_pool(torch.zeros(1, 4, 4), rois, 2)
    with pytest.raises(ValueError, match="output_size"):
        prroi_pool(torch.zeros(1, 1, 4, 4), rois, 0)
    with pytest.raises(ValueError, match="spatial_scale"):
        prroi_pool(torch.zeros(1, 1, 4, 4), rois, 2, spatial_scale=-1.0)
    with pytest.raises(ValueError, match="image_shapes"):
        MultiScalePrRoIPool(["a"], 2)({"a": torch.zeros(1, 1, 4, 4)}, [torch.zeros(1, 4)], [])
    with pytest.raises(ValueError, match="boxes.*x2 < x1"):
        MultiScalePrRoIPool(["a"], 2)({"a": torch.zeros(1, 1, 4, 4)}, [torch.tensor([[3.0, 0, 1, 1]])], [(16, 16)])


@pytest.mark.parametrize("output_size", [True, 2.5, (2, 2.0), (2, True), "2", (2, 2, 2), (0, 2)])
def test_output_size_must_be_positive_ints(output_size):
    """A bool is an int to Python (True pooled 1x1) and 2.5 failed with "'float' object is not iterable"."""
    with pytest.raises(ValueError, match="output_size"):
        prroi_pool(torch.zeros(1, 1, 4, 4), torch.tensor([[0, 1.0, 1.0, 2.0, 2.0]]), output_size)
    with pytest.raises(ValueError, match="output_size"):
        PrRoIPool2d(output_size)
    with pytest.raises(ValueError, match="output_size"):
        MultiScalePrRoIPool(["a"], output_size)


@pytest.mark.parametrize("scale", [True, float("nan"), float("inf"), 0.0, "0.25"])
def test_spatial_scale_must_be_a_positive_number(scale):
    with pytest.raises(ValueError, match="spatial_scale"):
        prroi_pool(torch.zeros(1, 1, 4, 4), torch.tensor([[0, 1.0, 1.0, 2.0, 2.0]]), 2, spatial_scale=scale)
    with pytest.raises(ValueError, match="spatial_scale"):
        PrRoIPool2d(2, spatial_scale=scale)


def test_multiscale_sampling_and_level_arguments():
    for kw, match in [(dict(sampling_ratio=True), "sampling_ratio"), (dict(sampling_ratio=2.0), "sampling_ratio"),
                      (dict(canonical_scale=True), "canonical_scale"), (dict(canonical_level=4.5), "canonical_level")]:
        with pytest.raises(ValueError, match=match):
            MultiScalePrRoIPool(["a"], 2, **kw)
    assert MultiScalePrRoIPool(["a"], (2, 3), sampling_ratio=2).output_size == (2, 3)  # ints still accepted


def test_meta_tensors_are_named():
    rois = torch.tensor([[0, 1.0, 1.0, 2.0, 2.0]])
    with pytest.raises(ValueError, match="features is on the meta device"):
        prroi_pool(torch.zeros(1, 1, 4, 4, device="meta"), rois, 2)
    with pytest.raises(ValueError, match="rois is on the meta device"):
        prroi_pool(torch.zeros(1, 1, 4, 4), rois.to("meta"), 2)


def test_integral_float_batch_index_is_accepted():
    fmap = torch.arange(32.0).view(2, 1, 4, 4)
    out = prroi_pool(fmap, torch.tensor([[1.0, 0.0, 0.0, 3.0, 3.0]]), 1)
    assert out.item() == pytest.approx(prroi_pool(fmap[1:], torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]]), 1).item())


def test_empty_input():
    fmap = torch.randn(2, 5, 4, 4, requires_grad=True)
    assert prroi_pool(fmap, torch.zeros(0, 5), (3, 2)).shape == (0, 5, 3, 2)
    assert prroi_pool(fmap, [torch.zeros(0, 4), torch.zeros(0, 4)], 2).shape == (0, 5, 2, 2)
    x = {"p2": torch.randn(2, 5, 8, 8), "p3": torch.randn(2, 5, 4, 4)}
    out = MultiScalePrRoIPool(["p2", "p3"], 7)(x, [torch.zeros(0, 4), torch.zeros(0, 4)], [(32, 32), (32, 32)])
    assert out.shape == (0, 5, 7, 7)


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
def test_cuda_matches_cpu_and_gradients():
    torch.manual_seed(10)
    fmap = torch.randn(2, 8, 20, 24, dtype=torch.float64)
    xy = torch.rand(64, 2) * 18
    coords = torch.cat([xy, xy + torch.rand(64, 2) * 9 + 0.1], 1).double()
    bidx = torch.randint(0, 2, (64,))
    outs, grads = [], []
    for dev in ("cpu", "cuda"):
        f = fmap.to(dev).detach().clone().requires_grad_()  # a fresh leaf on each device
        c = coords.to(dev).detach().clone().requires_grad_()
        out = prroi_pool(f, _rois(c, bidx.to(dev)), (3, 4), 0.8)
        out.square().sum().backward()
        outs.append(out.cpu())
        grads.append((f.grad.cpu(), c.grad.cpu()))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.cuda
@cuda
def test_cuda_gradcheck_and_multiscale():
    torch.manual_seed(11)
    fmap = torch.randn(1, 2, 5, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    coords = torch.tensor([[0.3, 0.6, 3.7, 4.2]], dtype=torch.float64, device="cuda", requires_grad=True)
    bidx = torch.zeros(1, device="cuda")
    assert torch.autograd.gradcheck(lambda f, c: prroi_pool(f, _rois(c, bidx), 2), (fmap, coords))
    x = {"p2": torch.randn(1, 3, 32, 32, device="cuda"), "p3": torch.randn(1, 3, 16, 16, device="cuda")}
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 50.0], [10.0, 3.0, 120.0, 110.0]], device="cuda")]
    out = MultiScalePrRoIPool(["p2", "p3"], 7)(x, boxes, [(128, 128)])
    ref = MultiScalePrRoIPool(["p2", "p3"], 7)({k: v.cpu() for k, v in x.items()}, [boxes[0].cpu()], [(128, 128)])
    torch.testing.assert_close(out.cpu(), ref)
