"""A diverging training says what to change, and gradient clipping keeps a too-large step finite.

The model is a quadratic fit whose SGD update multiplies the error by ``1 - 2 * lr * m**2``: above
``lr = 1 / m**2`` every step makes it larger, until the loss overflows, as a detector does when its
learning rate is too high for its gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from locconf.engine.train import NonFiniteLossError, train


class Quadratic(nn.Module):
    """``loss_fit = (w * m - 1) ** 2`` with ``m`` the batch's mean pixel; minimum at ``w = 1 / m``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, images, targets=None):
        m = torch.stack(images).mean()
        return {"loss_fit": (self.w * m - 1.0) ** 2}


def dataset(n: int = 4):
    """Constant images of 0.5: ``m = 0.5``, so steps diverge for ``lr > 4``."""
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    return [(torch.full((1, 4, 4), 0.5), dict(target, image_id=i)) for i in range(n)]


def hand_weights(lr: float | list[float], steps: int, w: float = 0.5, m: float = 0.5) -> list[float]:
    """SGD by hand: ``lr`` a constant or one learning rate per step."""
    lrs = lr if isinstance(lr, list) else [lr] * steps
    out = []
    for step in range(steps):
        w -= lrs[step] * 2 * (w * m - 1.0) * m
        out.append(w)
    return out


def run(tmp_path, **kw):
    model = Quadratic()
    summary = train(model, dataset(), **dict(dict(iterations=60, batch_size=2, momentum=0.0, weight_decay=0.0,
                                                  warmup_iters=0, out_dir=tmp_path, log_every=1, progress=False,
                                                  checkpoint_every=0), **kw))
    return model, summary


def test_divergence_names_step_term_and_what_to_change(tmp_path):
    w = hand_weights(20.0, 200)
    first_bad = next(i for i, v in enumerate(w) if not torch.isfinite(torch.tensor((v * 0.5 - 1.0) ** 2)))
    with pytest.raises(NonFiniteLossError) as err:
        run(tmp_path, iterations=200, lr=20.0, clip_grad_norm=None)
    text = str(err.value)
    assert f"non-finite loss at step {first_bad + 2}: loss_fit=inf; the training diverged" in text
    assert "The learning rate of this step was 20." in text
    assert "lower train.lr (now 20)" in text
    assert "set train.clip_grad_norm (e.g. 10; now off)" in text
    assert "train.warmup_iters (now 0)" in text

    with pytest.raises(NonFiniteLossError, match=r"lower train\.clip_grad_norm \(now 1e\+30\)"):
        run(tmp_path / "b", iterations=200, lr=20.0, clip_grad_norm=1e30)


def test_clipping_keeps_the_same_step_size_finite(tmp_path):
    """With the norm clipped to 1, each update moves w by at most lr: it stays bounded around the minimum."""
    model, summary = run(tmp_path, iterations=200, lr=20.0, clip_grad_norm=1.0)
    assert summary["step"] == 200 and abs(float(model.w) - 2.0) <= 20.0


def test_the_default_recipe_clips(tmp_path):
    """``train`` clips by default (``clip_grad_norm=10``): the diverging step size above trains to the end."""
    model, summary = run(tmp_path, iterations=200, lr=20.0)
    assert summary["step"] == 200 and abs(float(model.w) - 2.0) <= 200.0
    # a step size that converges is not changed by the default clipping: the gradients stay below 10
    model, _ = run(tmp_path / "small", iterations=10, lr=1.0)
    lrs = [1.0] * 7 + [0.1] * 2 + [0.01]  # the default step decay, x0.1 at 70 % and 90 % of the iterations
    assert float(model.w) == pytest.approx(hand_weights(lrs, 10)[-1], rel=1e-5)
