"""The command line of the accuracy comparison: ``locconf bench`` and ``benchmarks/accuracy.py``.

Both take the same options (:func:`add_arguments`) and run :func:`run` on them; they differ only
in the folder the default ``--out`` / ``--runs`` are under and in the command recorded in the report.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from .settings import ABLATION_VARIANTS, ALL_VARIANTS, DEFAULT_VARIANTS, EXTRA_VARIANTS, IOU_NET_VARIANTS, SETTINGS


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of an accuracy comparison, added to ``ap``."""
    ap.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    ap.add_argument("--iterations", type=int, default=None,
                    help="training iterations of every variant (default: the setting's: neon 1500, "
                         "neon-scratch 600, synthetic 800)")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(ALL_VARIANTS),
                    metavar="VARIANT", help=f"default: all of {', '.join(DEFAULT_VARIANTS)}; "
                    f"extra: {', '.join(EXTRA_VARIANTS)}; ablations (reuse trained weights): "
                    f"{', '.join(ABLATION_VARIANTS)}; IoU-Net loss weight / loss / refined score (issue 29): "
                    f"{', '.join(IOU_NET_VARIANTS)}")
    ap.add_argument("--out", default=None, help="results folder (default: benchmarks/results/accuracy_<setting>)")
    ap.add_argument("--runs", default=None, help="training runs folder (default: runs/accuracy_<setting>)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--amp", choices=["on", "off"], default=None,
                    help="mixed precision of the trainings on CUDA (default: train()'s, on for CUDA; "
                         "'off' trains in fp32 as on the CPU)")
    ap.add_argument("--inner-progress", action="store_true", help="also show the training/evaluation bars")
    return ap


def command_of(args: argparse.Namespace, prog: str = "locconf bench") -> str:
    """The command line that repeats ``args`` (recorded in the report)."""
    words = ["--setting", args.setting, "--seeds", *map(str, args.seeds)]
    if args.iterations is not None:
        words += ["--iterations", str(args.iterations)]
    words += ["--variants", *args.variants]
    for flag, value in (("--out", args.out), ("--runs", args.runs), ("--threads", args.threads),
                        ("--device", args.device)):
        if value is not None:
            words += [flag, str(value)]
    if args.amp is not None:
        words += ["--amp", args.amp]
    if args.inner_progress:
        words.append("--inner-progress")
    return f"{prog} " + " ".join(shlex.quote(w) for w in words)


def _check(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    if args.iterations is not None and args.iterations < 1:
        raise SystemExit("--iterations must be >= 1")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        raise SystemExit("--seeds must be distinct non-negative ints")


def run(args: argparse.Namespace, root: str | Path = ".", command: str | None = None) -> int:
    """Run the comparison ``args`` describe and print its table; 1 when a run failed.

    The default ``--out`` and ``--runs`` are ``<root>/benchmarks/results/accuracy_<setting>`` and
    ``<root>/runs/accuracy_<setting>``; ``command`` is recorded in the report (default: :func:`command_of`).
    """
    import torch

    from .run import run_benchmark

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _check(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    setting = SETTINGS[args.setting](args.iterations)
    names = list(dict.fromkeys(args.variants))
    root = Path(root)
    out = Path(args.out or root / "benchmarks" / "results" / f"accuracy_{args.setting}")
    runs = Path(args.runs or root / "runs" / f"accuracy_{args.setting}")
    results = run_benchmark(setting, [ALL_VARIANTS[n] for n in names], args.seeds, out, runs, device=args.device,
                            inner_progress=args.inner_progress, amp=None if args.amp is None else args.amp == "on",
                            command=command_of(args) if command is None else command)
    print((out / "table.md").read_text())
    failed = [f"{n} seed {s}: {r['error']}" for n, info in results["variants"].items()
              for s, r in info["runs"].items() if r.get("error")]
    if failed:
        print("FAILED runs:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0
