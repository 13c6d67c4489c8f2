"""Synthetic H&E-like super-resolution data and the bicubic resamplers."""
import numpy as np
import pytest
import torch
from PIL import Image

from omnifm.data import tissue
from omnifm.data.tissue import (MAGNIFICATIONS, TISSUE_TYPES, bicubic_down, bicubic_up, render_tissue,
                                synthetic_sr_federation)

pytestmark = pytest.mark.usefixtures("one_thread")


def pil_bicubic(x, size):
    """PIL's bicubic resize (the reference implementation) of a (C, H, W) float image."""
    return np.stack([np.asarray(Image.fromarray(c.numpy(), mode="F").resize(size[::-1], Image.BICUBIC)) for c in x])


def psnr(out, ref):
    return (10 * torch.log10(1 / ((out - ref) ** 2).mean(dim=(1, 2, 3)))).mean().item()


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_bicubic_matches_pil(scale):
    """Both resamplers are PIL's bicubic (antialiased when downsampling), clamped to [0, 1]:
    on binary blocks the kernel's negative lobes overshoot, so the clamp is exercised."""
    g = torch.Generator().manual_seed(scale)
    blocks = (torch.rand(2, 3, 16 // scale, 24 // scale, generator=g) > 0.5).float()
    hr = blocks.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    lr = bicubic_down(hr, scale)
    assert lr.shape == (2, 3, 16 // scale, 24 // scale)
    up = bicubic_up(blocks[1], scale)  # also unbatched
    for out, x, size in ((lr[1], hr[1], (16 // scale, 24 // scale)), (up, blocks[1], (16, 24))):
        ref = pil_bicubic(x, size)
        assert ref.min() < -0.01
        np.testing.assert_allclose(out.numpy(), np.clip(ref, 0, 1), atol=1e-5)


def test_scale_must_divide_image_size():
    with pytest.raises(ValueError, match="image_size: 30 is not divisible by scale 4"):
        bicubic_down(torch.zeros(3, 30, 32), 4)
    with pytest.raises(ValueError, match="image_size: 36 is not divisible by scale 8"):
        synthetic_sr_federation(2, "tissue", scale=8, samples_per_client=4, image_size=36, seed=0)
    with pytest.raises(ValueError, match="scale"):
        bicubic_up(torch.zeros(3, 4, 4), 0)


def test_federation_pairs_and_split():
    """Names, 80/20 sizes, shapes and range; each input is its target's bicubic
    downscaling; no image is in both splits."""
    fed = synthetic_sr_federation(3, "magnification", scale=4, samples_per_client=10, image_size=32, seed=0)
    assert [name for name, _, _ in fed] == ["40X", "100X", "200X"]
    for _, train, test in fed:
        assert (len(train), len(test)) == (8, 2)
        for lr, hr in (train.tensors, test.tensors):
            assert lr.dtype == hr.dtype == torch.float32
            assert lr.shape[1:] == (3, 8, 8) and hr.shape[1:] == (3, 32, 32)
            assert 0 <= hr.min() and hr.max() <= 1
            assert (hr.std(dim=(1, 2, 3)) > 0.02).all()  # textured, not flat
            torch.testing.assert_close(lr, bicubic_down(hr, 4), rtol=0, atol=0)
        assert torch.cdist(train.tensors[1].flatten(1), test.tensors[1].flatten(1)).min() > 1


def test_deterministic_per_seed_and_client():
    """Same seed, same data; another seed, other data; a client's data does not depend
    on how many clients there are."""
    a = synthetic_sr_federation(2, "tissue", scale=2, samples_per_client=5, image_size=16, seed=3)
    b = synthetic_sr_federation(3, "tissue", scale=2, samples_per_client=5, image_size=16, seed=3)
    c = synthetic_sr_federation(2, "tissue", scale=2, samples_per_client=5, image_size=16, seed=4)
    for (_, tr_a, te_a), (_, tr_b, te_b) in zip(a, b):
        for x, y in zip(tr_a.tensors + te_a.tensors, tr_b.tensors + te_b.tensors):
            assert torch.equal(x, y)
    assert not torch.allclose(a[0][1].tensors[1], c[0][1].tensors[1])


@pytest.mark.parametrize("scenario", ["tissue", "magnification"])
def test_scenario_rule(scenario, monkeypatch):
    """tissue: client i renders only type i % 8, magnifications mixed; magnification:
    client i renders only magnification i % 4, types mixed. Shared groups get -k names."""
    calls = []  # (generator, tissue type, magnification, n): each client has its own generator

    def spy(n, tissue_type, magnification, size, g):
        calls.append((g, tissue_type, magnification, n))
        return render_tissue(n, tissue_type, magnification, size, g)

    monkeypatch.setattr(tissue, "render_tissue", spy)
    n_clients = 10
    groups, fixed = (TISSUE_TYPES, 1) if scenario == "tissue" else (MAGNIFICATIONS, 2)
    fed = synthetic_sr_federation(n_clients, scenario, scale=2, samples_per_client=12, image_size=8, seed=0)
    generators = list(dict.fromkeys(c[0] for c in calls))
    per_client = [[c for c in calls if c[0] is g] for g in generators]
    assert len(per_client) == n_clients
    for i, (name, _, _) in enumerate(fed):
        group = groups[i % len(groups)]
        assert name == f"{group}-{i // len(groups)}"
        assert {c[fixed] for c in per_client[i]} == {group}
        assert len({c[3 - fixed] for c in per_client[i]}) > 1
        assert sum(c[3] for c in per_client[i]) == 12
    assert not torch.equal(fed[0][1].tensors[1], fed[len(groups)][1].tensors[1])  # same group, own data


def test_magnification_sets_the_detail():
    """Higher magnification zooms in: less detail per pixel, so the bicubic baseline's
    PSNR rises from 40X to 400X (it is what the SR network has to beat)."""
    fed = synthetic_sr_federation(4, "magnification", scale=4, samples_per_client=10, image_size=32, seed=0)
    baseline = [psnr(bicubic_up(train.tensors[0], 4), train.tensors[1]) for _, train, _ in fed]
    assert all(b - a > 2 for a, b in zip(baseline, baseline[1:])), baseline


def test_tissue_types_differ():
    """Type statistics (mean colour, contrast, fine detail) vary much more between the
    eight types than between two independent batches of one type."""
    def stats(seed):
        out = []
        for t in TISSUE_TYPES:
            x = render_tissue(8, t, "40X", 32, torch.Generator().manual_seed(seed))
            detail = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(2, 3))
            out.append(torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), detail], 1).mean(0))
        return torch.stack(out)

    a, b = stats(1), stats(2)
    within = (a - b).norm(dim=1).mean()
    between = torch.cdist(a, a).sum() / (len(a) * (len(a) - 1))
    assert between > 3 * within, (between, within)


def test_bad_arguments():
    kwargs = dict(scale=2, samples_per_client=4, image_size=8, seed=0)
    with pytest.raises(ValueError, match="scenario"):
        synthetic_sr_federation(2, "dirichlet", **kwargs)
    with pytest.raises(ValueError, match="n_clients"):
        synthetic_sr_federation(0, "tissue", **kwargs)
    with pytest.raises(ValueError, match="samples_per_client"):
        synthetic_sr_federation(2, "tissue", **dict(kwargs, samples_per_client=1))
