"""The tasks' metric wiring against hand-checked cases (perfect, empty, half right)."""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from omnifm.fl import FLConfig
from omnifm.tasks import get_task


class Oracle(nn.Module):
    """Returns a fixed answer per call, whatever the input (stands in for a model)."""

    def __init__(self, answers):
        super().__init__()
        self.answers = list(answers)

    def forward(self, x):
        return self.answers.pop(0)


def masks():
    y = torch.zeros(4, 1, 16, 16)
    y[0, 0, 2:6, 2:6] = 1   # 16 px lesion
    y[1, 0, 8:12, 4:12] = 1  # 32 px lesion
    return y  # slices 2 and 3 have no lesion


def logits_for(pred):
    """2-class logits whose argmax is the binary mask pred (B, 1, H, W)."""
    return torch.cat([1 - pred, pred], 1) * 4 - 2


def segmentation_scores(pred, y):
    task = get_task("segmentation", FLConfig(task="segmentation", scenario="group4"))
    return task.evaluate(Oracle([logits_for(pred)]), TensorDataset(torch.zeros_like(y), y))


def test_segmentation_perfect_empty_and_half():
    y = masks()
    assert segmentation_scores(y, y) == {"dice": 1.0, "iou": 1.0}
    # Nothing predicted: lesion slices score 0, healthy slices 1 (ignore_empty=False).
    assert segmentation_scores(torch.zeros_like(y), y) == pytest.approx({"dice": 0.5, "iou": 0.5})
    # Everything predicted: every slice is wrong somewhere.
    full = segmentation_scores(torch.ones_like(y), y)
    assert full["dice"] == pytest.approx((2 * 16 / (256 + 16) + 2 * 32 / (256 + 32)) / 4)
    assert full["iou"] == pytest.approx((16 / 256 + 32 / 256) / 4)
    # Half of the first lesion found, no false positives: Dice 2*8/(8+16), IoU 8/16 on slice 0.
    half = y.clone()
    half[0, 0, 2:4, 2:6] = 0
    assert segmentation_scores(half, y) == pytest.approx({"dice": (2 * 8 / 24 + 3) / 4, "iou": (0.5 + 3) / 4})


def test_segmentation_prototype_groups():
    task = get_task("segmentation", FLConfig(task="segmentation", scenario="group4"))
    assert task.prototype_groups(masks()).tolist() == [1, 1, 0, 0]


def sr_scores(sr, lr, hr, scale=2):
    task = get_task("super_resolution", FLConfig(task="super_resolution", scenario="tissue", scale=scale,
                                                 image_size=hr.shape[-1]))
    return task.evaluate(Oracle([sr]), TensorDataset(lr, hr))


def test_super_resolution_psnr_ssim_and_bicubic():
    from omnifm.data.tissue import bicubic_down, bicubic_up

    g = torch.Generator().manual_seed(0)
    hr = torch.rand(3, 3, 32, 32, generator=g)
    lr = bicubic_down(hr, 2)
    perfect = sr_scores(hr.clone(), lr, hr)
    assert math.isinf(perfect["psnr"]) and perfect["ssim"] == pytest.approx(1.0, abs=1e-6)
    # A constant error of 0.1 everywhere: MSE 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB.
    off = (hr - 0.1).clamp(0, 1)
    mse = ((off - hr) ** 2).mean((1, 2, 3))
    assert sr_scores(off, lr, hr)["psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-5)
    # The bicubic answer's PSNR is computed on the same images, whatever the model says.
    bic = sr_scores(hr.clone(), lr, hr)["psnr_bicubic"]
    mse_b = ((bicubic_up(lr, 2) - hr) ** 2).mean((1, 2, 3))
    assert bic == pytest.approx((10 * torch.log10(1 / mse_b)).mean().item(), rel=1e-5)


def test_super_resolution_model_starts_at_bicubic():
    from omnifm.data.tissue import bicubic_up

    task = get_task("super_resolution", FLConfig(task="super_resolution", scenario="tissue", scale=4,
                                                 image_size=32, width=0.125))
    model = task.build_model(omnifm=False, adapter_kwargs={})
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(lr), bicubic_up(lr, 4))
