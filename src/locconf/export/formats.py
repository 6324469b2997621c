"""Writing the exported network (:mod:`.network`) as an ONNX file or a ``torch.export`` program.

Both files carry a JSON description of the network, :func:`network_metadata` (ONNX: the metadata
property ``locconf``; ``.pt2``: the extra file ``locconf.json``): ``locconf_version``,
``image_size`` [H, W], ``batch_size``, ``input_name``, ``output_names``, ``signal`` (the candidate
field of the head's localization signal, or null), ``default_method`` (the head's post-processing),
``categories`` (``{"id", "name"}`` in label order, or null) and ``model`` (the model section that
built it, when known). :class:`locconf.export.OnnxDetector` and
:func:`locconf.export.load_program` read it back.

**ONNX exporter.** ``torch.onnx.export(..., dynamo=True)`` (the default here) captures the network
with ``torch.export`` and translates it with onnxscript: torchvision's ``nms`` becomes ONNX
``NonMaxSuppression`` and ``roi_align`` ``RoiAlign``. It refuses Python control flow that depends
on tensor values instead of silently fixing it, which is why it is the default: the
TorchScript-based exporter (``dynamo=False``, deprecated in torch) also exports every locconf head,
several times faster, but it traces, so any such branch is frozen at the value it took on the
example input (it warns). The opset is 18 (ONNX ``RoiAlign``'s ``coordinate_transformation_mode``
needs 16 or more).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..files import atomic_write
from .network import ExportedNetwork, export_network

__all__ = ["export_model", "export_onnx", "export_program", "network_metadata", "load_program", "read_onnx_metadata",
           "default_image_size", "FORMATS", "METADATA_KEY", "PROGRAM_EXTRA_FILE", "INPUT_NAME", "DEFAULT_OPSET"]

logger = logging.getLogger(__name__)

METADATA_KEY = "locconf"
PROGRAM_EXTRA_FILE = "locconf.json"
INPUT_NAME = "images"
DEFAULT_OPSET = 18
#: What ``locconf export --format`` writes: a pretrained folder (:func:`locconf.models.save_pretrained`),
#: an ONNX file (:func:`export_onnx`) or a ``torch.export`` program (:func:`export_program`).
FORMATS = ("pretrained", "onnx", "torch-export")


def default_image_size(model: nn.Module) -> tuple[int, int]:
    """The input size an export defaults to: the detector's ``min_size`` square (its training size
    for square tiles: 400 x 400 on the NEON recipes)."""
    size = int(model.transform.min_size[0])
    return size, size


def export_model(model: nn.Module, out: str | os.PathLike, format: str = "pretrained", *,
                 image_size: Optional[Sequence[int]] = None, batch_size: int = 1, opset: int = DEFAULT_OPSET,
                 dynamo: bool = True, training_config: Optional[dict] = None) -> Path:
    """Write ``model`` in one of :data:`FORMATS` to ``out`` (a folder for ``"pretrained"``, else a
    file); ``image_size`` defaults to :func:`default_image_size`; ``training_config`` is recorded by
    the pretrained folder. Returns ``out``."""
    from ..models.pretrained_io import save_pretrained

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "pretrained":
        return save_pretrained(model, out, training_config=training_config)
    size = tuple(image_size) if image_size is not None else default_image_size(model)
    if format == "onnx":
        return export_onnx(model, out, size, batch_size, opset=opset, dynamo=dynamo)
    return export_program(model, out, size, batch_size)


def require(*modules: str, what: str) -> None:
    """A ``ValueError`` saying how to install the optional ``modules`` that ``what`` needs."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{what} needs {', '.join(missing)}: pip install 'locconf[export]'")


def network_metadata(network: ExportedNetwork) -> dict[str, Any]:
    """The description written beside an exported network (module docstring)."""
    from .. import __version__

    model = network.model
    signal = next((name for name in ("quality", "variances") if name in network.output_names), None)
    config = getattr(model, "model_config", None)
    if config is not None:
        config = json.loads(json.dumps(dict(config, weights=None), default=str))
        if "refine_steps" in config:  # what was exported (locconf export --no-refine switches it off)
            config["refine_steps"] = model.roi_heads.refine_steps
    return {"locconf_version": __version__, "image_size": list(network.image_size), "batch_size": network.batch_size,
            "input_name": INPUT_NAME, "output_names": list(network.output_names), "signal": signal,
            "default_method": model.default_method, "categories": getattr(model, "categories", None),
            "model": config}


def _network(model: nn.Module, image_size: Optional[Sequence[int]], batch_size: int) -> ExportedNetwork:
    """``model`` wrapped by :func:`export_network`, or ``model`` itself when it already is one."""
    if isinstance(model, ExportedNetwork):
        return model
    if image_size is None:
        raise ValueError("image_size (H, W) is required to export a detector")
    return export_network(model, image_size, batch_size)


def _example(network: ExportedNetwork) -> torch.Tensor:
    """An example input: a fixed pseudo-random image batch (its values do not shape the graph)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(network.batch_size, 3, *network.image_size, generator=g)
    return x.to(network.mean.device)


def export_onnx(model: nn.Module, path: str | os.PathLike, image_size: Optional[Sequence[int]] = None,
                batch_size: int = 1, *,
                opset: int = DEFAULT_OPSET, dynamo: bool = True) -> Path:
    """Export ``model``'s network up to the candidates (:func:`locconf.export.export_network`) to an
    ONNX file.

    Args:
        model: a locconf detector (:func:`locconf.export.check_exportable` says which cannot be),
            or a network :func:`locconf.export.export_network` wrapped already.
        path: the ``.onnx`` file (written through a temporary file; the weights are inside it).
        image_size: ``(H, W)`` of the input; batch_size: images per call (both fixed in the file;
            ignored for a wrapped network).
        opset: the ONNX opset (>= 16).
        dynamo: the exporter: ``torch.export``-based (True) or TorchScript-based (False); module
            docstring.

    Returns:
        ``path``. The input is ``images`` (B, 3, H, W) float32 in [0, 1]; the outputs are named as
        :attr:`ExportedNetwork.output_names`; the metadata property ``locconf`` holds
        :func:`network_metadata`.
    """
    require("onnx", *(("onnxscript",) if dynamo else ()), what="ONNX export")
    import onnx

    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 16:
        raise ValueError(f"opset must be an int >= 16 (ONNX RoiAlign's coordinate modes), got {opset!r}")
    network = _network(model, image_size, batch_size)
    meta = json.dumps(network_metadata(network))
    example = _example(network)

    def write(tmp: Path) -> None:
        with torch.no_grad():
            if dynamo:
                torch.onnx.export(network, (example,), str(tmp), dynamo=True, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=list(network.output_names),
                                  external_data=False, verbose=False)
            else:
                torch.onnx.export(network, (example,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=list(network.output_names))
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, meta
        onnx.save(proto, str(tmp))

    return atomic_write(path, write)


def export_program(model: nn.Module, path: str | os.PathLike, image_size: Optional[Sequence[int]] = None,
                   batch_size: int = 1) -> Path:
    """Export ``model``'s network up to the candidates (or a network :func:`export_network` wrapped
    already) with ``torch.export`` and save the program
    (``torch.export.save``, a ``.pt2`` file) with :func:`network_metadata` as its extra file
    ``locconf.json``. ``torch.export.load(path).module()(images)`` returns the outputs in the order
    of ``output_names``. Returns ``path``."""
    network = _network(model, image_size, batch_size)
    meta = json.dumps(network_metadata(network))
    with torch.no_grad():
        program = torch.export.export(network, (_example(network),))
    buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2 or a buffer, not our temporary file
    torch.export.save(program, buffer, extra_files={PROGRAM_EXTRA_FILE: meta})
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def load_program(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load a program written by :func:`export_program`: ``(module, metadata)``; ``module(images)``
    returns the outputs in the order of ``metadata["output_names"]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported program {path}")
    extra = {PROGRAM_EXTRA_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    text = extra[PROGRAM_EXTRA_FILE]
    if not text:
        raise ValueError(f"{path} has no {PROGRAM_EXTRA_FILE}: it was not written by locconf export")
    return program.module(), json.loads(text)


def read_onnx_metadata(path: str | os.PathLike, session: Optional[Any] = None) -> dict[str, Any]:
    """The ``locconf`` metadata of an exported ONNX file (from an onnxruntime ``session`` if given)."""
    if session is not None:
        props = session.get_modelmeta().custom_metadata_map
    else:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} has no '{METADATA_KEY}' metadata: it was not written by locconf export")
    return json.loads(props[METADATA_KEY])
