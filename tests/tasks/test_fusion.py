"""The fusion task: metric wiring on hand-checked cases, the loss and its information
weights, the image-size guard, and the data sources through the task."""
import math

import pytest
import torch
from monai.metrics import SSIMMetric
from torch.utils.data import TensorDataset
from torchmetrics.functional.image import visual_information_fidelity

from omnifm.fl import FLConfig
from omnifm.tasks.fusion import (GRADIENT_WEIGHT, TEMPERATURE, FusionTask, gradient_fidelity, information_weights,
                                 ssim_window)

pytestmark = pytest.mark.usefixtures("one_thread")

S = 48  # the smallest size VIF takes is 41


def task(**kwargs):
    return FusionTask(FLConfig(task="fusion", **{**FusionTask.defaults(), "image_size": S, "width": 0.125,
                                                 "samples_per_client": 5, **kwargs}))


def textured(n=2, seed=0):
    """(n, 1, S, S) smooth random images in [0.1, 0.9]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, S // 4, S // 4, generator=g)
    return 0.1 + 0.8 * torch.nn.functional.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)


def ramp(slope):
    """(1, 1, S, S) image rising by `slope` per pixel to the right."""
    return (slope * torch.arange(S, dtype=torch.float32)).expand(1, 1, S, S).clone()


class Fixed(torch.nn.Module):
    """A 'model' returning fuse(pair): stands in for a network in the metric wiring."""

    def __init__(self, fuse):
        super().__init__()
        self.fuse = fuse

    def forward(self, pair):
        return self.fuse(pair)


def evaluate(sources, fuse):
    pairs = torch.cat(sources, 1)
    return task().evaluate(Fixed(fuse), TensorDataset(pairs, pairs))


def test_identical_sources_and_fused_image_score_perfectly():
    img = textured()
    m = evaluate([img, img], lambda pair: pair[:, :1])
    assert m["vif"] == pytest.approx(1, abs=1e-5) and m["ssim"] == pytest.approx(1, abs=1e-5)
    assert m["l1"] == pytest.approx(0, abs=1e-7)


def test_l1_is_the_mean_over_both_sources():
    """Sources a and a + 0.3, fused a + 0.1: L1 0.1 to one, 0.2 to the other, mean 0.15."""
    a = textured()
    m = evaluate([a, a + 0.3], lambda pair: pair[:, :1] + 0.1)
    assert m["l1"] == pytest.approx(0.15, abs=1e-6)


def test_ssim_is_the_mean_over_both_sources():
    """Flat images: SSIM(c, d) = (2cd + C1) / (c^2 + d^2 + C1), C1 = 0.01^2 (the contrast
    term is C2 / C2 = 1). Sources 0.3 and 0.5, fused 0.5: the mean of that and 1."""
    c1 = 0.01 ** 2
    expected = ((2 * 0.5 * 0.3 + c1) / (0.5 ** 2 + 0.3 ** 2 + c1) + 1) / 2
    flat = torch.ones(2, 1, S, S)
    m = evaluate([0.3 * flat, 0.5 * flat], lambda pair: pair[:, 1:])
    assert m["ssim"] == pytest.approx(expected, abs=1e-4)  # float32 variances of flat images: ~1e-5 off


def test_vif_is_on_8_bit_scale_and_shift_invariant():
    """VIF ignores a mean shift (= 1 for source + constant); a halved contrast scores
    torchmetrics' VIF on 0..255 images (the scale its noise variance assumes), not on 0..1."""
    a = textured()
    assert evaluate([a, a], lambda pair: pair[:, :1] + 0.05)["vif"] == pytest.approx(1, abs=1e-3)
    halved = evaluate([a, a], lambda pair: 0.5 * pair[:, :1])["vif"]
    assert halved == pytest.approx(visual_information_fidelity(127.5 * a, 255 * a).item(), rel=1e-5)
    assert abs(halved - visual_information_fidelity(0.5 * a, a).item()) > 0.05


def test_small_images_are_refused_naming_image_size():
    with pytest.raises(ValueError, match="image_size.*41.*got image_size 32"):
        task(image_size=32).federation()


def test_information_weights_sum_to_one_and_favour_the_sharper_source():
    """Sources: flat (no gradient) and a ramp of slope s: weights softmax([0, s] / T)."""
    slope = 0.02
    sources = torch.cat([torch.zeros(1, 1, S, S), ramp(slope)], 1)
    w = information_weights(sources)
    expected = 1 / (1 + math.exp(-slope / TEMPERATURE))
    assert w.shape == (1, 2) and torch.allclose(w, torch.tensor([[1 - expected, expected]]), atol=1e-6)
    both = torch.cat([textured(1, seed=1), textured(1, seed=1) * 0.2], 1)  # the second has a fifth of the contrast
    w = information_weights(both)
    assert torch.allclose(w.sum(1), torch.ones(1)) and w[0, 0] > w[0, 1]


def test_gradient_fidelity_by_hand():
    a = textured(1)
    assert gradient_fidelity(a + 0.2, a).item() == pytest.approx(0, abs=1e-12)  # a constant has no gradient
    assert gradient_fidelity(ramp(0.01), ramp(0.03)).item() == pytest.approx(0.02 ** 2, rel=1e-4)  # dx only
    down = ramp(0.01).transpose(2, 3)  # rising downwards: dy only
    assert gradient_fidelity(down, 3 * down).item() == pytest.approx(0.02 ** 2, rel=1e-4)


def test_loss_is_zero_at_identical_sources_and_weights_the_other_source():
    t = task()
    a = textured(1)
    assert t.loss(a, torch.cat([a, a], 1)).item() == pytest.approx(0, abs=1e-5)
    # Fused = source 1: only source 2's terms remain, weighted by w2.
    b = textured(1, seed=3) * 0.5
    sources = torch.cat([a, b], 1)
    w2 = information_weights(sources)[0, 1].item()
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=ssim_window(S))(a, b).item()
    expected = w2 * ((1 - ssim) + GRADIENT_WEIGHT * gradient_fidelity(a, b).item())
    assert t.loss(a, sources).item() == pytest.approx(expected, rel=1e-4)


def test_loss_decreases_with_training():
    t = task()
    parts = t.federation()
    torch.manual_seed(0)
    model = t.build_model(omnifm=False, adapter_kwargs={})
    x, y = parts[0].train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = t.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert model(x).shape == (len(x), 1, S, S)


def test_fused_image_is_in_the_unit_range_for_any_input():
    torch.manual_seed(0)
    model = task().build_model(omnifm=False, adapter_kwargs={})
    for scale in (-100, 100):
        out = model(scale * textured(2).expand(2, 2, S, S))
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("kwargs,name", [(dict(scenario="tissue"), "scenario"), (dict(data="fets"), "data"),
                                         (dict(data="atlas"), "data_root")])
def test_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        task(**kwargs).federation()


def test_atlas_through_the_task(tmp_path):
    from tests.data.test_atlas import write_tree

    root = write_tree(tmp_path, pairs=("CT-MRI", "PET-MRI"))
    parts = task(data="atlas", data_root=root, clients=2).federation()
    assert [p.name for p in parts] == ["CT-MRI", "PET-MRI"]
    assert parts[0].train.tensors[0].shape[1:] == (2, S, S)
    with pytest.raises(ValueError, match="clients: .* has 2 pair folders \\(CT-MRI, PET-MRI\\).*clients=3"):
        task(data="atlas", data_root=root, clients=3).federation()
