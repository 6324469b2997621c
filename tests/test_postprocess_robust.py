"""Post-processing on hostile input: bools as numbers, huge coordinates and labels, malformed unused
signals, bounded memory (issues 14 and 15). References: the plain sequential ones of
tests/test_postprocess.py."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from locconf import postprocess as pp
from locconf.postprocess import kernel, rounds
from test_postprocess import assert_matches, detector_like, gaussian, hard, linear, ref_greedy, ref_iou_guided

BACKENDS = ["numba", "torch"]


def run_method(name, boxes, scores, labels, quality, variances, backend):
    """(keep, new_scores, new_boxes or None) of one method, on one backend."""
    if name == "nms":
        keep = pp.nms(boxes, scores, labels, backend=backend)
        return keep, scores[keep], None
    if name in ("soft-linear", "soft-gaussian"):
        return (*pp.soft_nms(boxes, scores, labels, method=name[5:], backend=backend), None)
    if name == "iou-guided":
        return (*pp.iou_guided_nms(boxes, scores, quality, labels, backend=backend), None)
    if name == "quality":
        return (*pp.quality_nms(boxes, scores, quality, labels, backend=backend), None)
    keep, new_boxes, new_scores = pp.var_voting(boxes, scores, variances, labels, backend=backend,
                                                suppression="soft" if name.endswith("+soft") else "hard")
    return keep, new_scores, new_boxes


def reference(name, boxes, scores, labels, quality, variances):
    if name == "nms":
        return ref_greedy(boxes, scores, labels, hard(0.5))
    if name == "soft-linear":
        return ref_greedy(boxes, scores, labels, linear(0.3), min_score=1e-3)
    if name == "soft-gaussian":
        return ref_greedy(boxes, scores, labels, gaussian(0.5), min_score=1e-3)
    if name == "iou-guided":
        return [(i, s, None) for i, s in ref_iou_guided(boxes, scores, quality, labels, 0.5)]
    if name == "quality":
        return ref_greedy(boxes, scores**0.5 * quality**0.5, labels, hard(0.5))
    if name == "var-voting":
        return ref_greedy(boxes, scores, labels, hard(0.5), variances=variances)
    return ref_greedy(boxes, scores, labels, gaussian(0.5), 1e-3, variances=variances)


NAMES = ["nms", "soft-linear", "soft-gaussian", "iou-guided", "quality", "var-voting", "var-voting+soft"]


# ------------------------------------------------------------------------------------------
# Booleans are not numbers
# ------------------------------------------------------------------------------------------


def test_postprocess_rejects_bool_max_detections():
    cand = dict(boxes=torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), scores=torch.tensor([0.9, 0.8]))
    with pytest.raises(ValueError, match="max_detections"):
        pp.postprocess(cand, "nms", max_detections=True)
    with pytest.raises(ValueError, match="max_detections"):
        pp.postprocess(cand, "nms", max_detections=False)
    assert len(pp.postprocess(cand, "nms", max_detections=1)["boxes"]) == 1


@pytest.mark.parametrize(
    "method, name",
    [
        ("nms", "iou_threshold"),
        ("soft-gaussian", "iou_threshold"),
        ("soft-gaussian", "sigma"),
        ("soft-linear", "min_score"),
        ("iou-guided", "iou_threshold"),
        ("quality", "iou_threshold"),
        ("quality", "weight"),
        ("quality", "sigma"),
        ("quality", "min_score"),
        ("quality+soft-gaussian", "sigma"),
        ("var-voting", "iou_threshold"),
        ("var-voting", "sigma_t"),
        ("var-voting+soft", "soft_sigma"),
        ("var-voting+soft", "min_score"),
    ],
)
@pytest.mark.parametrize("value", [True, False])
def test_bool_parameters_rejected(method, name, value):
    boxes, scores, labels, quality, variances = detector_like(20, 2, seed=1)
    cand = dict(boxes=boxes, scores=scores, labels=labels, quality=quality, variances=variances)
    with pytest.raises(ValueError, match=name):
        pp.postprocess(cand, method, **{name: value})


def test_var_voting_min_score_validated():
    boxes, scores, labels, _, variances = detector_like(20, 2, seed=1)
    with pytest.raises(ValueError, match="min_score"):
        pp.var_voting(boxes, scores, variances, labels, suppression="soft", min_score=-1.0)


# ------------------------------------------------------------------------------------------
# Per-class suppression is exact for any finite input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_duplicate_suppressed_beside_a_huge_box(name, backend):
    # Two identical boxes of class 1 and one far away box of class 0: the duplicate must go.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [1e18, 1e18, 1e18 + 4096, 1e18 + 4096]],
                         dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    labels = torch.tensor([1, 1, 0])
    quality = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    variances = torch.ones(3, 4, dtype=torch.float64)
    keep, new_scores, new_boxes = run_method(name, boxes, scores, labels, quality, variances, backend)
    assert_matches(keep, new_scores, reference(name, boxes, scores, labels, quality, variances), new_boxes)
    if "soft" not in name:
        assert keep.tolist() == [0, 2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_huge_coordinates_and_labels(name, backend):
    """Detector-like clusters moved far out, with labels at the ends of int64."""
    boxes, scores, labels, quality, variances = detector_like(60, 3, seed=4)
    shift = torch.tensor([0.0, 1e15, -1e15], dtype=torch.float64)[labels][:, None]
    boxes = boxes * 2.0**20 + shift
    labels = torch.tensor([-(2**63), 2**62, 2**63 - 1])[labels]
    keep, new_scores, new_boxes = run_method(name, boxes, scores, labels, quality, variances, backend)
    ref = reference(name, boxes, scores, labels, quality, variances)
    assert keep.tolist() == [r[0] for r in ref]
    torch.testing.assert_close(new_scores, torch.tensor([r[1] for r in ref], dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nms_classes_far_apart_match_reference(backend):
    """Classes that the coordinate-offset trick cannot separate exactly."""
    boxes, scores, labels, _, _ = detector_like(80, 4, seed=7)
    boxes = boxes + 0.1  # not representable: any shift rounds
    boxes[labels == 3] += 1e17
    for lab in (labels, labels * 2**60):
        ref = ref_greedy(boxes, scores, lab, hard(0.5))
        keep = pp.nms(boxes, scores, lab, backend=backend)
        assert keep.tolist() == [r[0] for r in ref]


# ------------------------------------------------------------------------------------------
# Every signal present is validated, used or not
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["nms", "soft-gaussian", "var-voting"])
def test_unused_quality_validated(method):
    boxes, scores, labels, quality, variances = detector_like(10, 2, seed=2)
    base = dict(boxes=boxes, scores=scores, labels=labels, variances=variances)
    with pytest.raises(ValueError, match=r"quality must have shape \(10,\)"):
        pp.postprocess({**base, "quality": quality[:7]}, method)
    with pytest.raises(ValueError, match="quality must be finite"):
        pp.postprocess({**base, "quality": torch.full((10,), math.nan, dtype=quality.dtype)}, method)
    with pytest.raises(ValueError, match="quality must be a floating-point"):
        pp.postprocess({**base, "quality": torch.ones(10, dtype=torch.long)}, method)
    with pytest.raises(ValueError, match="quality must be a torch.Tensor"):
        pp.postprocess({**base, "quality": [0.5] * 10}, method)


@pytest.mark.parametrize("method", ["nms", "soft-linear", "iou-guided", "quality+soft-gaussian"])
def test_unused_variances_validated(method):
    boxes, scores, labels, quality, variances = detector_like(10, 2, seed=2)
    base = dict(boxes=boxes, scores=scores, labels=labels, quality=quality)
    with pytest.raises(ValueError, match=r"variances must have shape \(10, 4\)"):
        pp.postprocess({**base, "variances": variances[:, :3]}, method)
    with pytest.raises(ValueError, match="variances must be finite and positive"):
        pp.postprocess({**base, "variances": -variances}, method)


def test_absent_signals_are_fine():
    boxes, scores, labels, _, _ = detector_like(10, 2, seed=2)
    out = pp.postprocess(dict(boxes=boxes, scores=scores, labels=labels, quality=None), "nms")
    assert set(out) == {"boxes", "scores", "labels"}


# ------------------------------------------------------------------------------------------
# Bounded memory
# ------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(n=st.integers(0, 60), c=st.integers(1, 3), seed=st.integers(0, 10_000), chunk=st.integers(1, 50),
       store=st.sampled_from([0, 30, 10**9]), same=st.booleans())
def test_torch_backend_in_small_chunks_matches_reference(n, c, seed, chunk, store, same):
    """The torch backend evaluates at most ``_PAIR_CHUNK`` candidate pairs at once and keeps at most
    ``_PAIR_STORE`` overlapping pairs (else enumerates them afresh); neither changes the result."""
    boxes, scores, labels, quality, variances = detector_like(n, c, seed=seed, ties=True)
    if same:  # many identical boxes: every pair overlaps
        boxes[: n // 2] = boxes[:1]
    seen = []
    original, original_store, original_chunks = rounds._PAIR_CHUNK, rounds._PAIR_STORE, rounds._pair_chunks

    def recording(lo, hi, size):
        for r, c_ in original_chunks(lo, hi, size):
            seen.append(r.numel())
            yield r, c_

    rounds._PAIR_CHUNK, rounds._PAIR_STORE, rounds._pair_chunks = chunk, store, recording
    try:
        for name in NAMES:
            keep, new_scores, new_boxes = run_method(name, boxes, scores, labels, quality, variances, "torch")
            ref = reference(name, boxes, scores, labels, quality, variances)
            assert keep.tolist() == [r[0] for r in ref], name
            torch.testing.assert_close(new_scores.double(), torch.tensor([r[1] for r in ref], dtype=torch.float64),
                                       rtol=1e-9, atol=1e-12)
            if new_boxes is not None and ref:
                torch.testing.assert_close(new_boxes, torch.tensor([r[2] for r in ref], dtype=torch.float64),
                                           rtol=1e-9, atol=1e-9)
    finally:
        rounds._PAIR_CHUNK, rounds._PAIR_STORE, rounds._pair_chunks = original, original_store, original_chunks
    assert all(k <= chunk for k in seen)


def test_torch_backend_keeps_at_most_the_store():
    boxes, scores, labels, _, _ = detector_like(300, 1, seed=3)
    sw = rounds._Sweep(boxes.double(), None)
    live = torch.ones(300, dtype=torch.bool)
    everything = rounds._Pairs(sw, live, 64, 10**9)
    assert everything.stored is not None and 100 < everything.stored[0].numel() <= 300 * 299 // 2
    assert rounds._Pairs(sw, live, 64, everything.stored[0].numel() - 1).stored is None


def test_numba_backend_bands_do_not_change_the_result():
    boxes, scores, labels, _, variances = detector_like(400, 2, seed=8, ties=True)
    for mode, thr, floor in ((0, 0.5, -math.inf), (1, 0.3, 1e-3), (2, 0.3, 1e-3)):
        outs = [kernel._greedy_numba(boxes, scores, labels, mode, thr, 0.5, floor, variances, 0.02, band_size=bs)
                for bs in (1, 7, 64, 10**9)]
        for o in outs[1:]:
            assert torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1]) and torch.equal(o[2], outs[0][2])
            torch.testing.assert_close(o[3], outs[0][3], rtol=1e-12, atol=1e-9)


def test_many_identical_boxes_in_bounded_memory():
    """100,000 identical boxes: every pair overlaps (5e9 pairs), yet each method needs O(N) memory.

    Measured in a fresh process: the growth of the peak resident memory during the calls."""
    code = textwrap.dedent(
        """
        import resource, torch
        from locconf import postprocess as pp
        n = 100_000
        g = torch.Generator().manual_seed(0)
        cand = dict(boxes=torch.tensor([[10.0, 20.0, 110.0, 220.0]]).repeat(n, 1), scores=torch.rand(n, generator=g),
                    labels=torch.zeros(n, dtype=torch.long), quality=torch.rand(n, generator=g),
                    variances=torch.ones(n, 4))
        small = {k: v[:50] for k, v in cand.items()}
        for m in pp.METHODS:
            pp.postprocess(small, m)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for m in pp.METHODS:
            out = pp.postprocess(cand, m)
            assert len(out["boxes"]) >= 1, m
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split()[-1]) < 300  # MiB; pairs would need tens of GB
