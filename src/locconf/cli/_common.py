"""What several sub-commands share: the help format, method keywords, progress and report printing."""

from __future__ import annotations

import argparse
import json


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; every option's help ends with its default (unless None or off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default in (None, False, argparse.SUPPRESS) or default == []
                or not action.option_strings or isinstance(action, argparse._VersionAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def add_parser(sub, name: str, parents, **kwargs) -> argparse.ArgumentParser:
    """A sub-command parser with the shared options and :class:`HelpFormatter`."""
    return sub.add_parser(name, parents=parents, formatter_class=HelpFormatter, **kwargs)


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (bars are also off when standard error is not a terminal, "
                             "or with TQDM_DISABLE=1)")


def add_set_flag(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable): configuration overrides for :func:`locconf.experiment.load_config`."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a configuration key, e.g. --set train.lr=0.005 --set data.synthetic.num_train=50 "
                             "(the value is YAML; repeatable; checked like the file's keys; list them with "
                             "'locconf config keys')")
def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-weights", action="store_true",
                        help="let model.weights load even if the file stores Python objects (torch.load with "
                             "weights_only=False, which can run code): only for a file you trust")


def apply_trust_flag(cfg: dict | None, trust: bool) -> None:
    """``--trust-weights``: set ``model.trust_weights`` (only the ``torchvision`` architecture reads weight files)."""
    if not trust:
        return
    if cfg is None or (cfg.get("model") or {}).get("arch") != "torchvision":
        raise ValueError("--trust-weights is for a configuration whose model is arch: torchvision with weights: FILE")
    cfg["model"]["trust_weights"] = True


def method_params(pairs: list[str], text: str | None) -> dict:
    """``--params JSON`` updated by each ``--param key=value`` (a value is JSON if it parses, else a string)."""
    params = {}
    if text is not None:
        try:
            params = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--params must be a JSON object, e.g. '{{\"sigma\": 0.5}}' ({e})") from None
        if not isinstance(params, dict):
            raise ValueError(f"--params must be a JSON object, got {text!r}")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param must be KEY=VALUE, got {pair!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def print_report(report: dict) -> None:
    """The table, correlations and calibration errors of a :func:`locconf.experiment.run_eval` report."""
    print(report["table"])
    corr = report["correlation"]
    if corr:
        print("\ncorrelation with the true IoU (candidates with IoU > 0.5):")
        for signal, c in corr.items():
            print(f"  {signal:9s} pearson {c['pearson']:+.3f}  spearman {c['spearman']:+.3f}  n={c['n']}")
    ece = (report.get("calibration") or {}).get("ece") or {}
    if ece:
        print("\nexpected calibration error as a predicted IoU (raw -> calibrated out-of-fold):")
        for signal, e in ece.items():
            after = f"{e['calibrated']:.3f}" if e.get("calibrated") is not None else "-"
            print(f"  {signal:9s} {e['raw']:.3f} -> {after}  n={e['n']}")
    print(f"\nresults, table and plots in {report['out_dir']}")
