"""Synthetic fusion pairs: shapes, ranges, seeding, one pair type per client, and the
premise built in (both modalities render one anatomy)."""
import pytest
import torch
import torch.nn.functional as F

from omnifm.data.fusion_pairs import PAIR_TYPES, model_input, render_pairs, rgb_to_y, synthetic_fusion_federation
from omnifm.data.lesions import draw_institution

pytestmark = pytest.mark.usefixtures("one_thread")

S = 48


def pairs_of(pair, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return render_pairs(n, pair, draw_institution(g), image_size=S, g=g)


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).sum() / (a.norm() * b.norm())).item()


@pytest.mark.parametrize("pair,channels", [("CT-MRI", 1), ("PET-MRI", 3), ("SPECT-MRI", 3)])
def test_shapes_and_ranges(pair, channels):
    p = pairs_of(pair, n=4)
    assert p.mri.shape == (4, 1, S, S) and p.partner.shape == (4, channels, S, S)
    assert p.brain.shape == p.lesion.shape == (4, 1, S, S) and p.brain.dtype == p.lesion.dtype == torch.bool
    x = model_input(p)
    assert x.shape == (4, 2, S, S) and x.dtype == torch.float32
    for t in (p.mri, p.partner, x):
        assert 0 <= t.min() and t.max() <= 1
    assert torch.equal(x[:, :1], p.mri)
    expected = rgb_to_y(p.partner) if channels == 3 else p.partner
    assert torch.equal(x[:, 1:], expected)


def test_rgb_to_y_is_bt601_luma():
    rgb = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.2, 0.4, 0.6]).view(4, 3, 1, 1)
    y = rgb_to_y(rgb).flatten()
    assert torch.allclose(y, torch.tensor([0.299, 0.587, 0.114, 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6]))
    with pytest.raises(ValueError, match="rgb"):
        rgb_to_y(torch.zeros(1, 2, 4, 4))


def test_modalities_share_the_anatomy():
    """Each partner's head grows with its MRI's brain (slice level varies the brain's size by
    a factor of ~2): across samples the two areas agree, and not after shuffling partners."""
    for pair in PAIR_TYPES:
        x = model_input(pairs_of(pair))
        mri_area = (x[:, 0] > 0).float().mean((1, 2))  # the skull-stripped MRI's brain
        partner_area = (x[:, 1] > 0.05).float().mean((1, 2))
        assert pearson(mri_area, partner_area) > 0.95, pair
        assert abs(pearson(mri_area, partner_area.roll(1))) < 0.5, pair


@pytest.mark.parametrize("pair", ["CT-MRI", "PET-MRI"])
def test_lesion_shows_in_both_modalities(pair):
    """The MRI's enhancing lesion is brighter than the brain around it in CT and PET too
    (SPECT's detector pixel is often larger than the lesion)."""
    p = pairs_of(pair, n=32)
    x = model_input(p)
    ring = F.max_pool2d(p.lesion.float(), 9, 1, 4).bool() & ~F.max_pool2d(p.lesion.float(), 5, 1, 2).bool() & p.brain
    has = p.lesion.any((1, 2, 3)) & ring.any((1, 2, 3))
    assert has.sum() >= 8
    for channel in (0, 1):
        img = x[:, channel:channel + 1]
        contrast = (img * p.lesion).sum((1, 2, 3)) / p.lesion.sum((1, 2, 3)).clamp(min=1) \
            - (img * ring).sum((1, 2, 3)) / ring.sum((1, 2, 3)).clamp(min=1)
        assert contrast[has].mean() > 0.05, (pair, channel)


def bone_share(x):
    """Share of pixels of (n, 2, S, S) pairs where the partner is bright (> 0.8) outside the
    MRI's brain (the MRI is skull-stripped: 0 outside the brain)."""
    return ((x[:, 1] > 0.8) & (x[:, 0] == 0)).float().mean().item()


def has_bone(x):
    share = bone_share(x)
    assert share > 0.05 or share < 0.001, share  # plenty (CT) or a few blurred pixels (SPECT)
    return share > 0.05


def high_frequency_share(img):
    """Share of the power spectrum of (n, S, S) images above a quarter cycle per pixel."""
    power = torch.fft.fft2(img - img.mean((-2, -1), keepdim=True)).abs() ** 2
    freq = torch.fft.fftfreq(img.shape[-1]).abs()
    return ((power * ((freq[:, None] > 0.25) | (freq[None, :] > 0.25))).sum() / power.sum()).item()


def test_partner_modalities_differ():
    """CT shows bone (bright well outside the MRI's brain); PET and SPECT show none and
    are low-resolution: a far smaller share of fine detail than the MRI."""
    for pair in PAIR_TYPES:
        p = pairs_of(pair)
        x = model_input(p)
        assert torch.equal(x[:, 0] > 0, p.brain[:, 0])
        assert has_bone(x) == (pair == "CT-MRI"), pair
        if pair != "CT-MRI":
            assert high_frequency_share(x[:, 1]) < high_frequency_share(x[:, 0]) / 3, pair


def test_clients_get_one_pair_type_each_in_turn():
    parts = synthetic_fusion_federation(4, samples_per_client=5, image_size=S, seed=0)
    assert [name for name, _, _ in parts] == ["CT-MRI-0", "PET-MRI-0", "SPECT-MRI-0", "CT-MRI-1"]
    names = [name for name, _, _ in synthetic_fusion_federation(3, samples_per_client=5, image_size=S, seed=0)]
    assert names == list(PAIR_TYPES)
    for name, train, test in parts:
        assert len(train) == 4 and len(test) == 1
        for ds in (train, test):
            x, y = ds.tensors
            assert x.shape[1:] == (2, S, S) and torch.equal(x, y)  # the target is the pair itself
        assert has_bone(train.tensors[0]) == name.startswith("CT-MRI"), name


def test_seeded():
    def build(seed):
        return [ds.tensors[0] for _, tr, te in synthetic_fusion_federation(3, samples_per_client=4, image_size=S,
                                                                           seed=seed) for ds in (tr, te)]
    a, b, c = build(1), build(1), build(2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, v) for u, v in zip(a, c))


@pytest.mark.parametrize("kwargs,name", [
    (dict(n_clients=0), "n_clients"), (dict(samples_per_client=1), "samples_per_client"),
    (dict(image_size=16), "image_size"), (dict(seed=-1), "seed")])
def test_bad_arguments(kwargs, name):
    args = {**dict(n_clients=3, samples_per_client=4, image_size=S, seed=0), **kwargs}
    with pytest.raises(ValueError, match=name):
        synthetic_fusion_federation(args.pop("n_clients"), **args)


def test_unknown_pair_type():
    with pytest.raises(ValueError, match="pair"):
        pairs_of("XRAY-MRI")
