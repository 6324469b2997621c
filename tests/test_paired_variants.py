"""benchmarks/paired_variants.py: paired differences between two variants of an accuracy comparison,
checked against differences written out by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paired_variants.py"


def _module():
    spec = importlib.util.spec_from_file_location("paired_variants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(ap, ap75, method="iou-guided"):
    return {"methods": {method: {"AP": ap, "AP50": 0.5, "AP75": ap75, "AP90": -1}}}


RESULTS = {"meta": {"setting": "synthetic", "seeds": [0, 1, 2]},
           "variants": {"a": {"runs": {"0": _run(0.30, 0.20), "1": _run(0.34, 0.22), "2": _run(0.50, 0.40)}},
                        "b": {"runs": {"0": _run(0.28, 0.21), "1": _run(0.30, 0.20)}}}}


def test_paired_differences_by_hand(tmp_path):
    module = _module()
    table = module.paired_table(RESULTS, [("a", "b")], ["iou-guided", "nms"])
    row = [line for line in table.splitlines() if line.startswith("| a | b | iou-guided")]
    assert len(row) == 1 and "nms" not in table.split("iou-guided")[-1]  # no nms rows: neither has it
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    # seeds 0 and 1 only (b lacks seed 2): dAP = +2, +4 -> mean 3, std sqrt(2); dAP75 = -1, +2 -> 0.5 +- 2.1
    assert cells[3] == "2"
    assert cells[4] == "+3.0 ± 1.4" and cells[6] == "+0.5 ± 2.1"
    assert cells[5] == "+0.0 ± 0.0" and cells[7] == "-"  # AP90 = -1 is COCO's "undefined"
    assert cells[8] == "+2.0, +4.0"
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    assert module.main([str(tmp_path), "--pair", "a", "b"]) == 0
    assert "| a | b | iou-guided | 2 |" in (tmp_path / "paired.md").read_text()
    with pytest.raises(SystemExit, match="no runs of variant 'c'"):
        module.main([str(tmp_path), "--pair", "a", "c"])
