"""``locconf export``: a trained detector out of locconf, as a pretrained folder, ONNX or torch.export."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ._common import add_parser as _sub_parser
from .choices import EXPORT_FORMATS

logger = logging.getLogger(__name__)


def add_parser(sub, parents) -> None:
    ex = _sub_parser(
        sub, "export", parents, help="write a trained detector as a pretrained folder, ONNX or torch.export",
        description="Write the detector of a training checkpoint (or of a pretrained folder):\n"
        "  pretrained    a folder with model.safetensors (the weights only) and config.json (the model\n"
        "                configuration, the categories, the locconf version): locconf.models.from_pretrained\n"
        "                and torch.hub.load(..., pretrained_dir=DIR) read it;\n"
        "  onnx          the network up to the candidates, one fixed-size batch of images in [0, 1] in,\n"
        "                padded candidates out (boxes, scores, labels, the head's quality / variances,\n"
        "                num_candidates); locconf.export.OnnxDetector runs it with locconf's post-processing;\n"
        "  torch-export  the same network as a torch.export program (.pt2).\n"
        "Post-processing stays outside the exported network (numba cannot be exported), and so does\n"
        "IoU-Net's box refinement (gradient ascent): export those models with --no-refine.")
    ex.add_argument("checkpoint", type=Path, help="a checkpoint of locconf train, or a pretrained folder")
    ex.add_argument("--out", type=Path, required=True,
                    help="the folder (pretrained) or file (.onnx, .pt2) to write")
    ex.add_argument("--format", default="pretrained", choices=EXPORT_FORMATS, help="what to write")
    ex.add_argument("--config", type=Path, default=None,
                    help="the configuration (default: the one the checkpoint records)")
    ex.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="input size of the exported network (default: the model's min_size, square)")
    ex.add_argument("--batch-size", type=int, default=1, help="images per call of the exported network")
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 16)")
    ex.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"),
                    help="ONNX exporter: torch.export-based (refuses value-dependent Python branches) or the "
                         "deprecated TorchScript tracer (faster to export)")
    ex.add_argument("--no-refine", action="store_true",
                    help="onnx / torch-export of an IoU-Net with box refinement: export its candidates before "
                         "refinement")
    ex.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..experiment import load_config, load_trained
    from ..export import default_image_size, export_network, export_onnx, export_program, network_metadata
    from ..files import check_outputs, output_lock
    from ..models.pretrained_io import CONFIG_FILE, WEIGHTS_FILE, from_pretrained, save_pretrained

    checkpoint, out = args.checkpoint, args.out
    if not checkpoint.exists():
        raise FileNotFoundError(f"no checkpoint or pretrained folder {checkpoint}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.image_size is not None and min(args.image_size) < 1:
        raise ValueError(f"--image-size must be two sizes >= 1, got {args.image_size}")
    outputs = {"--out": out}
    if args.format == "pretrained":
        outputs = {"--out": out, f"--out's {WEIGHTS_FILE}": out / WEIGHTS_FILE,
                   f"--out's {CONFIG_FILE}": out / CONFIG_FILE}
    inputs = {"checkpoint": checkpoint}
    if args.config is not None:
        inputs["--config"] = args.config
    check_outputs(outputs, inputs)
    if args.format != "pretrained" and out.is_dir():
        raise ValueError(f"--out {out} is a folder; --format {args.format} writes a file (e.g. model.onnx)")
    if args.format == "pretrained" and out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --format pretrained writes a folder")
    if checkpoint.is_dir():
        if args.config is not None:
            raise ValueError("--config applies to a checkpoint; a pretrained folder carries its configuration")
        model, training_config = from_pretrained(checkpoint, device="cpu"), None
    else:
        cfg = load_config(args.config) if args.config else None
        model, training_config = load_trained(checkpoint, cfg, device="cpu")
    if args.format == "pretrained":  # the whole model, refinement included: it runs in PyTorch
        with output_lock(out, command="locconf export"):
            save_pretrained(model, out, training_config=training_config)
        print(f"wrote {out / WEIGHTS_FILE} and {out / CONFIG_FILE}: locconf.models.from_pretrained({str(out)!r})")
        return 0
    if args.no_refine and getattr(getattr(model, "roi_heads", None), "refine_steps", 0):
        logger.info("exporting the candidates before IoU-Net's refinement (--no-refine)")
        model.roi_heads.refine_steps = 0
    network = export_network(model, args.image_size or default_image_size(model), args.batch_size)
    meta = network_metadata(network)
    logger.info("exporting %s as %s (a minute or more)", checkpoint, args.format)
    with output_lock(out, command="locconf export"):
        if args.format == "onnx":
            export_onnx(network, out, opset=args.opset, dynamo=args.exporter == "dynamo")
        else:
            export_program(network, out)
    b, (h, w) = meta["batch_size"], meta["image_size"]
    print(f"wrote {out}: input images ({b}, 3, {h}, {w}) float32 in [0, 1]; outputs {', '.join(meta['output_names'])}; "
          f"post-process with {meta['default_method']!r} (locconf.export.OnnxDetector, postprocess_outputs)")
    return 0
