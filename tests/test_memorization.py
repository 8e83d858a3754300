"""The memorisation ratio against hand-computed distances."""

import pytest
import torch

from analytic_diffusion.data.dataset import Dataset
from analytic_diffusion.metrics import memorization


def test_ratio_matches_hand_computed():
    train = torch.zeros(3, 1, 1, 2)
    train[1, 0, 0] = torch.tensor([3.0, 0.0]) / 4
    train[2, 0, 0] = torch.tensor([0.0, 4.0]) / 4
    ds = Dataset.from_array(train)
    samples = torch.tensor([[0.1, 0.0], [0.7, 0.0], [0.35, 0.5]]).reshape(3, 1, 1, 2) / 1.0
    rep = memorization(samples, ds)
    y = train.reshape(3, 2).double()
    for i, s in enumerate(samples.reshape(3, 2).double()):
        d = (y - s).norm(dim=1).sort()
        assert rep.nn_index[i] == d.indices[0]
        assert rep.nn_distance[i] == pytest.approx(float(d.values[0]))
        assert rep.ratio[i] == pytest.approx(float(d.values[0] / d.values[1]))
    # sample 0: 0.1 / 0.65 < 1/3 (copy); sample 1: 0.05/0.7 (copy); sample 2: far from all three (novel)
    assert rep.memorized.tolist() == [True, True, False]
    assert rep.share == pytest.approx(2 / 3)


def test_exact_copies_and_bad_input(rng):
    u = torch.randint(0, 256, (50, 1, 4, 4), generator=rng, dtype=torch.uint8)
    ds = Dataset.from_array(u)
    rep = memorization(ds.images_float(torch.arange(10)), ds)
    assert rep.share == 1.0 and torch.equal(rep.nn_index, torch.arange(10))
    with pytest.raises(ValueError, match="samples"):
        memorization(torch.zeros(2, 3, 4, 4), ds)
    with pytest.raises(ValueError, match="threshold"):
        memorization(ds.images_float(torch.arange(2)), ds, threshold=0)
