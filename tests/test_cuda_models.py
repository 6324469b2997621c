"""The detectors on a CUDA device: every head trains and predicts there, and agrees with the CPU.

Skipped without a GPU (``benchmarks/device_check.sh`` runs them where one is present).
"""

from __future__ import annotations

import pytest
import torch

from locconf.engine.train import train
from locconf.data import SyntheticScenes
from locconf.models import build_one_stage, build_rcnn
from locconf.models.rcnn import QUALITY_HEADS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY = dict(fpn_channels=16, representation_size=32, min_size=96, max_size=128, rpn_post_nms_top_n_test=200,
            candidates_per_image=150)


def _images_targets(device):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=g), torch.rand(3, 80, 112, generator=g)]
    targets = [dict(boxes=torch.tensor([[10.0, 10, 40, 50], [50, 20, 90, 70]]), labels=torch.tensor([1, 2])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))]
    return ([im.to(device) for im in images],
            [{k: v.to(device) for k, v in t.items()} for t in targets])


def _assert_on_cuda(out: dict) -> None:
    for key, value in out.items():
        if torch.is_tensor(value):
            assert value.is_cuda, key


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("quality", QUALITY_HEADS)
def test_rcnn_heads_train_and_predict_on_cuda(quality, amp):
    torch.manual_seed(0)
    model = build_rcnn(2, quality=quality, **TINY).cuda()
    images, targets = _images_targets("cuda")
    with torch.autocast("cuda", enabled=amp):
        losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", enabled=amp):
        out = model.candidates(images)
    assert len(out) == 2
    for o in out:
        _assert_on_cuda(o)
        assert o["boxes"].shape[1] == 4 and len(o["scores"]) == len(o["boxes"])


@pytest.mark.parametrize("head", ["atss", "gfl", "clq"])
def test_one_stage_heads_train_and_predict_on_cuda(head):
    torch.manual_seed(0)
    model = build_one_stage(2, head=head, fpn_channels=16, min_size=96, max_size=128,
                            candidates_per_image=150).cuda()
    images, targets = _images_targets("cuda")
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model.candidates(images)
    for o in out:
        _assert_on_cuda(o)


@pytest.mark.parametrize("quality", ["dir", "iou_net", "kl"])
def test_cuda_inference_matches_cpu(quality):
    """The same weights give the same candidates on both devices (fp32; float tolerance)."""
    torch.manual_seed(0)
    model = build_rcnn(2, quality=quality, **TINY).eval()
    images, _ = _images_targets("cpu")
    with torch.no_grad():
        cpu = model.candidates(images)
        gpu = model.cuda().candidates([im.cuda() for im in images])
    for c, g in zip(cpu, gpu):
        assert c.keys() == g.keys()
        n = min(len(c["scores"]), len(g["scores"]), 50)
        assert n > 0
        # the highest scores agree in order; candidates of (nearly) tied scores may swap places, so
        # each of the GPU's top n must be among the CPU's top n + 20 with the same label and box
        torch.testing.assert_close(g["scores"][:n].cpu(), c["scores"][:n], atol=1e-3, rtol=1e-3)
        gs, gb, gl = g["scores"][:n].cpu(), g["boxes"][:n].cpu(), g["labels"][:n].cpu()
        m = min(len(c["scores"]), n + 20)
        cs, cb, cl = c["scores"][:m], c["boxes"][:m], c["labels"][:m]
        same = ((gs[:, None] - cs[None]).abs() <= 1e-3) & (gl[:, None] == cl[None]) \
            & ((gb[:, None] - cb[None]).abs().amax(-1) <= 1e-2)
        assert same.any(1).all(), f"{int((~same.any(1)).sum())} of the GPU's top {n} have no CPU twin"


def test_train_loop_on_cuda_with_amp_and_resume(tmp_path):
    ds = SyntheticScenes(num_images=8, image_size=96, num_classes=2, min_size=12, max_size=48, seed=0)
    kw = dict(iterations=6, batch_size=2, lr=0.01, warmup_iters=2, device="cuda", amp=True, progress=False,
              checkpoint_every=3, seed=0, out_dir=tmp_path / "a")
    torch.manual_seed(0)
    first = train(build_rcnn(2, quality="dir", **TINY), ds, **kw)
    assert first["step"] == 6 and first["start_step"] == 0
    assert first["checkpoint"] is not None and first["checkpoint"].endswith("6.pth")
    assert all(torch.isfinite(torch.tensor(v)) for v in first["losses"].values())
    # resuming a finished run starts at its last step and trains nothing more
    torch.manual_seed(0)
    again = train(build_rcnn(2, quality="dir", **TINY), ds, resume=True, **kw)
    assert again["start_step"] == 6 and again["step"] == 6
