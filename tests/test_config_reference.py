"""The configuration reference: every key the check accepts, with a type, a default and a meaning, and nothing else."""

from __future__ import annotations

import inspect
import re

import pytest

from locconf.cli import main
from locconf.experiment import ARCHS, SECTIONS, SYNTHETIC_DEFAULTS, check_config, config_key_docs, config_reference
from locconf.experiment.keywords import argument_docs

#: A value of the wrong type for any key: no annotation of a configuration key accepts a set.
NOT_A_VALUE = {"a set"}


def accepted(section: str, key: str, arch: str = "rcnn") -> bool:
    """Whether the check knows ``section.key``: a known key holding a wrong value fails on its type, not as unknown."""
    cfg = {"model": {"arch": arch}}
    node = cfg.setdefault(section, {})
    if "." in key:  # data.synthetic.<key>
        parent, key = key.split(".")
        node = node.setdefault(parent, {})
    node[key] = NOT_A_VALUE
    try:
        check_config(cfg)
    except ValueError as e:
        return "unknown key" not in str(e)
    raise AssertionError(f"{section}.{key}: the check accepted {NOT_A_VALUE!r}")


def test_every_key_has_a_type_a_default_and_a_meaning():
    rows = config_key_docs()
    assert {r.section for r in rows} == set(SECTIONS)
    assert {r.arch for r in rows} == {None, *ARCHS}
    for r in rows:
        assert r.type and r.default, r
        assert len(r.meaning) > 10, f"{r.section}.{r.key} ({r.source}) has no meaning: add it to its docstring's Args"


def test_the_reference_is_what_the_check_accepts():
    """A key the check accepts that the reference lacks fails, and so does a key it lists that the check refuses."""
    rows = config_key_docs()
    for r in rows:
        assert accepted(r.section, r.key, r.arch or "rcnn"), f"{r.section}.{r.key} is listed but refused"
    # every name the check could accept, read from the functions' signatures independently of the reference
    from locconf.engine.train import train
    from locconf.evaluation import evaluate_methods
    from locconf.experiment import build_datasets, build_model
    from locconf.experiment.build import model_builder

    listed = {(r.section, r.key, r.arch) for r in rows}
    candidates = [("model", p, None) for p in inspect.signature(build_model).parameters if p != "kwargs"]
    for arch in ARCHS:
        params = list(inspect.signature(model_builder(arch)).parameters.values())[1:]
        candidates += [("model", p.name, arch) for p in params  # **options: the wrapped builder's own keywords
                       if p.name not in inspect.signature(build_model).parameters and p.kind is not p.VAR_KEYWORD]
    candidates += [("data", p, None) for p in inspect.signature(build_datasets).parameters]
    candidates += [("data", f"synthetic.{k}", None) for k in SYNTHETIC_DEFAULTS]
    candidates += [("train", p, None) for p in list(inspect.signature(train).parameters)[2:]]
    candidates += [("eval", p, None) for p in list(inspect.signature(evaluate_methods).parameters)[2:]]
    for section, key, arch in candidates:
        if accepted(section, key, arch or "rcnn"):
            assert (section, key, arch) in listed, f"the check accepts {section}.{key} ({arch}), the reference lacks it"
        else:
            assert (section, key, arch) not in listed


def test_types_and_defaults_come_from_the_signatures():
    rows = {(r.section, r.key, r.arch): r for r in config_key_docs()}
    assert rows["train", "lr", None].type == "a number"
    assert rows["train", "lr", None].default == "0.02"
    assert rows["train", "iterations", None].default == "required"
    assert rows["train", "out_dir", None].default == '"runs/default"'  # what locconf train puts there
    assert rows["train", "steps", None].type == "a list of numbers" and rows["train", "steps", None].default == "[0.7, 0.9]"
    assert rows["train", "clip_grad_norm", None].type == "a number or null"
    assert rows["eval", "methods", None].type == "a list of strings"
    assert rows["model", "quality", "rcnn"].type == "a string or null"
    assert rows["model", "head", "one_stage"].default == '"atss"'
    assert rows["data", "synthetic.seed", None].default == "0"
    # the same words as the check's error
    with pytest.raises(ValueError, match="train.steps must be " + rows["train", "steps", None].type):
        check_config({"train": {"steps": "late"}})


def test_a_shared_entry_is_completed_by_the_function_it_names():
    """build_rcnn documents fpn_channels, returned_layers, norm, ... together, pointing to build_fpn_backbone."""
    from locconf.models.backbone import build_fpn_backbone

    rows = {(r.section, r.key, r.arch): r for r in config_key_docs()}
    own = argument_docs(build_fpn_backbone)
    for key in ("norm", "norm_groups", "frozen_stages", "fpn_channels"):
        meaning = rows["model", key, "rcnn"].meaning
        first = own[key].replace("``", "`").rstrip(".")
        assert meaning.startswith(first), (key, meaning)
        assert "build_fpn_backbone" in meaning  # the shared text follows
    assert rows["model", "weights", "one_stage"].meaning.startswith("`None`, `\"imagenet\"` or a local file path")


def test_argument_docs_reads_google_style_entries():
    def fn(a, b, c, d, *args, **kwargs):
        """Summary.

        Args:
            a: first line
                continued.
            b, c (int): shared
                text.
            d: the last one: with a colon.
            **kwargs: left out.

        Returns:
            e: not an argument.
        """

    assert argument_docs(fn) == {"a": "first line continued.", "b": "shared text.", "c": "shared text.",
                                 "d": "the last one: with a colon."}
    assert argument_docs(lambda x: x) == {}


def test_markdown_and_text_forms(capsys):
    md = config_reference()
    for section in SECTIONS:
        assert f"### {section}" in md
    for arch in ARCHS:
        assert f"### model, arch: {arch} (`" in md
    row = re.search(r"^\| `train\.lr` \| a number \| `0\.02` \| (.+) \|$", md, re.M)
    assert row and "learning rate" in row.group(1)
    assert "``" not in md and ":func:" not in md  # docstring markup turned into Markdown
    only = config_reference("markdown", section="model", arch="one_stage")
    assert "arch: one_stage" in only and "arch: rcnn" not in only and "### train" not in only
    with pytest.raises(ValueError, match="section must be one of"):
        config_reference(section="optimizer")
    assert main(["config", "keys", "train"]) == 0
    out = capsys.readouterr().out
    assert "  train.lr: a number; default 0.02\n" in out and "model." not in out
    assert main(["config", "keys", "--markdown", "eval"]) == 0
    assert capsys.readouterr().out == config_reference("markdown", section="eval")
