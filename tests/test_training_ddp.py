"""Two-process DDP (gloo, CPU) on generated data: both ranks end with identical weights, and
those are the weights of plain SGD on the two ranks' batches with averaged gradients,
computed here in one process."""

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


def make_config(data: str, out: str):
    from mgdedup.training.config import TrainConfig

    return TrainConfig(imagenet=data, run_dir=str(Path(out) / "run"), epochs=2,
                       batch_size=12, iters_per_epoch=ITERATIONS // 2, lr=0.05, workers=0,
                       resolution=32, milestones=[1], log_every=1, device="cpu")


def parameters_of(net) -> dict[str, list]:
    return {name: value.detach().double().flatten().tolist()
            for name, value in net.named_parameters()}


def ddp_worker(rank: int, data: str, out: str, port: int) -> None:
    """One rank: train a few iterations, then write the digest of its whole state."""
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank)})
    from mgdedup.training.loop import Trainer

    config = make_config(data, out)
    # different initial weights per rank: DDP must broadcast rank 0's
    trainer = Trainer(config, model=tiny_model(seed=rank))
    try:
        trainer.fit()
        record = {"state": state_digest(trainer.net), "beta": float(trainer.margin.beta.detach()),
                  "iteration": trainer.iteration, "parameters": parameters_of(trainer.net)}
    finally:
        trainer.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(),
                    reason="torch built without the gloo backend")
def test_two_gloo_ranks_end_identical_and_equal_to_averaged_sgd(tmp_path):
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
    # ... and what they computed is SGD on both ranks' batches with averaged gradients
    reference = averaged_sgd_reference(data, tmp_path / "single")
    assert set(records[0]["parameters"]) == set(reference) and "margin.beta" in reference
    for name, values in reference.items():
        assert records[0]["parameters"][name] == pytest.approx(values, rel=1e-4, abs=1e-5), name


def averaged_sgd_reference(data: Path, out: Path) -> dict[str, list]:
    """The same run without DDP: at every iteration each rank's batch (its RA sampler share,
    its augmentation seeds, its negative-sampling generator) goes through the network in
    turn, the two losses are averaged (so are the gradients, as DDP does) and the optimizer
    steps once; the lr schedule steps at each epoch end."""
    from torch.utils.data import default_collate

    from mgdedup.training.data import SeededBatches
    from mgdedup.training.loop import Trainer
    from mgdedup.training.sampler import RepeatedAugmentationSampler

    config = make_config(str(data), str(out))
    trainer = Trainer(config, model=tiny_model(seed=0))  # rank 0's weights, which DDP spreads
    try:
        trainer.net.train()
        for epoch in range(config.epochs):
            shares = []
            for rank in range(WORLD):
                sampler = RepeatedAugmentationSampler(
                    len(trainer.dataset), config.batch_size, config.repeats,
                    iters_per_epoch=config.iters_per_epoch, seed=config.seed, rank=rank,
                    world_size=WORLD)
                sampler.set_epoch(epoch, 0)
                shares.append(iter(SeededBatches(sampler, config.seed)))
            for step in range(config.iters_per_epoch):
                iteration = epoch * config.iters_per_epoch + step
                losses = []
                for rank in range(WORLD):
                    images, labels, ids = default_collate(
                        [trainer.dataset[item] for item in next(shares[rank])])
                    generator = torch.Generator().manual_seed(
                        (config.seed * 1_000_003 + iteration) * 1031 + rank)
                    losses.append(trainer.net(images, labels, ids, None, generator, config.lam,
                                              config.temperature)[0])
                trainer.optimizer.zero_grad(set_to_none=True)
                (sum(losses) / WORLD).backward()
                trainer.optimizer.step()
            trainer.scheduler.step()
        return parameters_of(trainer.net)
    finally:
        trainer.close()
