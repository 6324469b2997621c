"""MkDocs hooks of the locconf site (``hooks:`` in mkdocs.yml). Nothing here reaches the network.

* :func:`on_files`: the committed benchmark results (``benchmarks/results/**``: tables, plots,
  JSON) become files of the site at the same paths, so pages link to them as
  ``benchmarks/results/...`` relative to the site root and ``--strict`` checks those links.
* :func:`on_page_markdown`: the CLI reference (``cli.md``) gets every command's ``--help``, made
  from :func:`locconf.cli.build_parser` at build time, where the page says
  ``<!-- cli-reference -->``.
* :func:`on_page_content`: Sphinx-style roles left in docstrings (``:func:`x```) are shown as
  plain code.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]

#: Repository folders published in the site at the same relative path, and the suffixes taken.
PUBLISHED = {"benchmarks/results": {".md", ".png", ".json"}}

CLI_MARKER = "<!-- cli-reference -->"


def on_files(files, config, **kwargs):
    for folder, suffixes in PUBLISHED.items():
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in suffixes:
                uri = path.relative_to(ROOT).as_posix()
                if files.get_file_from_path(uri) is None:
                    files.append(File(uri, src_dir=str(ROOT), dest_dir=config["site_dir"],
                                      use_directory_urls=config["use_directory_urls"]))
    return files


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name), sub


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    for name, help_text, sub in _subcommands(parser):
        yield path + (name,), help_text, sub
        yield from _walk(sub, path + (name,))


def cli_reference() -> str:
    """Markdown: ``locconf --help`` and every (sub-)command's ``--help``, as the parser prints them."""
    sys.path.insert(0, str(ROOT / "src"))
    try:
        from locconf.cli import build_parser
    finally:
        sys.path.pop(0)
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to this width
    try:
        parser = build_parser()
        parts = ["## locconf", "", "```text", parser.format_help().rstrip(), "```", ""]
        for path, help_text, sub in _walk(parser, ()):
            parts += [f"{'#' * min(2 + len(path) - 1, 4)} locconf {' '.join(path)}", ""]
            if help_text:
                parts += [help_text[0].upper() + help_text[1:] + ".", ""]
            parts += ["```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(parts)


_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+/)\)")


def on_page_markdown(markdown, page, config, files, **kwargs):
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if any(page.file.src_uri.startswith(folder + "/") for folder in PUBLISHED):
        # a published table's link to a folder (fine on GitHub) is not a page of the site: show its path
        markdown = _LINK.sub(lambda m: m.group(1) if m.group(1).startswith("`") else f"`{m.group(2)}`", markdown)
    return markdown


_ROLE = re.compile(r":(?:py:)?(?:func|mod|class|meth|attr|data|exc|obj|const|ref):(<code>)")


def on_page_content(html, page, config, files, **kwargs):
    return _ROLE.sub(r"\1", html)
