"""Segmentation (the paper's FeTS 2022 T1ce setting): MONAI UNet, the OmniFM adapter
in spatial mode at the bottleneck, DiceCE loss, foreground Dice and IoU (MONAI).

Data: synthetic brain-MRI-like slices with a lesion mask (`--data synthetic`) or the
BraTS/FeTS NIfTI layout (`--data fets --data-root DIR`, partitioning_1.csv there);
scenarios group1..group4 (the paper's groups of 9 / 6 / 5 / 3 institutions), and
`all` for FeTS (every partition one client).

Metrics are per slice, then averaged: with `ignore_empty=False`, a slice without
lesion scores 1 when nothing is predicted and 0 otherwise, so false positives on
healthy slices count.
"""
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.nets import UNet

from ..fl.client import in_order
from ..nn import OmniFMAdapter
from .base import ClientData, Plain, Task, keep_pooled_features, set_feature_module

BASE_CHANNELS = (16, 32, 64, 128, 256)  # MONAI's UNet tutorial setting, at --width 0.25
STRIDES = (2, 2, 2, 2)
BOTTLENECK = "model.1.submodule.1.submodule.1.submodule.1.submodule"  # the UNet's deepest block


def channels(width):
    return tuple(max(4, round(c * 4 * width)) for c in BASE_CHANNELS)


class SegmentationTask(Task):
    name = "segmentation"
    head_prefix = "backbone.model.2."  # the UNet's last up-sampling block (the output layer)
    metrics = ("dice", "iou")
    main_metric = "dice"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._loss = DiceCELoss(to_onehot_y=True, softmax=True)

    @classmethod
    def defaults(cls, scenario=None):
        from ..data.lesions import GROUPS

        scenario = scenario or "group4"
        # All institutions train every round (few clients, as in FeTS); small batches
        # and a higher step size: lesions are ~1-2 % of pixels and DiceCE needs some
        # hundred steps before the UNet predicts any foreground.
        return {"scenario": scenario, "image_size": 64, "participation": 1.0, "batch_size": 8, "lr": 0.05,
                **({"clients": len(GROUPS[scenario])} if scenario in GROUPS else {})}

    def federation(self):
        cfg = self.cfg
        if cfg.image_size % 16:
            raise ValueError(f"image_size: the UNet halves it four times, so it must be a multiple of 16, "
                             f"got {cfg.image_size}")
        if cfg.data == "synthetic":
            from ..data.lesions import synthetic_segmentation_federation

            parts = synthetic_segmentation_federation(cfg.scenario, samples_per_client=cfg.synthetic_samples,
                                                      image_size=cfg.image_size, seed=cfg.seed)
        elif cfg.data == "fets":
            if not cfg.data_root:
                raise ValueError("data_root: required with data='fets'")
            from ..data.fets import fets_federation

            parts = fets_federation(cfg.data_root, cfg.scenario, image_size=cfg.image_size, seed=cfg.seed,
                                    max_slices_per_client=cfg.samples_per_client)
        else:
            raise ValueError(f"data: the segmentation task reads 'synthetic' or 'fets', got {cfg.data!r}")
        return [ClientData(*part) for part in parts]

    @property
    def adapter_dim(self):
        return channels(self.cfg.width)[-1]

    def build_model(self, *, omnifm, adapter_kwargs):
        backbone = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=channels(self.cfg.width),
                        strides=STRIDES, num_res_units=2)
        if omnifm:
            size = min(8, self.cfg.image_size)
            model = OmniFMAdapter(backbone, BOTTLENECK, self.adapter_dim, 1, mode="spatial", size=size,
                                  **adapter_kwargs)
        else:
            model = Plain(backbone)
        bottleneck = dict(backbone.named_modules())[BOTTLENECK]
        bottleneck.register_forward_hook(keep_pooled_features)
        set_feature_module(model, bottleneck)
        return model

    def loss(self, output, target):
        return self._loss(output, target)

    @torch.no_grad()
    def evaluate(self, model, dataset):
        model.eval()
        dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
        iou = MeanIoU(include_background=False, reduction="mean", ignore_empty=False)
        for x, y in in_order(dataset, 64):
            pred = torch.nn.functional.one_hot(model(x).argmax(1), 2).permute(0, 3, 1, 2).float()
            truth = torch.cat([1 - y, y], 1)
            dice(pred, truth)
            iou(pred, truth)
        return {"dice": dice.aggregate().item(), "iou": iou.aggregate().item()}

    def prototype_groups(self, targets):
        return (targets.flatten(1).amax(1) > 0).long()  # slices with and without lesion
