"""Every fenced code block of README.md and docs/**/*.md runs here, so that no example rots.

How a page's blocks run (one test per page, blocks in page order, in a fresh work folder):

* ```` ```python ```` blocks run in one Python namespace per page (a later block sees an earlier
  block's names), with the work folder as the current directory.
* ```` ```bash ````, ```` ```sh ```` and ```` ```shell ```` blocks run with ``bash -euo pipefail`` in the
  work folder, with the virtualenv's ``bin`` first on ``PATH`` (``locconf``, ``python``) and
  ``OMP_NUM_THREADS=1``. Every command must start with ``locconf``, ``python`` or
  ``.venv/bin/...`` (the work folder links ``.venv`` to the running virtualenv) or be one of a few
  harmless shell tools (:data:`SHELL_TOOLS`); anything else (``pip install``, ``torchrun``, ``git``)
  needs a ``no-test`` marker. In ```` ```console ```` blocks the lines starting with ``$ `` are the
  commands and the rest is output (not compared). A block of nothing but ``locconf`` commands in
  sequence runs them in the test's own process through :func:`locconf.cli.main` (the same
  command line, without an interpreter start-up per command); a non-zero exit fails it.
* ```` ```yaml ```` blocks are parsed (YAML 1.2 floats, as configs are read); a mapping whose keys
  are configuration sections (``model``, ``data``, ``train``, ``eval``) is checked with
  :func:`locconf.experiment.check_config`.
* Other blocks (```` ```text ````, ```` ```json ````, ```` ```console-output ````, no language) are
  not run: use them for output samples and formats.

Markers, HTML comments on the lines directly above a fence (invisible on GitHub and on the site):

* ``<!-- no-test: why -->``: the block is not run or checked (a long training, a library that is
  not a dependency, the set-up commands). The reason is required.
* ``<!-- test-file: NAME -->``: the block's text (after substitutions) is also written to NAME in
  the work folder, e.g. a config that a later ``locconf train NAME`` block uses.
* ``<!-- test-sub: OLD => NEW -->``: the block runs with the text OLD replaced by NEW (OLD must
  occur in the block): smaller settings for the test, e.g. ``iterations: 300 => iterations: 3``.
  Several may be stacked.

The work folder of a page starts with (made once per session by :func:`shared`):

* ``data/synthetic/``: a synthetic COCO dataset (``train.json``, ``val.json`` and PNG scenes;
  8 training and 4 validation scenes of 96 x 96 px, 2 classes), made by ``locconf data synthetic``;
* ``runs/tiny/``: a Faster R-CNN with a DIR head (ResNet-18, 16-channel FPN, 96 px) trained for 2
  iterations on it: ``config.yaml`` and ``checkpoint_0000002.pth`` (``checkpoint.pth`` links to it),
  in a folder of the page's own (files written beside the checkpoint stay in the page's folder);
* ``scene.png``: a 300 x 250 px image of synthetic objects, for ``locconf predict``;
* ``benchmarks`` and ``configs``: links to the repository's folders (scripts, committed results and
  configs: read them, do not write into them);
* ``.venv``: a link to the running virtualenv.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: The pages whose code blocks run: the README and every Markdown page of the documentation.
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))

#: Shell commands that may run besides ``locconf``, ``python`` and ``.venv/bin/...``.
SHELL_TOOLS = {"cd", "ls", "cat", "head", "tail", "mkdir", "cp", "mv", "echo", "wc", "test", "[", "true"}

PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell"}
CONSOLE = {"console"}
YAML = {"yaml", "yml"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s]*)[^`]*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<name>[\w-]+)\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$")
_MARKERS = ("no-test", "test-file", "test-sub")


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    markers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{_page_id(self.page)}:{self.line} ({self.lang or 'no language'} block)"

    def skipped(self) -> bool:
        return any(name == "no-test" for name, _ in self.markers)

    def runnable(self) -> bool:
        return not self.skipped() and (self.lang in PYTHON | SHELL | CONSOLE | YAML
                                       or any(n == "test-file" for n, _ in self.markers))

    def prepared(self) -> str:
        """The text to run: every ``test-sub`` applied (each OLD must occur)."""
        text = self.text
        for name, arg in self.markers:
            if name == "test-sub":
                old, new = (s.strip() for s in arg.split("=>", 1))
                if old not in text:
                    raise AssertionError(f"{self.where}: test-sub {old!r} does not occur in the block")
                text = text.replace(old, new)
        return text


def parse_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the markers directly above each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"].expandtabs()), m["fence"], m["info"].lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
            i += 1
        if i == len(lines):
            raise AssertionError(f"{_page_id(page)}:{start + 1}: code fence never closed")
        markers, j = [], start - 1
        while j >= 0 and _MARKER.match(lines[j]):
            mm = _MARKER.match(lines[j])
            markers.insert(0, (mm["name"], (mm["arg"] or "").strip()))
            j -= 1
        blocks.append(Block(page, start + 1, info, "\n".join(body) + "\n", markers))
        i += 1
    return blocks


def check_markers(block: Block) -> None:
    """Markers are known, carry what they need, and sit on a block they can apply to."""
    for name, arg in block.markers:
        if name not in _MARKERS:
            continue  # another HTML comment (e.g. a note to authors): not ours
        if name == "no-test" and not arg:
            raise AssertionError(f"{block.where}: <!-- no-test: ... --> needs a reason")
        if name == "test-file" and (not arg or arg.startswith("/") or ".." in Path(arg).parts):
            raise AssertionError(f"{block.where}: <!-- test-file: NAME --> needs a file name inside the work folder")
        if name == "test-sub" and "=>" not in arg:
            raise AssertionError(f"{block.where}: <!-- test-sub: OLD => NEW --> needs '=>'")
    if block.skipped() and len([n for n, _ in block.markers if n in _MARKERS]) > 1:
        raise AssertionError(f"{block.where}: a no-test block takes no other test marker")


def _strip_comments(text: str) -> str:
    """``text`` without its shell comments: a ``#`` that starts a word outside quotes, to the line's end."""
    out, quote, i = [], None, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and quote != "'":  # an escaped character: kept as it is
            out.append(text[i:i + 2])
            i += 2
            continue
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or text[i - 1] in " \t\n;&|("):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell block as word lists: quotes respected, comments dropped, continuation
    lines joined, split at newlines, ``&&``, ``||``, ``;``, ``|`` and ``&``."""
    lex = shlex.shlex(_strip_comments(text.replace("\\\n", " ")), posix=True, punctuation_chars=";&|()<>\n")
    lex.whitespace = " \t\r"
    lex.whitespace_split = True
    lex.commenters = ""
    commands, words = [], []
    for token in lex:
        if token and set(token) <= set(";&|\n"):
            if words:
                commands.append(words)
            words = []
        else:
            words.append(token)
    if words:
        commands.append(words)
    return commands


def check_shell(block: Block, text: str) -> None:
    for words in shell_commands(text):
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value prefixes
            words = words[1:]
        if not words:
            continue
        program = words[0]
        allowed = (program in ("locconf", "python", "python3") or program.startswith(".venv/bin/")
                   or program in SHELL_TOOLS)
        if not allowed or "pip" in words[:3] or "install" in words[:4]:
            raise AssertionError(f"{block.where}: the command {' '.join(words)!r} cannot run in the docs test; "
                                 "mark the block <!-- no-test: why --> or use locconf/python commands")


def console_text(text: str) -> str:
    """The commands of a console block: its ``$ `` lines (with their ``\\`` continuations)."""
    out, continuing = [], False
    for line in text.splitlines():
        if line.startswith("$ ") or continuing:
            command = line[2:] if line.startswith("$ ") and not continuing else line
            out.append(command)
            continuing = command.rstrip().endswith("\\")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# The shared starting folder: small data, a tiny trained checkpoint, an image
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    import numpy as np
    from PIL import Image

    from locconf.cli import run_command

    base = tmp_path_factory.mktemp("docs_shared")
    data = base / "data" / "synthetic"
    assert run_command(["-q", "data", "synthetic", "--out", str(data), "--num-train", "8", "--num-val", "4",
                        "--image-size", "96", "--num-classes", "2"]) == 0
    cfg = {
        "model": {"arch": "rcnn", "quality": "dir", "backbone": "resnet18", "fpn_channels": 16, "min_size": 96,
                  "max_size": 96, "candidates_per_image": 200},
        "data": {"source": "coco", "root": str(data), "train_json": "train.json", "val_json": "val.json"},
        "train": {"iterations": 2, "batch_size": 2, "lr": 0.01, "warmup_iters": 1, "clip_grad_norm": 10.0,
                  "out_dir": str(base / "runs" / "tiny"), "checkpoint_every": 2, "progress": False},
        "eval": {"methods": ["nms", "quality"]},
    }
    (base / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert run_command(["-q", "train", str(base / "tiny.yaml")]) == 0
    (base / "runs" / "tiny" / "checkpoint.pth").symlink_to("checkpoint_0000002.pth")
    scenes = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((data / "val").glob("*.png"))]
    canvas = np.full((250, 300, 3), 40, dtype=np.uint8)
    for k, scene in enumerate(scenes[:4]):
        y, x = 20 + (k // 2) * 110, 30 + (k % 2) * 140
        canvas[y:y + 96, x:x + 96] = scene
    Image.fromarray(canvas).save(base / "scene.png")
    return base


def work_folder(shared: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "runs").mkdir()
    (work / "data" / "synthetic").symlink_to(shared / "data" / "synthetic")
    (work / "runs" / "tiny").mkdir()
    for f in (shared / "runs" / "tiny").iterdir():  # own folder (eval writes beside the checkpoint), linked files
        target = work / "runs" / "tiny" / f.name
        if f.is_symlink():
            target.symlink_to(os.readlink(f))
        elif f.is_file():
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    (work / "scene.png").symlink_to(shared / "scene.png")
    (work / ".venv").symlink_to(Path(sys.prefix))
    (work / "benchmarks").symlink_to(ROOT / "benchmarks")
    (work / "configs").symlink_to(ROOT / "configs")
    return work


def locconf_commands(script: str) -> list[list[str]] | None:
    """The argument lists of a block that is only ``locconf`` commands run one after the other (newlines,
    ``&&`` or ``;`` between them; no pipe, redirection, background job or variable), else None."""
    lex = shlex.shlex(_strip_comments(script.replace("\\\n", " ")), posix=True, punctuation_chars=";&|()<>\n")
    lex.whitespace, lex.whitespace_split, lex.commenters = " \t\r", True, ""
    commands, words = [], []
    for token in list(lex) + ["\n"]:
        if token in ("\n", "&&", ";"):
            if words:
                if words[0] not in ("locconf", ".venv/bin/locconf") or any("$" in w or "*" in w for w in words):
                    return None
                commands.append(words[1:])
            words = []
        elif token and set(token) <= set(";&|()<>"):
            return None
        else:
            words.append(token)
    return commands


def run_in_process(block: Block, commands: list[list[str]], work: Path) -> None:
    """Run ``locconf`` commands through :func:`locconf.cli.main` in ``work``; a non-zero exit fails the block."""
    import contextlib
    import io

    from locconf.cli import main

    logger = logging.getLogger("locconf")  # main() configures it: put it back as it was afterwards
    saved = (list(logger.handlers), logger.level, logger.propagate)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for argv in commands:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
            if code != 0:
                raise AssertionError(f"{block.where}: `locconf {' '.join(argv)}` exited with {code}:\n"
                                     f"--- stdout:\n{out.getvalue()[-3000:]}\n--- stderr:\n{err.getvalue()[-3000:]}")
    finally:
        os.chdir(cwd)
        logger.handlers[:], logger.level, logger.propagate = saved


def _environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", MPLBACKEND="Agg")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_block(block: Block, work: Path, namespace: dict) -> None:
    from locconf.experiment import SECTIONS, check_config
    from locconf.experiment.config import ConfigLoader

    text = block.prepared()
    for name, arg in block.markers:
        if name == "test-file":
            (work / arg).parent.mkdir(parents=True, exist_ok=True)
            (work / arg).write_text(text, encoding="utf-8")
    if block.lang in PYTHON:
        code = compile(text, block.where, "exec")
        cwd = os.getcwd()
        os.chdir(work)
        try:
            exec(code, namespace)  # noqa: S102  (the documentation's own examples)
        except Exception as e:
            raise AssertionError(f"{block.where} failed: {type(e).__name__}: {e}") from e
        finally:
            os.chdir(cwd)
    elif block.lang in SHELL | CONSOLE:
        script = console_text(text) if block.lang in CONSOLE else text
        check_shell(block, script)
        commands = locconf_commands(script)
        if commands is not None:  # only `locconf ...` commands in sequence: run in this process (no start-up)
            run_in_process(block, commands, work)
            return
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=_environment(),
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise AssertionError(f"{block.where} exited with {done.returncode}:\n{script}\n--- stdout:\n"
                                 f"{done.stdout[-3000:]}\n--- stderr:\n{done.stderr[-3000:]}")
    elif block.lang in YAML:
        try:
            value = yaml.load(text, Loader=ConfigLoader)
        except yaml.YAMLError as e:
            raise AssertionError(f"{block.where}: not valid YAML: {e}") from e
        if isinstance(value, dict) and value and set(value) <= set(SECTIONS):
            try:
                check_config(value, source=block.where)
            except ValueError as e:
                raise AssertionError(str(e)) from e


RUNNABLE = [p for p in PAGES if any(b.runnable() for b in parse_blocks(p))]


def test_markers_are_well_formed():
    """Every page parses (fences closed), every marker is well formed and every no-test has a reason;
    the README and the pages hold at least one block that runs."""
    blocks = [b for page in PAGES for b in parse_blocks(page)]
    for block in blocks:
        check_markers(block)
    assert ROOT / "README.md" in RUNNABLE


def test_shell_command_rule():
    """The rule the shell blocks follow, on hand-written cases."""
    assert shell_commands("locconf train a.yaml \\\n  --resume && python -c 'x; y | z'  # note\n# comment\nls | head\n") == [
        ["locconf", "train", "a.yaml", "--resume"], ["python", "-c", "x; y | z"], ["ls"], ["head"]]
    ok = Block(ROOT / "README.md", 1, "bash", "")
    check_shell(ok, "OMP_NUM_THREADS=1 .venv/bin/locconf demo\nmkdir -p x && cd x\npython -c \"print('a;b')\"\n")
    for bad in ("pip install locconf\n", "python -m pip install x\n", "torchrun -m locconf.cli train a.yaml\n",
                "locconf eval a.yaml; git status\n", "python -c 'import os' | sh\n"):
        with pytest.raises(AssertionError, match="cannot run"):
            check_shell(ok, bad)
    assert locconf_commands("locconf data synthetic --out d  # x\nlocconf train a.yaml && locconf eval a.yaml\n") == [
        ["data", "synthetic", "--out", "d"], ["train", "a.yaml"], ["eval", "a.yaml"]]
    for shell_only in ("locconf eval a.yaml > log.txt\n", "locconf train a.yaml | tail\n", "python -c 'x'\n",
                       "locconf predict *.png --out x.png\n", "locconf train a.yaml || true\n"):
        assert locconf_commands(shell_only) is None, shell_only
    assert console_text("$ locconf data synthetic \\\n    --out d\ntrain: 8 scenes\n$ ls\nd\n") == (
        "locconf data synthetic \\\n    --out d\nls\n")


def test_markers_apply(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- test-sub: 300 => 3 -->\n<!-- test-file: a.yaml -->\n```yaml\ntrain: {iterations: 300}\n```\n"
                    "<!-- no-test: slow -->\n```bash\ntorchrun x\n```\n```text\nout\n```\n")
    a, b, c = parse_blocks(page)
    assert a.markers == [("test-sub", "300 => 3"), ("test-file", "a.yaml")] and a.prepared() == "train: {iterations: 3}\n"
    assert a.runnable() and not b.runnable() and b.skipped() and not c.runnable()
    bad = Block(page, 1, "yaml", "x: 1\n", [("test-sub", "y => z")])
    with pytest.raises(AssertionError, match="does not occur"):
        bad.prepared()
    with pytest.raises(AssertionError, match="reason"):
        check_markers(Block(page, 1, "bash", "", [("no-test", "")]))


@pytest.mark.parametrize("page", RUNNABLE, ids=_page_id)
def test_page_examples_run(page, shared, tmp_path):
    work = work_folder(shared, tmp_path)
    namespace: dict = {"__name__": "__docs_example__"}
    for block in parse_blocks(page):
        check_markers(block)
        if block.runnable():
            run_block(block, work, namespace)
