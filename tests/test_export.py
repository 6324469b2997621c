"""Models out of locconf: the pretrained folder (safetensors + config), torch.hub entries, the
fixed-shape network up to the candidates, its ONNX / torch.export files and the post-processing of
their outputs."""

import functools
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from locconf.export import (FORMATS, OnnxDetector, candidates_from_outputs, check_exportable, export_network,
                            export_onnx, export_program, load_program, postprocess_outputs, prepare_images)
from locconf.models import build_one_stage, build_rcnn, build_torchvision_frcnn, from_pretrained, save_pretrained
from locconf.postprocess import postprocess

REPO = Path(__file__).resolve().parents[1]
NEON = REPO / "data" / "neon"
SIZE = 128
TINY = dict(backbone="resnet18", fpn_channels=16, min_size=SIZE, max_size=SIZE)
TWO_STAGE = dict(TINY, representation_size=32, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100)
ONE_STAGE = dict(TINY, head_convs=1, head_norm_groups=8, lqe_channels=8)
CATEGORIES = [{"id": 7, "name": "tree"}, {"id": 9, "name": "snag"}]

# (builder, keywords) of every exportable family; two classes so that labels matter
FAMILIES = {
    "rcnn": (build_rcnn, dict(TWO_STAGE)),
    "dir": (build_rcnn, dict(TWO_STAGE, quality="dir", quality_thresh=0.3)),
    "iou_net": (build_rcnn, dict(TWO_STAGE, quality="iou_net")),
    "kl": (build_rcnn, dict(TWO_STAGE, quality="kl")),
    "dir_foresight": (build_rcnn, dict(TWO_STAGE, quality="dir_foresight")),
    "iou_direct": (build_rcnn, dict(TWO_STAGE, quality="iou_direct", class_agnostic_box=False)),
    "cascade_dir": (build_rcnn, dict(TWO_STAGE, quality="dir", cascade=(0.5, 0.6, 0.7))),
    "atss": (build_one_stage, dict(ONE_STAGE, head="atss")),
    "gfl": (build_one_stage, dict(ONE_STAGE, head="gfl")),
    "clq": (build_one_stage, dict(ONE_STAGE, head="clq")),
}


def _build(family, **extra):
    builder, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    return builder(2, **dict(kwargs, **extra)).eval()


@functools.lru_cache(maxsize=1)
def _neon_val_tile() -> Path:
    """The first NEON val tile: from ``data/neon`` (written by ``locconf demo``) or, without it,
    converted once into a temporary folder from the cached deepforest wheel."""
    found = sorted((NEON / "val").glob("*.png"))
    if not found:
        from locconf.data.neon import neon_trees

        out = Path(tempfile.mkdtemp(prefix="locconf-neon-"))
        neon_trees(out, progress=False)
        found = sorted((out / "val").glob("*.png"))
    return found[0]


def _neon_tile(size=None):
    """A real NEON tile (RGB in [0, 1]), resized to ``size`` (h, w) if given."""
    from PIL import Image

    path = _neon_val_tile()
    img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    if size is not None:
        img = torch.nn.functional.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
    return img


def assert_same_candidates(ref, got, box_tol=1e-3, value_tol=1e-5):
    """``got`` holds the candidates of ``ref``, one to one, within the tolerances.

    The order of rows is free (a float rounding can swap two tied scores): each reference row is
    matched, greedily and one to one, to the unused row of ``got`` with its label whose box (L-inf
    distance) plus score is nearest; the matched box must be within ``box_tol`` pixels, the score
    and the signals within ``value_tol`` (variances: relative 1e-4)."""
    assert set(got) >= set(ref) - {"image_id"}
    n = len(ref["boxes"])
    assert len(got["boxes"]) == n
    if n == 0:
        return
    dist = (ref["boxes"][:, None, :] - got["boxes"][None, :, :]).abs().amax(dim=-1)
    dist = dist + (ref["scores"][:, None] - got["scores"][None, :]).abs()
    dist[ref["labels"][:, None] != got["labels"][None, :]] = float("inf")
    match = []
    for row in dist:  # greedy one-to-one: identical rows (a box clipped twice to a border) pair in any order
        row = row.clone()
        row[match] = float("inf")
        match.append(int(row.argmin()))
    match = torch.tensor(match)
    best = (ref["boxes"] - got["boxes"][match]).abs().amax(dim=-1)
    assert (ref["labels"] == got["labels"][match]).all(), "a candidate has no counterpart with its label"
    assert best.max() <= box_tol, f"boxes differ by {best.max():.2e} px"
    for name, value in ref.items():
        if name in ("boxes", "labels", "image_id"):
            continue
        other = got[name][match].to(value.dtype)
        if name == "variances":
            assert torch.allclose(other, value, rtol=1e-4, atol=1e-6), name
        else:
            assert (other - value).abs().max() <= value_tol, f"{name} differs by {(other - value).abs().max():.2e}"


# -- the pretrained folder ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["dir", "clq"])
def test_save_pretrained_round_trip_is_bitwise(family, tmp_path, one_thread):
    model = _build(family, score_thresh=0.0)
    model.categories = CATEGORIES
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    record = json.loads((tmp_path / "m" / "config.json").read_text())
    assert record["categories"] == CATEGORIES and record["model"]["weights"] is None
    loaded = from_pretrained(tmp_path / "m", device="cpu")
    assert not loaded.training and loaded.categories == CATEGORIES
    ref, got = model.state_dict(), loaded.state_dict()
    assert list(ref) == list(got)
    for key in ref:
        assert ref[key].dtype == got[key].dtype and torch.equal(ref[key], got[key]), key
    img = _neon_tile((SIZE, SIZE))
    a, b = model.candidates([img])[0], loaded.candidates([img])[0]
    assert len(a["boxes"]) > 0 and set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_from_pretrained_restores_the_input_normalisation(tmp_path):
    """ImageNet weights set a backbone's mean / std; the folder records them (its config has
    weights: null)."""
    model = _build("atss")
    model.transform.image_mean, model.transform.image_std = [0.5, 0.5, 0.5], [0.25, 0.5, 0.5]
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m", device="cpu")
    assert loaded.transform.image_mean == [0.5, 0.5, 0.5] and loaded.transform.image_std == [0.25, 0.5, 0.5]


def test_pretrained_versions_and_damage_are_reported(tmp_path, caplog):
    model = _build("rcnn")
    save_pretrained(model, tmp_path / "m", categories=CATEGORIES)
    config = tmp_path / "m" / "config.json"
    record = json.loads(config.read_text())

    config.write_text(json.dumps(dict(record, format_version=2, locconf_version="9.0.0")))
    with pytest.raises(ValueError, match=r"written by locconf 9\.0\.0 in pretrained format 2.*upgrade locconf"):
        from_pretrained(tmp_path / "m")

    config.write_text(json.dumps(dict(record, locconf_version="0.0.1")))
    with caplog.at_level(logging.WARNING, logger="locconf"):
        from_pretrained(tmp_path / "m", device="cpu")
    assert "written by locconf 0.0.1" in caplog.text

    config.write_text(json.dumps(dict(record, model=dict(record["model"], representation_size=48))))
    with pytest.raises(ValueError, match=r"do not fit the model.*other shapes: roi_heads\.box_head\.fc6\.weight"):
        from_pretrained(tmp_path / "m")

    config.write_text(json.dumps(dict(record, model=dict(record["model"], no_such_key=1))))
    with pytest.raises(ValueError, match="no_such_key"):
        from_pretrained(tmp_path / "m")

    config.write_text(json.dumps(record))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        from_pretrained(tmp_path)


def test_save_pretrained_checks_before_writing(tmp_path):
    frcnn = build_torchvision_frcnn(2, fpn_channels=16, min_size=SIZE, max_size=SIZE, representation_size=32)
    with pytest.raises(ValueError, match="pass config="):
        save_pretrained(frcnn, tmp_path / "tv")
    with pytest.raises(ValueError, match="categories has 1 entries but the model has num_classes=2"):
        save_pretrained(_build("rcnn"), tmp_path / "x", categories=CATEGORIES[:1])
    assert not (tmp_path / "tv").exists() and not (tmp_path / "x").exists()
    # torchvision's model, with its configuration given: a bitwise round trip through build_model
    config = dict(arch="torchvision_frcnn", num_classes=2, fpn_channels=16, min_size=SIZE, max_size=SIZE,
                  representation_size=32)
    save_pretrained(frcnn, tmp_path / "tv", config=config)
    loaded = from_pretrained(tmp_path / "tv", device="cpu")
    loaded_state = loaded.torchvision_model.state_dict()  # build_model wraps torchvision's model (from_torchvision)
    assert all(torch.equal(v, loaded_state[k]) for k, v in frcnn.state_dict().items())


# -- torch.hub -------------------------------------------------------------------------------------------


def test_hub_entries_build_each_family(tmp_path):
    from locconf.models.one_stage import OneStageDetector
    from locconf.models.rcnn import RCNN

    import importlib.util

    spec = importlib.util.spec_from_file_location("locconf_hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)  # what torch.hub.list does with a GitHub checkout
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    expected = {"rcnn": None, "iou_net": "iou_net", "dir": "dir", "dir_foresight": "dir_foresight",
                "iou_direct": "iou_direct", "kl": "kl", "cascade": None, "cascade_dir": "dir"}
    assert set(expected) | {"atss", "gfl", "clq"} <= set(entries)
    for name, quality in expected.items():
        model = torch.hub.load(str(REPO), name, source="local", num_classes=2, **TWO_STAGE)
        assert isinstance(model, RCNN) and model.quality == quality and model.num_classes == 2, name
        assert (model.model_config["cascade"] is not None) == name.startswith("cascade"), name
    for head in ("atss", "gfl", "clq"):
        model = torch.hub.load(str(REPO), head, source="local", num_classes=2, **ONE_STAGE)
        assert isinstance(model, OneStageDetector) and model.head_type == head
    with pytest.raises(ValueError, match="fixes quality"):
        torch.hub.load(str(REPO), "dir", source="local", quality="kl")


def test_hub_loads_a_pretrained_folder(tmp_path):
    model = _build("dir")
    save_pretrained(model, tmp_path / "m", categories=CATEGORIES)
    loaded = torch.hub.load(str(REPO), "dir", source="local", pretrained_dir=str(tmp_path / "m"), device="cpu")
    assert loaded.categories == CATEGORIES and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not the 'kl' entry's"):
        torch.hub.load(str(REPO), "kl", source="local", pretrained_dir=str(tmp_path / "m"))
    with pytest.raises(ValueError, match="only device is allowed"):
        torch.hub.load(str(REPO), "dir", source="local", pretrained_dir=str(tmp_path / "m"), min_size=64)


# -- the network up to the candidates --------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_network_returns_the_candidates_of_eager_pytorch(family, one_thread):
    """The fixed-shape network (masks and topk instead of data-dependent shapes) returns exactly
    ``model.candidates``: two tiles of another size than the network's resize (so the resize, the
    padding and the mapping back all run), every head."""
    model = _build(family, score_thresh=0.0, candidates_per_image=150)
    images = [_neon_tile((100, 120)), _neon_tile((100, 120)).flip(-1)]
    network = export_network(model, (100, 120), batch_size=2)
    resized = model.transform(images)[0]
    assert network.resized_size == tuple(resized.image_sizes[0]) != (100, 120)
    assert network.padded_size == tuple(resized.tensors.shape[-2:])
    assert torch.equal(network.preprocess(torch.stack(images)), resized.tensors)
    with torch.no_grad():
        outputs = network.outputs_dict(network(torch.stack(images)))
    assert outputs["boxes"].shape == (2, 150, 4) and outputs["num_candidates"].dtype == torch.int64
    for ref, got, count in zip(model.candidates(images), candidates_from_outputs(outputs), outputs["num_candidates"]):
        assert int(count) == len(ref["boxes"]) > 0 and set(got) == set(ref)
        for key in ref:  # the same rows in the same order, to the bit
            assert torch.equal(ref[key], got[key]), key
    padding = outputs["scores"].shape[1] - outputs["num_candidates"]
    assert all((outputs["labels"][b, -p:] == 0).all() for b, p in enumerate(padding.tolist()) if p)


def test_what_cannot_be_exported_says_why(tmp_path, capsys):
    from locconf.cli import main

    refine = build_rcnn(2, quality="iou_net", refine_steps=3, **TWO_STAGE)
    with pytest.raises(ValueError, match=r"refinement \(refine_steps=3\) cannot be exported.*--no-refine"):
        export_network(refine, (SIZE, SIZE))
    with pytest.raises(ValueError, match="torchvision's own Faster R-CNN"):
        check_exportable(build_torchvision_frcnn(2, fpn_channels=16, min_size=SIZE, max_size=SIZE))
    from locconf.models import build_torchvision
    from locconf.models.posthoc import PosthocQuality

    retina = build_torchvision(2, name="retinanet_resnet50_fpn", backbone="resnet18", min_size=SIZE, max_size=SIZE)
    with pytest.raises(ValueError, match=r"wrapped by from_torchvision \(RetinaNet\).*own ONNX path"):
        export_network(retina, (SIZE, SIZE))
    with pytest.raises(ValueError, match=r"post-hoc quality model \(arch posthoc\)"):
        check_exportable(PosthocQuality(_build("rcnn"), head="dir", representation_size=32))
    with pytest.raises(ValueError, match="image_size must be"):
        export_network(_build("atss"), (SIZE,))
    save_pretrained(refine, tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("locconf export: error: IoU-Net's box refinement") and "--no-refine" in err
    assert not (tmp_path / "m.onnx").exists()


# -- ONNX and torch.export ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["dir", "clq"])
def test_onnx_candidates_match_eager_on_a_neon_tile(family, tmp_path, one_thread):
    """onnxruntime on the exported file against eager PyTorch on a real NEON tile (random weights):
    the same candidates, one to one, boxes within 1e-3 px, scores and quality within 1e-5. The
    tile has its own size (400 x 383), which the file's 128 x 128 input does not: OnnxDetector
    resizes it and maps the boxes back."""
    model = _build(family, score_thresh=0.0, candidates_per_image=200)
    model.categories = CATEGORIES
    path = export_onnx(model, tmp_path / "m.onnx", (SIZE, SIZE))
    detector = OnnxDetector(path, threads=1)
    assert detector.metadata["categories"] == CATEGORIES and detector.image_size == (SIZE, SIZE)
    assert detector.metadata["default_method"] == model.default_method
    tile = _neon_tile()
    got = detector.candidates([tile])[0]
    batch, sizes = prepare_images([tile], (SIZE, SIZE))
    ref = model.candidates([batch[0]])[0]  # what the network sees, then scaled to the tile
    scale = torch.tensor([sizes[0][1] / SIZE, sizes[0][0] / SIZE] * 2)
    ref = dict(ref, boxes=ref["boxes"] * scale)
    assert len(ref["boxes"]) > 50
    assert_same_candidates(ref, got, box_tol=1e-3, value_tol=1e-5)
    dets = detector.detect([tile], max_detections=20)[0]  # the head's own method, on those candidates
    expected = postprocess(got, model.default_method, 20)
    assert all(torch.equal(dets[k], expected[k]) for k in expected)


def test_torch_export_program_round_trip(tmp_path, one_thread):
    model = _build("kl", score_thresh=0.0, candidates_per_image=100)
    path = export_program(model, tmp_path / "m.pt2", (SIZE, SIZE))
    module, meta = load_program(path)
    assert meta["output_names"] == ["boxes", "scores", "labels", "variances", "num_candidates"]
    assert meta["default_method"] == "var-voting+soft" and meta["model"]["quality"] == "kl"
    img = _neon_tile((SIZE, SIZE))
    with torch.no_grad():
        got = candidates_from_outputs(dict(zip(meta["output_names"], module(img[None]))))[0]
    assert_same_candidates(model.candidates([img])[0], got, box_tol=1e-4, value_tol=1e-6)


# -- post-processing the outputs ------------------------------------------------------------------------


def test_candidates_from_outputs_unpads_and_maps_back():
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 0.0, 0.0]],
                          [[5.0, 5.0, 15.0, 25.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    outputs = {"boxes": boxes.numpy(), "scores": np.array([[0.9, 0.8, 0.0], [0.7, 0.0, 0.0]], np.float32),
               "labels": np.array([[1, 2, 0], [1, 0, 0]]), "variances": np.ones((2, 3, 4), np.float32),
               "num_candidates": np.array([2, 1])}
    cands = candidates_from_outputs(outputs, original_sizes=[(200, 100), (100, 100)], image_size=(100, 100))
    assert [len(c["boxes"]) for c in cands] == [2, 1]
    # image 0: (h, w) = (200, 100) from (100, 100): y doubled, x kept; variances by the square
    assert torch.equal(cands[0]["boxes"], torch.tensor([[10.0, 40.0, 30.0, 120.0], [0.0, 0.0, 50.0, 100.0]]))
    assert torch.equal(cands[0]["variances"], torch.tensor([[1.0, 4.0, 1.0, 4.0]] * 2))
    assert torch.equal(cands[1]["boxes"], boxes[1, :1]) and cands[1]["labels"].dtype == torch.int64
    dets = postprocess_outputs(outputs, "var-voting", original_sizes=[(200, 100), (100, 100)], image_size=(100, 100))
    assert torch.equal(dets[0]["boxes"], postprocess(cands[0], "var-voting")["boxes"])
    with pytest.raises(ValueError, match="num_candidates"):
        candidates_from_outputs({k: v for k, v in outputs.items() if k != "num_candidates"})
    with pytest.raises(ValueError, match="image_size"):
        candidates_from_outputs(outputs, original_sizes=[(1, 1), (1, 1)])
    with pytest.raises(ValueError, match="method must be one of|unknown method"):
        postprocess_outputs(outputs, "no-such-method")


def test_prepare_images_resizes_as_the_detector_transform():
    img = _neon_tile()  # 400 x 383
    batch, sizes = prepare_images([img, img[:, :SIZE, :SIZE]], (SIZE, SIZE))
    assert batch.shape == (2, 3, SIZE, SIZE) and sizes == [tuple(img.shape[1:]), (SIZE, SIZE)]
    assert torch.equal(batch[1], img[:, :SIZE, :SIZE])
    expected = torch.nn.functional.interpolate(img[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert torch.equal(batch[0], expected[0])
    with pytest.raises(ValueError, match=r"images\[0\] must be a float"):
        prepare_images([torch.zeros(1, 4, 4)], (SIZE, SIZE))


# -- the command line -------------------------------------------------------------------------------------


def _checkpoint(tmp_path, family="dir"):
    """A checkpoint as ``locconf train`` writes it (model state and meta), without the training."""
    from locconf.engine.checkpoint import save_checkpoint
    from locconf.experiment.training import run_meta

    builder, kwargs = FAMILIES[family]
    arch = "rcnn" if builder is build_rcnn else "one_stage"
    cfg = {"model": dict(kwargs, arch=arch, num_classes=2), "data": {}, "train": {}, "eval": {}}
    torch.manual_seed(0)
    model = builder(2, **kwargs)
    path = save_checkpoint({"model": model.state_dict(), "meta": run_meta(cfg, CATEGORIES)}, tmp_path / "ck.pth")
    return path, model


def test_export_command_writes_a_pretrained_folder(tmp_path, capsys):
    from locconf.cli import main

    checkpoint, model = _checkpoint(tmp_path)
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = from_pretrained(tmp_path / "out", device="cpu")
    assert loaded.categories == CATEGORIES and loaded.quality == "dir"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    record = json.loads((tmp_path / "out" / "config.json").read_text())
    assert record["config"]["model"]["quality"] == "dir"  # the run's configuration, for the record
    # an output on the input is refused before anything is written
    assert main(["export", str(checkpoint), "--format", "torch-export", "--out", str(checkpoint)]) == 2
    assert "is the checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "out"), "--out", str(tmp_path / "out")]) == 2
    assert "is the checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x")]) == 2


def test_export_command_no_refine_writes_the_candidates_before_refinement(tmp_path, capsys, one_thread):
    """IoU-Net with refinement, from a pretrained folder, as a torch.export program with --no-refine:
    the program returns the unrefined candidates, and its metadata says refine_steps 0."""
    from locconf.cli import main

    model = build_rcnn(2, quality="iou_net", refine_steps=2, score_thresh=0.0, candidates_per_image=50, **TWO_STAGE)
    save_pretrained(model, tmp_path / "m", categories=CATEGORIES)
    out = tmp_path / "m.pt2"
    assert main(["export", str(tmp_path / "m"), "--format", "torch-export", "--no-refine", "--image-size",
                 str(SIZE), str(SIZE), "--out", str(out)]) == 0
    assert "outputs boxes, scores, labels, quality, num_candidates" in capsys.readouterr().out
    module, meta = load_program(out)
    assert meta["model"]["refine_steps"] == 0 and meta["categories"] == CATEGORIES
    img = _neon_tile((SIZE, SIZE))
    with torch.no_grad():
        got = candidates_from_outputs(dict(zip(meta["output_names"], module(img[None]))))[0]
    model.eval().roi_heads.refine_steps = 0
    assert_same_candidates(model.candidates([img])[0], got, box_tol=1e-4, value_tol=1e-5)


def test_export_formats_mirror_the_cli_choices():
    from locconf.cli import choices

    assert choices.EXPORT_FORMATS == FORMATS
