"""Distributed helpers and DDP training: two gloo processes on CPU against one process on the combined batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from locconf.data import SyntheticScenes, collate_fn
from locconf.engine.distributed import (
    all_gather_object,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    reduce_dict,
    unwrap_model,
    wrap_model,
)
from locconf.engine.train import train

# A small deterministic "detector" (no BatchNorm, no random sampling): its losses are means over the
# images, so the average over two processes of their half-batch losses is the full-batch loss.
TOY_SRC = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ToyDetector(nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.cls = nn.Linear(8, num_classes + 1)
            self.box = nn.Linear(8, 4)

        def forward(self, images, targets):
            f = F.relu(self.conv2(F.relu(self.conv1(torch.stack(images))))).mean((2, 3))
            labels = torch.stack([t["labels"][0] for t in targets])
            boxes = torch.stack([t["boxes"][0] for t in targets]) / 32.0
            return {"loss_cls": F.cross_entropy(self.cls(f), labels),
                    "loss_box": F.smooth_l1_loss(self.box(f), boxes)}
    """
)
exec(TOY_SRC)  # defines ToyDetector here as well

WORKER = TOY_SRC + textwrap.dedent(
    """
    import sys
    from pathlib import Path
    torch.set_num_threads(1)
    from locconf.data import SyntheticScenes, collate_fn
    from locconf.engine.distributed import (cleanup_distributed, init_distributed, is_main_process,
                                            reduce_dict, all_gather_object, wrap_model, unwrap_model)
    from locconf.engine.train import train

    out = Path(sys.argv[1])
    rank, world_size, local_rank = init_distributed()
    assert (world_size, local_rank) == (2, rank), (rank, world_size, local_rank)
    assert is_main_process() == (rank == 0)
    ds = SyntheticScenes(16, image_size=32, min_size=8, max_size=16, seed=0)

    # 1. one backward through the DDP wrapper, each process on its half of a 4-image batch
    torch.manual_seed(0)
    model = ToyDetector()
    ddp = wrap_model(model, device=torch.device("cpu"))
    assert unwrap_model(ddp) is model and ddp is not model
    images, targets = collate_fn([ds[i] for i in range(2 * rank, 2 * rank + 2)])
    sum(ddp(images, targets).values()).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out / "ddp_grads.pt")

    # 2. collectives
    r = reduce_dict({"b": torch.tensor(2.0 * rank), "a": torch.tensor(float(rank))})
    assert (r["a"].item(), r["b"].item()) == (0.5, 1.0), r
    assert reduce_dict({"a": torch.tensor(1.0)}, average=False)["a"].item() == 2.0
    assert all_gather_object({"rank": rank}) == [{"rank": 0}, {"rank": 1}]

    # 3. the training loop under DDP (2 x batch 2)
    torch.manual_seed(0)
    model = ToyDetector()
    summary = train(model, ds, iterations=6, batch_size=2, lr=0.05, warmup_iters=2, out_dir=out / "ddp",
                    log_every=1, checkpoint_every=3, progress=False)
    assert summary["world_size"] == 2
    torch.save(model.state_dict(), out / f"ddp_final_rank{rank}.pt")
    cleanup_distributed()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_helpers(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed() == (0, 1, 0)
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
    values = {"loss": torch.tensor(2.5, requires_grad=True)}
    out = reduce_dict(values)
    assert out["loss"].item() == 2.5 and not out["loss"].requires_grad
    with pytest.raises(ValueError, match="scalar"):
        reduce_dict({"loss": torch.ones(2)})
    assert all_gather_object(3) == [3]
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, device=torch.device("cpu")) is model and unwrap_model(model) is model
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed()


def test_two_process_ddp_matches_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]

    ds = SyntheticScenes(16, image_size=32, min_size=8, max_size=16, seed=0)
    # 1. DDP-averaged gradients == gradients of one process on the combined batch
    torch.manual_seed(0)
    model = ToyDetector()
    images, targets = collate_fn([ds[i] for i in range(4)])
    sum(model(images, targets).values()).backward()
    ddp_grads = torch.load(tmp_path / "ddp_grads.pt")
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)

    # 3. 2 processes x batch 2 train like 1 process x batch 4: same averaged losses, same weights
    torch.manual_seed(0)
    model = ToyDetector()
    train(model, ds, iterations=6, batch_size=4, lr=0.05, warmup_iters=2, out_dir=tmp_path / "single",
          log_every=1, checkpoint_every=3, progress=False)
    ddp_log = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    single_log = [json.loads(line) for line in open(tmp_path / "single" / "metrics.jsonl")]
    assert [r["step"] for r in ddp_log] == list(range(1, 7))  # only rank 0 wrote
    for a, b in zip(ddp_log, single_log):
        for k in ("loss_cls", "loss_box", "total", "lr", "epoch"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), (a["step"], k)
    w0, w1 = (torch.load(tmp_path / f"ddp_final_rank{r}.pt") for r in range(2))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(w0[name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(w1[name], w0[name], rtol=0, atol=0, msg=name)
    ckpts = sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.name.startswith("checkpoint"))
    assert ckpts == ["checkpoint_0000003.pth", "checkpoint_0000006.pth"]
    state = torch.load(tmp_path / "ddp" / "checkpoint_0000006.pth", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
