"""Tests for the resumable, rank-aware training sampler and the seeded dataset."""

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dino_nb.augment import DataAugmentation
from dino_nb.loader import SeededDataset, TrainSampler, sample_seed


def batches(sampler, batch_size):
    items = list(sampler)
    assert len(items) == len(sampler)
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def test_single_process_epoch():
    s = TrainSampler(23, batch_size=4, seed=0)
    assert s.steps_per_epoch == 5 and len(s) == 20
    items = list(s)
    indices = [i for i, _ in items]
    assert len(set(indices)) == 20 and all(0 <= i < 23 for i in indices)  # incomplete batch dropped
    assert all(seed == sample_seed(0, 0, i) for i, seed in items)
    assert list(s) == items  # same epoch, same order


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_union_to_the_single_process_global_batches(world_size):
    n, per_rank = 29, 2
    single = batches(TrainSampler(n, per_rank * world_size, seed=5), per_rank * world_size)
    shards = [
        batches(TrainSampler(n, per_rank, seed=5, rank=r, world_size=world_size), per_rank)
        for r in range(world_size)
    ]
    assert all(len(b) == len(single) for b in shards)
    for step, global_batch in enumerate(single):
        union = [item for r in range(world_size) for item in shards[r][step]]
        assert len(union) == len(global_batch)
        assert sorted(union) == sorted(global_batch)  # same images, same augmentation seeds


def test_epoch_changes_order_and_seeds():
    s = TrainSampler(40, batch_size=8, seed=0)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert [i for i, _ in e0] != [i for i, _ in e1]
    assert dict(e0)[e0[0][0]] != dict(e1)[e0[0][0]]  # same image, new crops next epoch
    s.set_epoch(0)
    assert list(s) == e0
    assert [i for i, _ in TrainSampler(40, 8, seed=1)] != [i for i, _ in e0]  # seed matters


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_start_step_skips_exactly_k_steps(k):
    s = TrainSampler(43, batch_size=8, seed=2)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start_step=k)
    rest = list(s)
    assert rest == full[k * 8 :]
    assert len(s) == len(rest) == (5 - k) * 8


def test_start_step_with_ranks_matches_the_uninterrupted_run():
    s = TrainSampler(50, batch_size=3, seed=0, rank=1, world_size=2)
    s.set_epoch(2)
    full = batches(s, 3)
    s.set_epoch(2, start_step=4)
    assert batches(s, 3) == full[4:]


def test_bad_start_step_and_too_small_dataset_raise():
    s = TrainSampler(20, batch_size=4, seed=0)
    with pytest.raises(ValueError):
        s.set_epoch(0, start_step=6)
    with pytest.raises(ValueError):
        s.set_epoch(0, start_step=-1)
    with pytest.raises(ValueError, match="batch"):
        TrainSampler(7, batch_size=4, seed=0, world_size=2)


@pytest.mark.parametrize(
    "kwargs", [dict(rank=1, world_size=1), dict(rank=-1, world_size=2), dict(batch_size=0)]
)
def test_bad_rank_or_batch_size_raise(kwargs):
    with pytest.raises(ValueError):
        TrainSampler(**{"n_samples": 20, "batch_size": 4, "seed": 0, **kwargs})


class Images:
    def __init__(self, n=6):
        self.images = [Image.new("RGB", (20, 16), (40 * i, 100, 200 - 30 * i)) for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 3


def test_seeded_dataset_same_key_same_sample_and_rng_untouched():
    ds = SeededDataset(Images(), DataAugmentation(n_local_crops=2, global_size=8, local_size=4))
    assert len(ds) == 6
    torch.manual_seed(99)
    state = torch.get_rng_state()
    a, ta = ds[(3, 1234)]
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    b, tb = ds[(3, 1234)]
    c, _ = ds[(3, 1235)]
    assert ta == tb == 0
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    # the sample is the transform drawn from that seed
    torch.manual_seed(1234)
    ref = ds.transform(ds.dataset[3][0])
    assert all(torch.equal(x, y) for x, y in zip(a, ref, strict=True))


def test_seeded_dataset_without_transform_and_in_a_loader():
    ds = SeededDataset(Images())
    img, target = ds[(2, 0)]
    assert img is ds.dataset.images[2] and target == 2
    loader = DataLoader(
        SeededDataset(Images(), lambda img: torch.rand(2)),
        batch_size=2,
        sampler=TrainSampler(6, batch_size=2, seed=0),
    )
    first = [x for x, _ in loader]
    second = [x for x, _ in loader]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
