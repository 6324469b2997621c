"""Post-processing against plain sequential references written here, hand cases and properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from locconf import postprocess as pp

BACKENDS = ["numba", "torch"]


# ------------------------------------------------------------------------------------------
# Plain references: one box at a time, Python floats, written for the tests.
# ------------------------------------------------------------------------------------------


def iou(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_remaining(alive, s):
    """Index of the highest score among ``alive`` (ties: lowest index)."""
    return max(alive, key=lambda i: (s[i], -i))


def ref_greedy(boxes, scores, labels, decay, min_score=-math.inf, variances=None, sigma_t=0.02):
    """Generic greedy suppression; returns [(index, score, voted box or None)] in order."""
    b, s = boxes.tolist(), scores.tolist()
    lab = labels.tolist() if labels is not None else [0] * len(s)
    var = variances.tolist() if variances is not None else None
    alive = [i for i in range(len(s)) if s[i] >= min_score]
    out = []
    while alive:
        i = best_remaining(alive, s)
        alive.remove(i)
        voted = None
        if var is not None:
            num, den = [b[i][k] / var[i][k] for k in range(4)], [1 / var[i][k] for k in range(4)]
            for j in alive:
                o = iou(b[i], b[j])
                if lab[j] == lab[i] and o > 0:
                    p = math.exp(-((1 - o) ** 2) / sigma_t)
                    for k in range(4):
                        num[k] += p * b[j][k] / var[j][k]
                        den[k] += p / var[j][k]
            voted = [num[k] / den[k] for k in range(4)]
        out.append((i, s[i], voted))
        survivors = []
        for j in alive:
            if lab[j] == lab[i]:
                f = decay(iou(b[i], b[j]))
                s[j] *= f
                if f == 0 or s[j] < min_score:
                    continue
            survivors.append(j)
        alive = survivors
    return out


def hard(thr):
    return lambda o: 0.0 if o > thr else 1.0


def linear(thr):
    return lambda o: 1.0 - o if o >= thr else 1.0


def gaussian(sigma):
    return lambda o: math.exp(-o * o / sigma)


def ref_iou_guided(boxes, scores, quality, labels, thr):
    b, s, q = boxes.tolist(), scores.tolist(), quality.tolist()
    lab = labels.tolist() if labels is not None else [0] * len(s)
    alive, out = list(range(len(s))), []
    while alive:
        i = best_remaining(alive, q)
        cluster = [j for j in alive if j == i or (lab[j] == lab[i] and iou(b[i], b[j]) > thr)]
        out.append((i, max(s[j] for j in cluster)))
        alive = [j for j in alive if j not in cluster]
    return out


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


def detector_like(n, num_classes=1, seed=0, ties=False, dtype=torch.float64):
    """Boxes clustered around objects, as a detector produces them."""
    g = torch.Generator().manual_seed(seed)
    n_obj = max(1, n // 8)
    centres = torch.rand(n_obj, 2, generator=g, dtype=torch.float64) * 200
    sizes = 10 + torch.rand(n_obj, 2, generator=g, dtype=torch.float64) * 60
    obj = torch.randint(0, n_obj, (n,), generator=g)
    ctr = centres[obj] + torch.randn(n, 2, generator=g, dtype=torch.float64) * sizes[obj] * 0.2
    wh = sizes[obj] * torch.exp(torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.2)
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], 1)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    if ties:
        scores = (scores * 4).floor() / 4 + 0.1
    labels = torch.randint(0, num_classes, (n,), generator=g)
    quality = torch.rand(n, generator=g, dtype=torch.float64)
    variances = 0.05 + torch.rand(n, 4, generator=g, dtype=torch.float64)
    return boxes.to(dtype), scores.to(dtype), labels, quality.to(dtype), variances.to(dtype)


CASES = [(0, 1), (1, 1), (7, 1), (60, 1), (60, 3), (250, 4)]


def assert_matches(keep, new_scores, ref, new_boxes=None):
    assert keep.tolist() == [r[0] for r in ref]
    np.testing.assert_allclose(new_scores.double().numpy(), [r[1] for r in ref], rtol=1e-9, atol=1e-12)
    if new_boxes is not None and ref:
        np.testing.assert_allclose(new_boxes.double().numpy(), [r[2] for r in ref], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------
# Against the references
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,c", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_nms_matches_reference(n, c, ties):
    boxes, scores, labels, _, _ = detector_like(n, c, seed=n + c, ties=ties)
    for lab in (labels, None):
        ref = ref_greedy(boxes, scores, lab, hard(0.5))
        keep = pp.nms(boxes, scores, lab, iou_threshold=0.5)
        assert_matches(keep, scores[keep], ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("n,c", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_soft_nms_matches_reference(backend, method, n, c, ties):
    boxes, scores, labels, _, _ = detector_like(n, c, seed=n * 3 + c, ties=ties)
    decay = linear(0.3) if method == "linear" else gaussian(0.5)
    ref = ref_greedy(boxes, scores, labels, decay, min_score=1e-3)
    keep, new = pp.soft_nms(boxes, scores, labels, method=method, iou_threshold=0.3, sigma=0.5, backend=backend)
    assert_matches(keep, new, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_nms_min_score_drops_decayed_boxes(backend):
    boxes, scores, labels, _, _ = detector_like(120, 2, seed=11)
    ref = ref_greedy(boxes, scores, labels, gaussian(0.1), min_score=0.2)
    keep, new = pp.soft_nms(boxes, scores, labels, sigma=0.1, min_score=0.2, backend=backend)
    assert_matches(keep, new, ref)
    assert len(ref) < 120 and (new >= 0.2).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_iou_guided_nms_matches_reference(backend, n, c, ties):
    boxes, scores, labels, quality, _ = detector_like(n, c, seed=n * 5 + c, ties=ties)
    if ties:
        quality = (quality * 3).floor() / 3
    ref = ref_iou_guided(boxes, scores, quality, labels, 0.5)
    keep, new = pp.iou_guided_nms(boxes, scores, quality, labels, iou_threshold=0.5, backend=backend)
    assert_matches(keep, new, ref)


@pytest.mark.parametrize("n,c", CASES)
@pytest.mark.parametrize("weight", [0.0, 0.5, 0.8])
def test_quality_nms_matches_reference(n, c, weight):
    boxes, scores, labels, quality, _ = detector_like(n, c, seed=n * 7 + c)
    combined = scores ** (1 - weight) * quality**weight
    ref = ref_greedy(boxes, combined, labels, hard(0.5))
    keep, new = pp.quality_nms(boxes, scores, quality, labels, weight=weight)
    assert_matches(keep, new, ref)
    ref = ref_greedy(boxes, combined, labels, gaussian(0.5), min_score=1e-3)
    keep, new = pp.quality_nms(boxes, scores, quality, labels, weight=weight, soft="gaussian")
    assert_matches(keep, new, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("suppression", ["hard", "soft"])
@pytest.mark.parametrize("n,c", CASES)
def test_var_voting_matches_reference(backend, suppression, n, c):
    boxes, scores, labels, _, variances = detector_like(n, c, seed=n * 11 + c)
    if suppression == "hard":
        ref = ref_greedy(boxes, scores, labels, hard(0.5), variances=variances, sigma_t=0.02)
    else:
        ref = ref_greedy(boxes, scores, labels, gaussian(0.5), 1e-3, variances=variances, sigma_t=0.02)
    keep, new_boxes, new = pp.var_voting(boxes, scores, variances, labels, suppression=suppression,
                                         backend=backend)
    assert_matches(keep, new, ref, new_boxes)


def test_soft_nms_agrees_with_ensemble_boxes():
    """The peer (ensemble-boxes) keeps the same Gaussian Soft-NMS set; it returns undecayed scores."""
    ensemble_boxes = pytest.importorskip("ensemble_boxes")
    boxes, scores, labels, _, _ = detector_like(200, 3, seed=5)
    unit = (boxes - boxes.min()) / (boxes.max() - boxes.min())  # ensemble-boxes wants [0, 1]
    keep, _ = pp.soft_nms(unit, scores, labels, method="gaussian", sigma=0.5, min_score=1e-3)
    eb_boxes, eb_scores, _ = ensemble_boxes.soft_nms(
        [unit.numpy()], [scores.numpy()], [labels.numpy()], iou_thr=0.3, sigma=0.5, thresh=1e-3
    )
    ours = sorted(map(tuple, np.round(unit[keep].numpy(), 6).tolist()))
    theirs = sorted(map(tuple, np.round(eb_boxes, 6).tolist()))
    assert ours == theirs


# ------------------------------------------------------------------------------------------
# Hand-computed cases
# ------------------------------------------------------------------------------------------

# Box 1 has IoU exactly 0.5 with box 0 (overlap 1, union 2); box 2 is disjoint.
HAND_BOXES = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]])
HAND_SCORES = torch.tensor([0.9, 0.8, 0.3])


def test_hand_nms_threshold_is_strict():
    assert pp.nms(HAND_BOXES, HAND_SCORES, iou_threshold=0.5).tolist() == [0, 1, 2]
    assert pp.nms(HAND_BOXES, HAND_SCORES, iou_threshold=0.49).tolist() == [0, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_soft_nms(backend):
    keep, s = pp.soft_nms(HAND_BOXES, HAND_SCORES, method="gaussian", sigma=0.5, backend=backend)
    assert keep.tolist() == [0, 1, 2]  # box 1 decays to 0.8 * exp(-0.25 / 0.5) = 0.485 > 0.3
    assert s.tolist() == pytest.approx([0.9, 0.8 * math.exp(-0.5), 0.3])
    keep, s = pp.soft_nms(HAND_BOXES, HAND_SCORES, method="gaussian", sigma=0.1, backend=backend)
    assert keep.tolist() == [0, 2, 1]  # 0.8 * exp(-0.25 / 0.1) = 0.066 < 0.3
    assert s.tolist() == pytest.approx([0.9, 0.3, 0.8 * math.exp(-2.5)])
    keep, s = pp.soft_nms(HAND_BOXES, HAND_SCORES, method="linear", iou_threshold=0.5, backend=backend)
    assert keep.tolist() == [0, 1, 2] and s.tolist() == pytest.approx([0.9, 0.4, 0.3])  # IoU >= thr decays
    keep, s = pp.soft_nms(HAND_BOXES, HAND_SCORES, method="linear", iou_threshold=0.51, backend=backend)
    assert s.tolist() == pytest.approx([0.9, 0.8, 0.3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_iou_guided(backend):
    # Ranked by quality: box 1 first; it suppresses box 0 (IoU 0.5 > 0.4) and takes its 0.9.
    quality = torch.tensor([0.5, 0.95, 0.7])
    keep, s = pp.iou_guided_nms(HAND_BOXES, HAND_SCORES, quality, iou_threshold=0.4, backend=backend)
    assert keep.tolist() == [1, 2] and s.tolist() == pytest.approx([0.9, 0.3])


def test_hand_quality_nms():
    quality = torch.tensor([0.1, 0.8, 0.3])
    keep, s = pp.quality_nms(HAND_BOXES, HAND_SCORES, quality, iou_threshold=0.4)
    # sqrt(0.9*0.1)=0.3 < sqrt(0.8*0.8)=0.8: box 1 wins and suppresses box 0.
    assert keep.tolist() == [1, 2] and s.tolist() == pytest.approx([0.8, 0.3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_var_voting(backend):
    # Box 1 (IoU 0.5 with box 0) votes for box 0: p = exp(-0.25 / 0.02); box 0 has twice the
    # variance of box 1, so box 1's weight is 2p relative to box 0's 1.
    var = torch.tensor([[2.0] * 4, [1.0] * 4, [1.0] * 4])
    keep, vb, s = pp.var_voting(HAND_BOXES, HAND_SCORES, var, iou_threshold=0.4, backend=backend)
    p = math.exp(-0.25 / 0.02)
    x2 = (2.0 / 2 + 2 * p * 1.0 / 2) / (1 / 2 + 2 * p / 2)
    assert keep.tolist() == [0, 2]
    assert vb[0].tolist() == pytest.approx([0.0, 0.0, x2, 1.0])
    assert vb[1].tolist() == pytest.approx([5.0, 5.0, 6.0, 6.0]) and s.tolist() == pytest.approx([0.9, 0.3])


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------

ALL = {
    "nms": lambda b, s, l, q, v: (pp.nms(b, s, l), None),
    "soft-linear": lambda b, s, l, q, v: pp.soft_nms(b, s, l, method="linear"),
    "soft-gaussian": lambda b, s, l, q, v: pp.soft_nms(b, s, l),
    "iou-guided": lambda b, s, l, q, v: pp.iou_guided_nms(b, s, q, l),
    "quality": lambda b, s, l, q, v: pp.quality_nms(b, s, q, l),
    "var-voting": lambda b, s, l, q, v: pp.var_voting(b, s, v, l)[::2],
    "var-voting+soft": lambda b, s, l, q, v: pp.var_voting(b, s, v, l, suppression="soft")[::2],
}


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 40), c=st.integers(1, 3), seed=st.integers(0, 10_000), perm_seed=st.integers(0, 99))
def test_permutation_does_not_change_the_kept_set(n, c, seed, perm_seed):
    boxes, scores, labels, quality, var = detector_like(n, c, seed=seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    for name, fn in ALL.items():
        keep, _ = fn(boxes, scores, labels, quality, var)
        keep_p, _ = fn(boxes[perm], scores[perm], labels[perm], quality[perm], var[perm])
        assert perm[keep_p].tolist() == keep.tolist(), name


@pytest.mark.parametrize("name", list(ALL))
def test_empty_single_identical_degenerate(name):
    fn = ALL[name]
    e = fn(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.ones(0, 4))
    assert e[0].shape == (0,) and e[0].dtype == torch.long
    one = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    k, _ = fn(one, torch.tensor([0.5]), None, torch.tensor([0.7]), torch.ones(1, 4))
    assert k.tolist() == [0]
    same = one.repeat(5, 1)
    k, _ = fn(same, torch.tensor([0.2, 0.9, 0.5, 0.9, 0.1]), None, torch.tensor([0.3, 0.4, 0.9, 0.1, 0.2]),
              torch.ones(5, 4))
    if name.startswith("soft") or name.endswith("+soft"):
        assert k[0].item() in (1, 2) and len(k) >= 1  # identical boxes decay but need not vanish
    else:
        assert len(k) == 1  # hard suppression keeps exactly one of identical boxes
    degenerate = torch.tensor([[1.0, 1.0, 1.0, 5.0], [1.0, 1.0, 1.0, 5.0], [0.0, 0.0, 2.0, 2.0]])
    k, _ = fn(degenerate, torch.tensor([0.9, 0.8, 0.7]), None, torch.tensor([0.5, 0.6, 0.7]), torch.ones(3, 4))
    assert sorted(k.tolist()) == [0, 1, 2]  # zero-area boxes have IoU 0 with everything


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("name", list(ALL))
def test_dtypes_accepted(dtype, name):
    boxes, scores, labels, quality, var = detector_like(50, 2, seed=3, dtype=dtype)
    keep, new = ALL[name](boxes, scores, labels, quality, var)
    ref, _ = ALL[name](boxes.double(), scores.double(), labels, quality.double(), var.double())
    if dtype == torch.float64:
        assert keep.tolist() == ref.tolist()
    if new is not None:
        assert new.dtype == dtype


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(boxes=torch.tensor([[0.0, 0.0, float("nan"), 1.0]])), "boxes contains NaN"),
        (dict(boxes=torch.tensor([[2.0, 0.0, 1.0, 1.0]])), "x2 >= x1"),
        (dict(scores=torch.tensor([float("inf")])), "scores must be finite"),
        (dict(scores=torch.tensor([0.1, 0.2])), r"scores must have shape \(1,\)"),
        (dict(labels=torch.tensor([0.5])), "labels must be an integer"),
        (dict(quality=torch.tensor([float("nan")])), "quality must be finite"),
        (dict(variances=torch.tensor([[1.0, 1.0, 0.0, 1.0]])), "variances must be finite and positive"),
        (dict(boxes=torch.zeros(1, 3)), r"boxes must have shape \(N, 4\)"),
    ],
)
def test_bad_input_rejected(kwargs, match):
    args = dict(boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]]), scores=torch.tensor([0.5]), labels=None,
                quality=torch.tensor([0.5]), variances=torch.ones(1, 4))
    args.update(kwargs)
    b, s, l, q, v = args["boxes"], args["scores"], args["labels"], args["quality"], args["variances"]
    with pytest.raises(ValueError, match=match):
        pp.iou_guided_nms(b, s, q, l) if "variances" not in kwargs else pp.var_voting(b, s, v, l)


def test_bad_parameters_rejected():
    b, s = HAND_BOXES, HAND_SCORES
    with pytest.raises(ValueError, match="iou_threshold"):
        pp.nms(b, s, iou_threshold=1.5)
    with pytest.raises(ValueError, match="method must be"):
        pp.soft_nms(b, s, method="cubic")
    with pytest.raises(ValueError, match="sigma"):
        pp.soft_nms(b, s, sigma=0)
    with pytest.raises(ValueError, match="suppression"):
        pp.var_voting(b, s, torch.ones(3, 4), suppression="medium")
    with pytest.raises(ValueError, match="backend"):
        pp.soft_nms(b, s, backend="fortran")


# ------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------


def test_postprocess_every_method_and_cap():
    boxes, scores, labels, quality, var = detector_like(120, 3, seed=9)
    cand = dict(boxes=boxes, scores=scores, labels=labels, quality=quality, variances=var)
    for method in pp.METHODS:
        out = pp.postprocess(cand, method, max_detections=10)
        assert set(out) == set(cand)
        assert 0 < len(out["boxes"]) <= 10 and all(len(v) == len(out["boxes"]) for v in out.values())
        assert (out["scores"][:-1] >= out["scores"][1:]).all()
    nms_out = pp.postprocess(cand, "nms", max_detections=1000)
    keep = pp.nms(boxes, scores, labels)
    torch.testing.assert_close(nms_out["boxes"], boxes[keep])
    vv = pp.postprocess(cand, "var-voting", max_detections=1000, sigma_t=0.01)
    k, vb, vs = pp.var_voting(boxes, scores, var, labels, sigma_t=0.01)
    torch.testing.assert_close(vv["boxes"], vb[torch.sort(vs, descending=True, stable=True).indices])


def test_postprocess_errors():
    cand = dict(boxes=HAND_BOXES, scores=HAND_SCORES, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="needs candidates\\['quality'\\]"):
        pp.postprocess(cand, "iou-guided")
    with pytest.raises(ValueError, match="needs candidates\\['variances'\\]"):
        pp.postprocess(cand, "var-voting+soft")
    with pytest.raises(ValueError, match="method must be one of"):
        pp.postprocess(cand, "weighted-boxes-fusion")
    empty = dict(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long))
    assert pp.postprocess(empty, "soft-gaussian")["boxes"].shape == (0, 4)


def test_each_row_of_the_methods_table_is_what_postprocess_runs():
    """A row: its function, called with its fixed keywords on the signals it names, gives what
    ``postprocess`` keeps; it moves boxes exactly when the row says so; a fixed keyword can not be
    passed again."""
    boxes, scores, labels, quality, var = detector_like(80, 2, seed=4)
    cand = dict(boxes=boxes, scores=scores, labels=labels, quality=quality, variances=var, row=torch.arange(80))
    for name, m in pp.METHODS.items():
        assert set(m.needs) <= set(pp.SIGNALS) == {"quality", "variances"}
        assert pp.REQUIRED_SIGNALS[name] == (m.needs[0] if m.needs else None) and len(m.needs) <= 1
        result = m.function(boxes, scores, *(cand[k] for k in m.needs), labels, **m.fixed)
        keep = result if isinstance(result, torch.Tensor) else result[0]
        assert m.moves_boxes == (isinstance(result, tuple) and len(result) == 3), name
        out = pp.postprocess(cand, name, max_detections=1000)
        assert sorted(out["row"].tolist()) == sorted(keep.tolist()), name
        if m.fixed:
            with pytest.raises(TypeError, match="multiple values"):
                pp.postprocess(cand, name, **m.fixed)
    assert pp.check_method("quality") is pp.METHODS["quality"]
    for bad in ("soft", ["nms"], None):
        with pytest.raises(ValueError, match="methods must be one of nms, soft-linear"):
            pp.check_method(bad, "methods")


# ------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(ALL))
def test_cuda_matches_cpu(name):
    boxes, scores, labels, quality, var = detector_like(400, 3, seed=21)
    keep, new = ALL[name](boxes, scores, labels, quality, var)
    args = [t.cuda() for t in (boxes, scores, labels, quality, var)]
    keep_c, new_c = ALL[name](*args)
    assert keep_c.is_cuda and keep_c.cpu().tolist() == keep.tolist()
    if new is not None:
        torch.testing.assert_close(new_c.cpu(), new)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", [None, "torch", "numba"])
def test_cuda_backends_match_cpu(backend):
    """CUDA inputs through each backend (None: the numba kernel with a host round trip; "torch":
    the rounds on the GPU) give the CPU kernel's result, on the inputs' device."""
    boxes, scores, labels, quality, var = detector_like(400, 3, seed=22)
    cuda = [t.cuda() for t in (boxes, scores, labels, quality, var)]
    calls = {
        "soft-linear": lambda b, s, l, q, v, **k: pp.soft_nms(b, s, l, method="linear", **k),
        "soft-gaussian": lambda b, s, l, q, v, **k: pp.soft_nms(b, s, l, **k),
        "iou-guided": lambda b, s, l, q, v, **k: pp.iou_guided_nms(b, s, q, l, **k),
        "var-voting+soft": lambda b, s, l, q, v, **k: pp.var_voting(b, s, v, l, suppression="soft", **k)[::2],
    }
    for name, fn in calls.items():
        keep, new = fn(boxes, scores, labels, quality, var)
        keep_c, new_c = fn(*cuda, backend=backend)
        assert keep_c.is_cuda and new_c.is_cuda, name
        assert keep_c.cpu().tolist() == keep.tolist(), name
        torch.testing.assert_close(new_c.cpu(), new, msg=name)
