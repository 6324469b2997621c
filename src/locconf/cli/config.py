"""``locconf config``: the configuration keys (``keys``) and a file as the commands would run it (``show``).

``locconf config keys [SECTION] [--arch ARCH] [--markdown]`` prints every key with its type,
default and meaning (:func:`locconf.experiment.config_reference`, generated from the functions
the configuration check uses). ``locconf config show FILE [--set KEY=VALUE ...]`` reads a file
with its ``_base_`` files and the overrides, checks it and prints the result as YAML.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_parser as _sub_parser
from ._common import add_set_flag
from .choices import ARCHS, SECTIONS


def add_parser(sub, parents) -> None:
    config = _sub_parser(sub, "config", parents, help="list the configuration keys; show a resolved config file",
                         description=__doc__.split("\n\n", 1)[1])
    actions = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    keys = _sub_parser(actions, "keys", parents, help="every configuration key with its type, default and meaning")
    keys.add_argument("section", nargs="?", choices=SECTIONS, default=None, help="only this section")
    keys.add_argument("--arch", choices=ARCHS, default=None, help="only this architecture's model keys")
    keys.add_argument("--markdown", action="store_true", help="Markdown tables (as in the documentation)")
    keys.set_defaults(func=run_keys)
    show = _sub_parser(actions, "show", parents,
                       help="a config file with its _base_ files and --set overrides, checked, as YAML")
    show.add_argument("config", type=Path, help="the YAML configuration")
    add_set_flag(show)
    show.set_defaults(func=run_show)


def run_keys(args: argparse.Namespace) -> int:
    from ..experiment import config_reference

    print(config_reference("markdown" if args.markdown else "text", section=args.section, arch=args.arch), end="")
    return 0


def run_show(args: argparse.Namespace) -> int:
    import yaml

    from ..experiment import load_config

    cfg = load_config(args.config, overrides=args.set)
    print(yaml.safe_dump({k: v for k, v in cfg.items() if v}, sort_keys=False), end="")
    return 0


def run(args: argparse.Namespace) -> int:
    return args.func(args)
