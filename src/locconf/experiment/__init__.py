"""From a configuration to a trained, evaluated detector: what ``locconf train|eval|predict|demo`` run.

A configuration is a dict (a YAML file) with four sections that map one to one onto the keyword
arguments of the functions they feed:

```yaml
model:                      # build_model(**model)
  arch: rcnn                # rcnn | one_stage | torchvision_frcnn | torchvision
  quality: dir              # ... any keyword of the builder (locconf.models.build_rcnn here)
data:                       # build_datasets(**data)
  source: neon-trees        # neon-trees | synthetic | coco
  root: data/neon
train:                      # locconf.engine.train.train(model, dataset, **train)
  iterations: 3000
  out_dir: runs/neon_frcnn_r18
eval:                       # evaluate(...)
  methods: [nms, soft-linear, soft-gaussian]
```

No registries: unknown keys (nested ones such as ``data.synthetic.<key>`` included) are errors
that name the section and the key, and so are values of another type than the one the receiving
function declares (``true`` is not a number). YAML files are read with :class:`ConfigLoader`, for
which ``1e-4`` is a float (PyYAML's YAML 1.1 reading makes it a string) and a key given twice is
an error. A file may start from others (``_base_: other.yaml``) and the command line may set keys
(``--set train.lr=0.005``): :mod:`locconf.experiment.config`. :func:`config_reference` lists every
key with its type, default and meaning (``locconf config keys``).

The package, one job a module: ``config`` (reading and checking a configuration), ``keywords``
(a section against the keywords of the function it feeds), ``build`` (the model and the data of a
configuration), ``recipe`` (the NEON CPU recipe), ``training`` (``run_train``, ``load_trained``),
``evaluate`` (``run_eval``) and ``inference`` (``predict``, ``categories_of``). ``training`` also holds
``load_detector``, what ``eval`` and ``predict`` run: a checkpoint, or a torchvision / DeepForest
detector's own weight file (``model.arch: torchvision``, ``model.weights``).
"""

from .build import ARCHS, SYNTHETIC_DEFAULTS, build_datasets, build_model
from .config import (SECTIONS, ConfigLoader, KeyDoc, apply_overrides, check_config, config_key_docs, config_reference,
                     load_config, read_config, section_feeds)
from .evaluate import run_eval
from .inference import categories_of, predict
from .recipe import neon_recipe
from .training import checkpoint_meta, load_detector, load_trained, run_train

__all__ = [
    "ARCHS",
    "SECTIONS",
    "SYNTHETIC_DEFAULTS",
    "ConfigLoader",
    "KeyDoc",
    "apply_overrides",
    "build_datasets",
    "build_model",
    "categories_of",
    "check_config",
    "config_key_docs",
    "config_reference",
    "checkpoint_meta",
    "load_config",
    "load_detector",
    "load_trained",
    "neon_recipe",
    "predict",
    "read_config",
    "run_eval",
    "run_train",
    "section_feeds",
]
