"""The synthetic FeTS-like segmentation federation (omnifm.data.lesions)."""
import pytest
import torch

from omnifm.data.lesions import GROUPS, synthetic_segmentation_federation

pytestmark = pytest.mark.usefixtures("one_thread")

N, SIZE = 40, 48


@pytest.fixture(scope="module")
def group1():
    return synthetic_segmentation_federation("group1", samples_per_client=N, image_size=SIZE, seed=3)


def both(train, test):
    """(images, masks) of a client's two splits together."""
    return tuple(torch.cat([a, b]) for a, b in zip(train.tensors, test.tensors))


def test_same_seed_same_data_other_seed_other_data(group1):
    again = synthetic_segmentation_federation("group1", samples_per_client=N, image_size=SIZE, seed=3)
    other = synthetic_segmentation_federation("group1", samples_per_client=N, image_size=SIZE, seed=4)
    for (name, tr, te), (name2, tr2, te2), (_, tr3, _) in zip(group1, again, other):
        assert name == name2
        for a, b in zip(tr.tensors + te.tensors, tr2.tensors + te2.tensors):
            assert torch.equal(a, b)
        assert not torch.equal(tr.tensors[0], tr3.tensors[0])


def test_items_shapes_ranges_and_80_20_split(group1):
    assert [name for name, _, _ in group1] == [f"institution-{i}" for i in range(1, 10)]
    for _, train, test in group1:
        assert (len(train), len(test)) == (32, 8)
        for ds in (train, test):
            x, y = ds.tensors
            assert x.shape == y.shape == (len(ds), 1, SIZE, SIZE)
            assert x.dtype == y.dtype == torch.float32
            assert x.min() >= 0 and x.max() <= 1
            assert ((y == 0) | (y == 1)).all()
            assert (x[..., 0, :] == 0).all() and (x[..., -1, :] == 0).all()  # skull-stripped background
        x, y = train[0]
        assert x.shape == y.shape == (1, SIZE, SIZE)


def test_mask_is_the_enhancing_lesion(group1):
    """Inside the (skull-stripped) brain, and brighter than the rest of the brain in
    every slice that has one; some slices have no lesion."""
    n_lesion = n_empty = 0
    for name, train, test in group1:
        x, y = both(train, test)
        brain, lesion = x > 0, y > 0
        assert not (lesion & ~brain).any(), name
        for i in range(len(x)):
            if not lesion[i].any():
                n_empty += 1
                continue
            n_lesion += 1
            inside, rest = x[i][lesion[i]].mean(), x[i][brain[i] & ~lesion[i]].mean()
            assert inside > rest + 0.05, f"{name} slice {i}: lesion {inside:.3f} vs brain {rest:.3f}"
    assert n_lesion > 0.5 * 9 * N and n_empty > 0.05 * 9 * N


def f_statistic(groups):
    """One-way ANOVA F: between-group over within-group variance."""
    k, n = len(groups), sum(len(v) for v in groups)
    grand = torch.cat(groups).mean()
    between = sum(len(v) * (v.mean() - grand) ** 2 for v in groups) / (k - 1)
    within = sum(((v - v.mean()) ** 2).sum() for v in groups) / (n - k)
    return (between / within).item()


def test_institutions_differ_in_acquisition_and_lesion_size(group1):
    """Per-slice brain intensity mean and spread, and lesion area, depend on the
    institution far more than chance (F ~ 1 without an effect, F > 4 has p < 1e-3
    here), while every institution has the same task (checked above)."""
    means, spreads, areas = [], [], []
    for _, train, test in group1:
        x, y = both(train, test)
        brain = (x > 0).flatten(1)
        xs = x.flatten(1)
        means.append(torch.stack([v[b].mean() for v, b in zip(xs, brain)]))
        spreads.append(torch.stack([v[b].std() for v, b in zip(xs, brain)]))
        a = y.sum((1, 2, 3))
        areas.append(a[a > 0])
    assert f_statistic(means) > 20
    assert f_statistic(spreads) > 4
    assert f_statistic(areas) > 4


@pytest.mark.parametrize("scenario,size", [("group1", 9), ("group2", 6), ("group3", 5), ("group4", 3)])
def test_paper_group_sizes(scenario, size):
    clients = synthetic_segmentation_federation(scenario, samples_per_client=2, image_size=32, seed=0)
    assert len(clients) == size
    assert [name for name, _, _ in clients] == [f"institution-{i}" for i in GROUPS[scenario]]


def test_groups_are_disjoint_institutions():
    ids = [i for g in GROUPS.values() for i in g]
    assert sorted(ids) == list(range(1, 24))


@pytest.mark.parametrize("kwargs,arg", [
    (dict(scenario="group5"), "scenario"),
    (dict(scenario="all"), "scenario"),
    (dict(samples_per_client=1), "samples_per_client"),
    (dict(samples_per_client=2.0), "samples_per_client"),
    (dict(image_size=16), "image_size"),
    (dict(image_size="64"), "image_size"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments(kwargs, arg):
    args = dict(scenario="group4", samples_per_client=4, image_size=32, seed=0) | kwargs
    with pytest.raises(ValueError, match=arg):
        synthetic_segmentation_federation(**args)
