"""Super-resolution x2 / x4 / x8 (the paper's BreaKHis setting): a small residual SR
network from MONAI blocks that predicts a residual over bicubic upsampling (so it
starts at bicubic and must end above it), the OmniFM adapter in spatial mode on the
features before upsampling (MONAI SubpixelUpsample), L1 loss, PSNR and SSIM (MONAI)
of the upscaled output against the high-resolution image, and `psnr_bicubic`, the
bicubic answer's PSNR on the same held-out images.

Data: synthetic H&E-like tissue (`--data synthetic`) or the BreaKHis PNG tree
(`--data breakhis --data-root DIR`); scenarios `tissue` (one tumour type per client)
and `magnification` (one magnification per client); `--scale` 2, 4 or 8.
"""
import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.blocks import Convolution, ResidualUnit, SubpixelUpsample
from torch import nn

from ..data.tissue import bicubic_up
from ..fl.client import in_order
from ..nn import OmniFMAdapter
from .base import ClientData, Plain, Task, keep_pooled_features, set_feature_module

SCALES = (2, 4, 8)


class ResidualSR(nn.Module):
    """LR (B, 3, h, w) -> HR (B, 3, h*scale, w*scale) = bicubic(LR) + residual(LR)."""

    def __init__(self, scale, features, blocks=4):
        super().__init__()
        self.scale = scale
        self.head = Convolution(2, 3, features, kernel_size=3, act=None, norm=None)
        self.body = nn.Sequential(*(ResidualUnit(2, features, features, norm=None) for _ in range(blocks)))
        self.features = nn.Identity()  # the adapter's layer: features before upsampling
        self.upsample = SubpixelUpsample(2, features, 3, scale_factor=scale)
        conv = self.upsample.conv_block  # zero residual at start: the model begins at bicubic
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)

    def forward(self, lr):
        f = self.head(lr)
        f = self.features(f + self.body(f))
        return bicubic_up(lr, self.scale) + self.upsample(f)


class SuperResolutionTask(Task):
    name = "super_resolution"
    head_prefix = "backbone.upsample."
    metrics = ("psnr", "ssim", "psnr_bicubic")
    main_metric = "psnr"

    @classmethod
    def defaults(cls, scenario=None):
        # Every client every round, small batches: the residual over bicubic is small and
        # is learnt in a few hundred steps, not a few dozen.
        return {"scenario": scenario or "tissue", "image_size": 64, "clients": 8, "participation": 1.0,
                "batch_size": 8, "lr": 0.05}

    def federation(self):
        cfg = self.cfg
        if cfg.scale not in SCALES:
            raise ValueError(f"scale: expected one of {SCALES}, got {cfg.scale!r}")
        if cfg.data == "synthetic":
            from ..data.tissue import synthetic_sr_federation

            parts = synthetic_sr_federation(cfg.clients, cfg.scenario, scale=cfg.scale, image_size=cfg.image_size,
                                            samples_per_client=cfg.synthetic_samples, seed=cfg.seed)
        elif cfg.data == "breakhis":
            if not cfg.data_root:
                raise ValueError("data_root: required with data='breakhis'")
            from ..data.breakhis import breakhis_federation

            parts = breakhis_federation(cfg.data_root, cfg.clients, cfg.scenario, scale=cfg.scale,
                                        image_size=cfg.image_size, seed=cfg.seed,
                                        max_per_client=cfg.samples_per_client)
        else:
            raise ValueError(f"data: the super_resolution task reads 'synthetic' or 'breakhis', got {cfg.data!r}")
        return [ClientData(*part) for part in parts]

    @property
    def adapter_dim(self):
        return max(8, round(64 * self.cfg.width))

    def build_model(self, *, omnifm, adapter_kwargs):
        backbone = ResidualSR(self.cfg.scale, self.adapter_dim)
        if omnifm:
            size = min(8, self.cfg.image_size // self.cfg.scale)  # the tokenizer sees the LR input
            model = OmniFMAdapter(backbone, "features", self.adapter_dim, 3, mode="spatial", size=size,
                                  **adapter_kwargs)
        else:
            model = Plain(backbone)
        backbone.features.register_forward_hook(keep_pooled_features)
        set_feature_module(model, backbone.features)
        return model

    def loss(self, output, target):
        return F.l1_loss(output, target)

    @torch.no_grad()
    def evaluate(self, model, dataset):
        model.eval()
        psnr, psnr_bicubic = PSNRMetric(max_val=1.0), PSNRMetric(max_val=1.0)
        ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=min(11, self.cfg.image_size // 2 * 2 - 1))
        for lr, hr in in_order(dataset, 64):
            sr = model(lr).clamp(0, 1)
            psnr(sr, hr)
            ssim(sr, hr)
            psnr_bicubic(bicubic_up(lr, self.cfg.scale), hr)
        return {"psnr": psnr.aggregate().item(), "ssim": ssim.aggregate().item(),
                "psnr_bicubic": psnr_bicubic.aggregate().item()}
