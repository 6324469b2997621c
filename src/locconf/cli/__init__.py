"""The ``locconf`` command: one module per sub-command, and the habits they share.

* ``locconf --version``; every ``--help`` shows its defaults and choices.
* ``-q/--quiet`` and ``-v/--verbose`` (before or after the sub-command) set the level of the
  ``locconf`` loggers, which write to standard error; results go to standard output.
* A user error (a bad value, a missing or wrong file, a refused output, a configuration error:
  ``ValueError`` and ``OSError``) prints one line ``locconf <command>: error: ...`` on standard
  error and exits with 2; Ctrl-C prints ``locconf <command>: interrupted`` and exits with 130,
  SIGTERM ``terminated`` and 143, also when a library turned the interrupt into another exception
  (an import cut short, say). Any other exception keeps its traceback. ``--debug`` (or
  ``LOCCONF_DEBUG=1``) shows the traceback of every error.

Each sub-command module (``train``, ``eval``, ...) has ``add_parser(sub, parents)`` and ``run(args)``;
:func:`run_command` runs a command line and lets its exceptions through (for tests and scripts),
:func:`main` is the console entry point.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback

from .. import __version__
from . import bench, config, data, demo, evaluate, export, postprocess, predict, train
from ._common import HelpFormatter

__all__ = ["build_parser", "main", "run_command", "configure_logging"]

#: The sub-command modules, in the order ``locconf --help`` lists them.
COMMANDS = (data, train, evaluate, predict, demo, postprocess, export, bench, config)

#: Exceptions that are the user's to fix: reported in one line, exit code 2.
USER_ERRORS = (ValueError, OSError)


def _shared_options() -> argparse.ArgumentParser:
    """``-q``, ``-v`` and ``--debug``, accepted before and after the sub-command."""
    shared = argparse.ArgumentParser(add_help=False)
    group = shared.add_argument_group("output")
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="only warnings and errors on standard error")
    group.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="more messages (debug level)")
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Python traceback of every error (also LOCCONF_DEBUG=1)")
    return shared


def build_parser() -> argparse.ArgumentParser:
    shared = _shared_options()
    parser = argparse.ArgumentParser(prog="locconf", description="Localization-confidence-aware object detection.",
                                     parents=[shared], formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"locconf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub, [shared])
    return parser


def configure_logging(verbosity: int = 0) -> None:
    """Send the ``locconf`` loggers' records to standard error: WARNING (-1), INFO (0) or DEBUG (>= 1).

    Only the ``locconf`` logger tree is configured (other libraries' loggers are left as they are);
    calling it again replaces the handler it installed.
    """
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    root = logging.getLogger("locconf")
    for handler in [h for h in root.handlers if getattr(h, "_locconf_cli", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbosity > 0 else "%(message)s"))
    handler._locconf_cli = True
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def run_command(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; exceptions propagate (see :func:`main`)."""
    args = build_parser().parse_args(argv)
    verbosity = -1 if getattr(args, "quiet", False) else int(getattr(args, "verbose", 0) or 0)
    configure_logging(verbosity)
    return args.func(args)


def _one_line(error: BaseException) -> str:
    """The message of ``error`` on one line; an ``OSError`` without its ``[Errno N]`` prefix."""
    text = str(error)
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
        if error.filename is not None:
            text = f"{error.filename}: {text}"
        if error.filename2 is not None:
            text = f"{text} (-> {error.filename2})"
    text = " ".join(text.split())
    return text or type(error).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that locks, temporary files and half outputs are cleaned up."""


#: The last SIGINT/SIGTERM that :func:`main` received (None: none), so that an interrupt that a
#: library turned into another exception is still reported as an interrupt.
_received: list[int] = []


def _on_signal(signum, frame):
    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _install_handlers() -> dict:
    """Our SIGINT/SIGTERM handlers (main thread only; an ignored SIGINT stays ignored); the previous ones."""
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
                continue
            previous[signum] = signal.signal(signum, _on_signal)
        except ValueError:  # not the main thread: leave the signals alone
            break
    return previous


def _interrupted(prog: str, signum: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    terminated = signum == signal.SIGTERM
    print(f"{prog}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return 143 if terminated else 130


def main(argv: list[str] | None = None) -> int:
    """The console entry point: :func:`run_command` with one-line errors (see the module docstring).

    SIGTERM is turned into :class:`Terminated` (exit 143), so a terminated command cleans up as an
    interrupted one does (exit 130). An exception of any other type raised after one of these
    signals arrived is reported as the interruption it stands for.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    _received.clear()
    previous = _install_handlers()
    debug = "--debug" in argv or os.environ.get("LOCCONF_DEBUG", "").strip() not in ("", "0")
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"locconf {command}" if command else "locconf"
    try:
        return run_command(argv)
    except KeyboardInterrupt as e:
        return _interrupted(prog, signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT, debug)
    except Exception as e:
        if _received:
            return _interrupted(prog, _received[-1], debug)
        if not isinstance(e, USER_ERRORS):
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
