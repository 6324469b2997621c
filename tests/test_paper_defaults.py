"""Defaults that follow the papers, checked against hand-computed cases (issue 13)."""

import inspect
import math

import torch

from locconf.postprocess import var_voting


def test_var_voting_sigma_t_default_and_released_code_value():
    """Two boxes of one class: the vote of the second on the first is exp(-(1 - IoU)^2 / sigma_t)
    (KL-Loss Eq. for p_i), times 1/variance; hand-computed for the default 0.02 and for 0.01, the
    released code's STD.IOU_SIGMA."""
    assert inspect.signature(var_voting).parameters["sigma_t"].default == 0.02
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 12.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8], dtype=torch.float64)
    var = torch.ones(2, 4, dtype=torch.float64)
    iou = 100.0 / 120.0
    for sigma_t in (0.02, 0.01):
        p = math.exp(-((1 - iou) ** 2) / sigma_t)
        y2 = (10.0 * 1.0 + 12.0 * p) / (1.0 + p)
        keep, voted, _ = var_voting(boxes, scores, var, iou_threshold=0.9, sigma_t=sigma_t)
        assert keep.tolist() == [0, 1]
        torch.testing.assert_close(voted[0], torch.tensor([0.0, 0.0, 10.0, y2], dtype=torch.float64))
    # the default is 0.02
    _, voted, _ = var_voting(boxes, scores, var, iou_threshold=0.9)
    p = math.exp(-((1 - iou) ** 2) / 0.02)
    assert math.isclose(float(voted[0, 3]), (10.0 + 12.0 * p) / (1.0 + p), rel_tol=1e-9)
