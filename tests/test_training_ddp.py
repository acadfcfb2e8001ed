"""Two-process DDP (gloo, CPU) on generated data: both ranks must end with identical weights."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from training_helpers import make_imagefolder, state_digest, tiny_model

WORLD = 2
ITERATIONS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, data: str, out: str, port: int) -> None:
    """One rank: train a few iterations, then write the digest of its whole state."""
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank)})
    from mgdedup.training.config import TrainConfig
    from mgdedup.training.loop import Trainer

    config = TrainConfig(imagenet=data, run_dir=str(Path(out) / "run"), epochs=2,
                         batch_size=12, iters_per_epoch=ITERATIONS // 2, lr=0.05, workers=0,
                         resolution=32, milestones=[1], log_every=1, device="cpu")
    # different initial weights per rank: DDP must broadcast rank 0's
    trainer = Trainer(config, model=tiny_model(seed=rank))
    try:
        trainer.fit()
        record = {"state": state_digest(trainer.net), "beta": float(trainer.margin.beta.detach()),
                  "iteration": trainer.iteration}
    finally:
        trainer.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(),
                    reason="torch built without the gloo backend")
def test_two_gloo_ranks_end_with_identical_weights(tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=10, per_class=4, val_per_class=1)
    mp.spawn(ddp_worker, args=(str(data), str(tmp_path), free_port()), nprocs=WORLD, join=True)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert records[0]["iteration"] == records[1]["iteration"] == ITERATIONS
    assert records[0]["state"] == records[1]["state"]  # parameters and BN buffers, bit for bit
    assert records[0]["beta"] == records[1]["beta"]
    assert records[0]["beta"] != pytest.approx(1.2, abs=1e-7)  # beta was trained
    # rank 0 alone wrote the checkpoint and the metrics
    assert (tmp_path / "run" / "last.ckpt").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["world_size"] for line in lines[:1]] == [WORLD]
    steps = [json.loads(line) for line in lines if json.loads(line)["event"] == "train"]
    assert [s["iteration"] for s in steps] == list(range(1, ITERATIONS + 1))
