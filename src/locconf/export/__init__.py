"""Models out of locconf: the network up to the candidates as an ONNX file or a ``torch.export``
program, and locconf's post-processing on what they return.

* :mod:`.network`: :func:`export_network`, a detector as a fixed-shape network (one batch tensor
  in, padded candidate tensors out), and :func:`check_exportable` (what cannot be exported, and why);
* :mod:`.formats`: :func:`export_onnx`, :func:`export_program` / :func:`load_program`, the metadata
  both files carry;
* :mod:`.outputs`: :func:`prepare_images`, :func:`candidates_from_outputs`,
  :func:`postprocess_outputs` and :class:`OnnxDetector` (onnxruntime + locconf's post-processing).

The weights-only folder (safetensors + configuration) is :func:`locconf.models.save_pretrained` /
:func:`locconf.models.from_pretrained`; ``locconf export`` writes all three formats.
"""

from .formats import (FORMATS, default_image_size, export_model, export_onnx, export_program, load_program,
                      network_metadata, read_onnx_metadata)
from .network import ExportedNetwork, OneStageNetwork, RCNNNetwork, check_exportable, export_network
from .outputs import OnnxDetector, candidates_from_outputs, postprocess_outputs, prepare_images

__all__ = ["FORMATS", "ExportedNetwork", "OneStageNetwork", "OnnxDetector", "RCNNNetwork", "candidates_from_outputs",
           "check_exportable", "default_image_size", "export_model", "export_network", "export_onnx",
           "export_program", "load_program", "network_metadata", "postprocess_outputs", "prepare_images",
           "read_onnx_metadata"]
