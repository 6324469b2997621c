"""The candidates contract (locconf.candidates): one definition that post-processing and evaluation read."""

from __future__ import annotations

import typing

import pytest
import torch

from locconf import candidates as cmod
from locconf.candidates import SIGNALS, Candidates, check_fields, signals
from locconf.postprocess import METHODS, postprocess
from locconf.postprocess import SIGNALS as POSTPROCESS_SIGNALS


def _cands(n: int = 3, **extra) -> dict:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 70.0]])[:n]
    return {"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7])[:n], "labels": torch.ones(n, dtype=torch.long),
            **extra}


def test_typed_dict_is_a_plain_dict_with_required_and_optional_fields():
    c: Candidates = Candidates(**_cands())
    assert type(c) is dict
    assert Candidates.__required_keys__ == {"boxes", "scores", "labels"}
    assert {"quality", "variances", "cls_scores", "image_id"} <= Candidates.__optional_keys__
    hints = typing.get_type_hints(Candidates)
    assert hints["boxes"] is torch.Tensor and hints["image_id"] is int


def test_every_method_reads_only_candidate_signals():
    assert POSTPROCESS_SIGNALS is SIGNALS == ("quality", "variances")
    for name, method in METHODS.items():
        assert set(method.needs) <= set(SIGNALS), name
    # every signal is read by some method (no dead field in the contract)
    assert {s for m in METHODS.values() for s in m.needs} == set(SIGNALS)


def test_signals_lists_present_tensor_signals_in_order():
    assert signals(_cands()) == []
    assert signals(_cands(quality=torch.ones(3))) == ["quality"]
    assert signals(_cands(variances=torch.ones(3, 4), quality=torch.ones(3))) == ["quality", "variances"]
    assert signals(_cands(quality=None, cls_scores=torch.ones(3))) == []


def test_check_fields_names_the_bad_field():
    c = _cands()
    check_fields(c["boxes"], c["scores"], c["labels"], quality=torch.ones(3), variances=torch.ones(3, 4))
    with pytest.raises(ValueError, match="quality must have shape"):
        check_fields(c["boxes"], c["scores"], quality=torch.ones(2))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        check_fields(c["boxes"], c["scores"], c["labels"].float())
    with pytest.raises(ValueError, match="variances must be finite and positive"):
        check_fields(c["boxes"], c["scores"], variances=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="scores must be finite"):
        check_fields(c["boxes"], torch.tensor([0.1, float("nan"), 0.3]))
    check_fields(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))


def test_postprocess_validates_unused_signals_through_the_contract():
    with pytest.raises(ValueError, match="variances must have shape"):
        postprocess(_cands(variances=torch.ones(3, 3)), "nms")
    out = postprocess(_cands(cls_scores=torch.tensor([0.5, 0.4, 0.3]), image_id=7), "nms")
    assert set(out) == {"boxes", "scores", "labels", "cls_scores"}  # row fields kept, image_id dropped


def test_one_module_states_the_contract():
    assert cmod.__all__ == ["Candidates", "SIGNALS", "signals", "check_fields", "candidates_of"]
