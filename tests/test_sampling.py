"""The epoch's global sample sequence: ranks, workers and the global RNG change nothing (the strong
views built from the batch included)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dataloaders.datasets import (ConcatSlices, GeometricAugmentation, IntensityAugmentation, LabeledSlices,
                                  UnlabeledSlices, strong_views)
from dataloaders.sampling import EpochSampler, epoch_loader

LAYOUT = dict(seed=3, epoch=2, stream=1, num_batches=4)


def tiny_dataset(count=5, size=32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
    data = SimpleNamespace(train_images=images, train_masks=images // 64, annotated=np.ones((count, 4), bool))
    return LabeledSlices(data, np.arange(count), size, {"mean": 0.5, "std": 0.25},
                         augment=GeometricAugmentation(20.0, (0.8, 1.2), 0.1, False))


def test_one_rank_yields_back_to_back_permutations():
    pairs = list(EpochSampler(5, batch_size=3, **LAYOUT))
    assert len(pairs) == 12                                   # num_batches · batch_size
    indices = [index for index, _ in pairs]
    assert sorted(indices[:5]) == sorted(indices[5:10]) == list(range(5))
    assert len({seed for _, seed in pairs}) == 12


def test_two_ranks_of_batch_2_are_one_rank_of_batch_4():
    single = list(EpochSampler(5, batch_size=4, **LAYOUT))
    ranks = [list(EpochSampler(5, batch_size=2, rank=rank, world_size=2, **LAYOUT)) for rank in (0, 1)]
    for batch in range(4):
        union = ranks[0][2 * batch:2 * batch + 2] + ranks[1][2 * batch:2 * batch + 2]
        assert union == single[4 * batch:4 * batch + 4]


def test_ranks_see_the_same_pixels_as_one_process():
    dataset = tiny_dataset()
    single = list(epoch_loader(dataset, batch_size=4, num_workers=0, **LAYOUT))
    ranks = [list(epoch_loader(dataset, batch_size=2, num_workers=0, rank=rank, world_size=2, **LAYOUT))
             for rank in (0, 1)]
    for batch, whole in enumerate(single):
        for key in ("image", "mask", "certain_background", "index"):
            assert torch.equal(torch.cat([ranks[0][batch][key], ranks[1][batch][key]]), whole[key])


def test_workers_and_the_global_generators_change_nothing():
    dataset = tiny_dataset()
    torch.manual_seed(0)
    np.random.seed(0)
    in_process = list(epoch_loader(dataset, batch_size=2, num_workers=0, **LAYOUT))
    torch.manual_seed(1)
    np.random.seed(1)
    with_workers = list(epoch_loader(dataset, batch_size=2, num_workers=2, **LAYOUT))
    for ours, theirs in zip(in_process, with_workers, strict=True):
        for key in ("image", "mask", "certain_background", "index"):
            assert torch.equal(ours[key], theirs[key])


def test_strong_views_are_the_same_whatever_the_workers_and_the_rank_split():
    """The strong views come from each sample's own draws: 1 process × batch 4 in the main process,
    the same with 2 workers, and 2 ranks × batch 2 give the same pixels."""
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    dataset = UnlabeledSlices(images, np.arange(5), 32, {"mean": 0.5, "std": 0.25},
                              GeometricAugmentation(20.0, (0.8, 1.2), 0.1, False), IntensityAugmentation())
    single = [strong_views(batch) for batch in epoch_loader(dataset, batch_size=4, num_workers=0, **LAYOUT)]
    with_workers = [strong_views(batch) for batch in epoch_loader(dataset, batch_size=4, num_workers=2, **LAYOUT)]
    ranks = [[strong_views(batch) for batch in epoch_loader(dataset, batch_size=2, num_workers=0, rank=rank,
                                                            world_size=2, **LAYOUT)] for rank in (0, 1)]
    for batch, whole in enumerate(single):
        for key in ("image_w", "image_s1", "image_s2"):
            assert torch.equal(with_workers[batch][key], whole[key])
            assert torch.equal(torch.cat([ranks[0][batch][key], ranks[1][batch][key]]), whole[key])
    assert not torch.equal(single[0]["image_s1"], single[0]["image_s2"])


def test_an_epoch_depends_on_seed_epoch_and_stream():
    base = list(EpochSampler(7, batch_size=2, **LAYOUT))
    assert base == list(EpochSampler(7, batch_size=2, **LAYOUT))
    for change in ({"seed": 4}, {"epoch": 3}, {"stream": 2}):
        other = list(EpochSampler(7, batch_size=2, **{**LAYOUT, **change}))
        assert {seed for _, seed in other}.isdisjoint({seed for _, seed in base})


def test_concatenated_datasets_pass_the_seed_to_the_right_part():
    first, second = tiny_dataset(count=3), tiny_dataset(count=4)
    joint = ConcatSlices([first, second])
    assert torch.equal(joint[(4, 9)]["image"], second[(1, 9)]["image"])
    assert torch.equal(joint[(2, 9)]["image"], first[(2, 9)]["image"])


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2)])
def test_bad_rank_is_an_error(rank, world_size):
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(5, batch_size=2, rank=rank, world_size=world_size, **LAYOUT)


def test_unlabeled_pool_adds_the_labeled_and_test_images_and_says_so(capsys):
    from utils.builders import unlabeled_pool
    train = np.stack([np.full((4, 4), i, np.uint8) for i in range(5)])  # image i is all i
    test = np.stack([np.full((4, 4), 100 + i, np.uint8) for i in range(3)])
    data = SimpleNamespace(root="d", train_images=train, test_images=test)
    split = SimpleNamespace(unlabeled=np.array([1, 3]), train=np.array([0, 2]), val=np.array([4]))

    def pool(labeled, test):
        cfg = SimpleNamespace(labeled_as_unlabeled=labeled, use_test_as_unlabeled=test)
        images, indices = unlabeled_pool(cfg, data, split)
        return [int(images[i][0, 0]) for i in indices], capsys.readouterr().out

    assert pool(False, False) == ([1, 3], "")
    values, out = pool(False, True)
    assert values == [1, 3, 100, 101, 102]
    assert "2 unlabeled training images + 3 test images (use_test_as_unlabeled) = 5" in out
    values, out = pool(True, False)  # the validation image 4 never joins
    assert values == [1, 3, 0, 2]
    assert "2 unlabeled training images + 2 labeled training images (labeled_as_unlabeled) = 4" in out
    values, out = pool(True, True)
    assert values == [1, 3, 0, 2, 100, 101, 102]
    assert out.strip().endswith("(use_test_as_unlabeled) = 7")

    data.test_images = None
    values, out = pool(False, True)
    assert values == [1, 3]
    assert "d has no test images" in out
