"""Repeated-augmentation sampler: batch layout, determinism, DDP partition, epoch length, resume."""

import math
from itertools import islice

import pytest

from mgdedup.training.sampler import RepeatedAugmentationSampler, default_iters_per_epoch


def _groups(batch, m=3):
    """Cut a batch into consecutive chunks of m positions; each must hold one repeated index."""
    runs = [batch[i: i + m] for i in range(0, len(batch), m)]
    assert all(len(set(r)) == 1 for r in runs), batch
    return runs


@pytest.mark.parametrize("batch_size,m", [(12, 3), (20, 3), (16, 4), (7, 1), (10, 4)])
def test_batch_holds_ceil_b_over_m_images_each_repeated_m_times(batch_size, m):
    sampler = RepeatedAugmentationSampler(1000, batch_size, m, iters_per_epoch=20, seed=3)
    batches = list(sampler)
    assert len(batches) == 20
    for batch in batches:
        assert len(batch) == batch_size
        runs = _groups(batch, m)
        assert len(runs) == math.ceil(batch_size / m)
        assert len({r[0] for r in runs}) == len(runs)  # distinct images
        assert all(len(r) == m for r in runs[:-1])
        assert len(runs[-1]) == batch_size - m * (len(runs) - 1)
        assert all(0 <= i < 1000 for i in batch)


def test_drop_last_group_keeps_only_whole_groups():
    sampler = RepeatedAugmentationSampler(100, 10, 3, iters_per_epoch=5, drop_last_group=True)
    for batch in sampler:
        runs = _groups(batch)
        assert len(batch) == 9 and len(runs) == 3 and all(len(r) == 3 for r in runs)


def test_draws_walk_a_permutation_without_replacement_then_reshuffle():
    # 10 images, 4 distinct per batch: first 2 batches hold 8 distinct images, and every
    # image of the dataset appears before any repeats across batches 1-2 plus part of 3.
    sampler = RepeatedAugmentationSampler(10, 12, 3, iters_per_epoch=6, seed=0)
    distinct = [[r[0] for r in _groups(b)] for b in sampler]
    flat = [i for d in distinct for i in d]
    assert sorted(flat[:10]) == list(range(10))  # first permutation, drawn in order
    assert sorted(flat[10:20]) == list(range(10))  # second one
    for d in distinct:
        assert len(set(d)) == 4  # distinct within a batch even across the reshuffle


def test_dataset_smaller_than_a_batch_still_works():
    sampler = RepeatedAugmentationSampler(2, 12, 3, iters_per_epoch=3)
    for batch in sampler:
        runs = _groups(batch)
        assert len(batch) == 12 and len(runs) == 4 and set(batch) == {0, 1}


def test_same_seed_and_epoch_repeat_other_epochs_and_seeds_differ():
    def epoch(seed, e):
        s = RepeatedAugmentationSampler(500, 24, 3, iters_per_epoch=10, seed=seed)
        s.set_epoch(e)
        return list(s)

    assert epoch(7, 2) == epoch(7, 2)
    assert epoch(7, 2) != epoch(7, 3)
    assert epoch(7, 0) != epoch(9, 0)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("m", [2, 3])
def test_ddp_ranks_get_whole_groups_of_disjoint_images(world_size, m):
    batch_size = (20 if m == 3 else 10) * world_size  # 20 / 3: truncated last group per rank
    per_rank = batch_size // world_size
    samplers = [RepeatedAugmentationSampler(300, batch_size, m, iters_per_epoch=8, seed=5,
                                            rank=r, world_size=world_size)
                for r in range(world_size)]
    for batches in zip(*samplers):
        seen = set()
        for batch in batches:
            assert len(batch) == per_rank
            runs = _groups(batch, m)
            assert len(runs) == math.ceil(per_rank / m)
            assert all(len(r) == m for r in runs[:-1])
            images = {r[0] for r in runs}
            assert len(images) == len(runs)
            assert not images & seen  # disjoint across ranks in one iteration
            seen |= images


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_union_equals_the_single_process_batch_when_m_divides_rank_batch(world_size):
    batch_size = 12 * world_size
    single = list(RepeatedAugmentationSampler(200, batch_size, 3, iters_per_epoch=30, seed=1))
    ranks = [list(RepeatedAugmentationSampler(200, batch_size, 3, iters_per_epoch=30, seed=1,
                                              rank=r, world_size=world_size))
             for r in range(world_size)]
    for t, global_batch in enumerate(single):
        assert [i for r in range(world_size) for i in ranks[r][t]] == global_batch


def test_len_is_the_paper_epoch():
    assert default_iters_per_epoch(1281167, 512) == 5005
    assert default_iters_per_epoch(100, 10) == 20
    assert default_iters_per_epoch(101, 10) == 21
    assert default_iters_per_epoch(1000, 10, len_factor=1.0) == 100
    assert len(RepeatedAugmentationSampler(1281167, 512, 3)) == 5005
    assert len(RepeatedAugmentationSampler(1281167, 512, 3, rank=3, world_size=4)) == 5005
    assert len(RepeatedAugmentationSampler(100, 10, iters_per_epoch=7)) == 7


def test_resume_mid_epoch_yields_exactly_the_remaining_batches():
    full = RepeatedAugmentationSampler(50, 12, 3, iters_per_epoch=15, seed=2, rank=1,
                                       world_size=2)
    full.set_epoch(4)
    expected = list(full)
    consumed = list(islice(iter(full), 6))
    assert consumed == expected[:6]
    state = full.state_dict(iterations_done=6)
    assert state["epoch"] == 4 and state["start_iteration"] == 6

    resumed = RepeatedAugmentationSampler(50, 12, 3, iters_per_epoch=15, seed=2, rank=1,
                                          world_size=2)
    resumed.load_state_dict(state)
    assert resumed.num_remaining == 9 and len(resumed) == 15
    assert list(resumed) == expected[6:]

    direct = RepeatedAugmentationSampler(50, 12, 3, iters_per_epoch=15, seed=2, rank=1,
                                         world_size=2)
    direct.set_epoch(4, start_iteration=14)
    assert list(direct) == expected[14:]

    end = full.state_dict(iterations_done=15)  # finished epoch resumes at the next one
    assert (end["epoch"], end["start_iteration"]) == (5, 0)


def test_load_state_dict_refuses_another_layout():
    state = RepeatedAugmentationSampler(50, 12, 3, seed=2).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        RepeatedAugmentationSampler(50, 12, 4, seed=2).load_state_dict(state)


@pytest.mark.parametrize("kwargs,match", [
    ({"dataset_size": 0, "batch_size": 12}, "dataset_size"),
    ({"dataset_size": 10, "batch_size": 12, "repeats": 0}, "repeats"),
    ({"dataset_size": 10, "batch_size": 12, "world_size": 5}, "multiple of world_size"),
    ({"dataset_size": 10, "batch_size": 12, "world_size": 2, "rank": 2}, "rank"),
    ({"dataset_size": 10, "batch_size": 12, "rank": -1}, "rank"),
    ({"dataset_size": 10, "batch_size": 12, "iters_per_epoch": 0}, "iters_per_epoch"),
    ({"dataset_size": 10, "batch_size": 4, "world_size": 2, "repeats": 3, "drop_last_group": True},
     "drop_last_group"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RepeatedAugmentationSampler(**kwargs)
    with pytest.raises(ValueError):
        default_iters_per_epoch(0, 512)
