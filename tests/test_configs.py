"""Every shipped NEON / synthetic config builds its model and runs one training step.

The COCO configs have their own smoke test (``test_coco_configs.py``) on a COCO-format fixture.
Here each config keeps its architecture, head and options, with the image size and widths shrunk
so that a step takes about a second on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locconf.data import SyntheticScenes, collate_fn
from locconf.experiment import build_model, load_config, neon_recipe

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml") if not p.name.startswith("coco_"))
SHRINK = dict(min_size=96, max_size=96, fpn_channels=16, channels_last=False)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_model_trains_one_step(path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(path)
    assert cfg["train"].get("iterations", 0) > 0 and cfg["eval"].get("methods")
    model_cfg = dict(cfg["model"], **SHRINK)
    if model_cfg.get("arch") in ("rcnn", "torchvision_frcnn"):
        model_cfg["representation_size"] = 32
    if model_cfg.get("arch") == "rcnn":
        model_cfg["quality_representation_size"] = 32
    model = build_model(num_classes=2, **model_cfg)
    images, targets = collate_fn([SyntheticScenes(2, image_size=96, num_classes=2, seed=0)[i] for i in range(2)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values()), path.name
    sum(losses.values()).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model.candidates(images)
    assert len(out) == 2 and all(set(o) >= {"boxes", "scores", "labels"} for o in out)


#: NEON configs on the shared CPU recipes (``_lite0``: pretrained, ``_r18`` and neon_recipe_p2: from
#: scratch); neon_frcnn_r18.yaml is the shared note's reference recipe.
NEON_RECIPE_CONFIGS = [p for p in CONFIGS if p.stem.startswith("neon_") and p.stem != "neon_frcnn_r18"]


@pytest.mark.parametrize("path", NEON_RECIPE_CONFIGS, ids=[p.stem for p in NEON_RECIPE_CONFIGS])
def test_neon_configs_follow_the_shared_recipe(path):
    """The YAML files repeat locconf.experiment.neon_recipe (the demo's and the benchmark's): keep them equal."""
    cfg = load_config(path)
    recipe = neon_recipe(two_stage=cfg["model"].get("arch", "rcnn") != "one_stage",
                         pretrained=path.stem.endswith("_lite0"))
    assert {k: cfg["model"].get(k) for k in recipe["model"]} == recipe["model"]
    assert {k: cfg["data"].get(k) for k in recipe["data"]} == recipe["data"]
    assert cfg["train"]["lr"] == recipe["train"]["lr"]


def test_every_neon_variant_has_a_pretrained_and_a_scratch_config():
    stems = {p.stem for p in NEON_RECIPE_CONFIGS}
    pretrained = {s.removesuffix("_lite0") for s in stems if s.endswith("_lite0")}
    scratch = {s.removesuffix("_r18") for s in stems if s.endswith("_r18")}
    assert pretrained == scratch and len(pretrained) == 9
