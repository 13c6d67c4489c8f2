"""Multimodal image fusion (the paper's §4.5, Harvard atlas pairs): one fused image from
two co-registered sources, MRI with CT, PET or SPECT, one pair type per client.

Input and target of an item are the same pair (2, H, W) = (MRI, partner; the Y
channel of YCbCr for the colour PET/SPECT): fusion is unsupervised, the loss compares
the fused image with both sources.

Backbone (U2Fusion-style dense encoder-decoder, no normalisation layers): a 3x3 stem
on the concatenated pair, a MONAI ConvDenseBlock (every layer sees all earlier
features), the encoder features at `features`, and a decoder of 3x3 convolutions
narrowing to one channel, then a sigmoid. Widths scale with cfg.width. The sigmoid
keeps the output in [0, 1] with a gradient everywhere; a clamp would give pixels
that overshoot no gradient back.

Loss (U2Fusion's form, with a simpler information measure): per sample, each source
I_i gets an information measure g_i, its mean gradient magnitude (forward differences;
U2Fusion uses the mean squared gradient of pretrained VGG features, which we do not
ship), turned into weights w = softmax(g / TEMPERATURE) over the two sources, so the
sharper, more detailed source counts more. Then

    loss = mean over the batch of  sum_i w_i [(1 - SSIM(F, I_i)) + GRADIENT_WEIGHT * |grad F - grad I_i|^2]

with MONAI's SSIMLoss and the gradient fidelity the mean squared difference of the
forward differences (zero for F = I_i plus a constant).

OmniFM: the adapter runs in spatial mode on the encoder features (before the decoder);
its spectral token is computed from the model input, the 2-channel pair: the
tokenizer's FreqMix mixes the low-pass magnitude spectra of both sources, so the token
describes the anatomy and the partner modality together (which pair type a client
holds). The head (private under FedPer/OmniFM) is the decoder's last convolution, the
one that maps features to the fused intensity.

Metrics, per client on its held-out pairs, each the mean over the samples and over
both sources (the fused image against the MRI and against the partner): VIF
(torchmetrics VisualInformationFidelity, pixel-domain VIF-P, on images scaled to
0..255, the range its visual-noise variance sigma_n^2 = 2 assumes; it needs images of
at least VIF_MIN_SIZE px), SSIM (MONAI SSIMMetric) and L1 (MONAI MAEMetric).

Data: synthetic pairs (`--data synthetic`, `omnifm.data.fusion_pairs`) or the atlas
PNG layout (`--data atlas --data-root DIR`, `omnifm.data.atlas`, one client per pair
folder); one scenario, `pairs` (one pair type per client).
"""
import torch
from monai.losses import SSIMLoss
from monai.metrics import MAEMetric, SSIMMetric
from monai.networks.blocks import Convolution, ConvDenseBlock
from torch import nn

from ..fl.client import in_order
from ..nn import OmniFMAdapter
from .base import ClientData, Plain, Task, keep_pooled_features, set_feature_module

SCENARIOS = ("pairs",)
VIF_MIN_SIZE = 41  # VIF-P's four scales of Gaussian windows (17, 9, 5, 3 px) with downsampling need 41 px
TEMPERATURE = 0.05  # mean gradient magnitudes of [0, 1] sources differ by about 0.01-0.05 per pixel
GRADIENT_WEIGHT = 10.0  # squared gradient differences are ~1e-3: this brings them to SSIM's scale
DENSE_LAYERS = 3
ACT = ("leakyrelu", {"negative_slope": 0.2})


def check_image_size(image_size):
    if image_size < VIF_MIN_SIZE:
        raise ValueError(f"image_size: the fusion task's VIF metric needs images of at least {VIF_MIN_SIZE} px, "
                         f"got image_size {image_size}")


def spatial_gradients(x):
    """Forward differences (dx, dy) of (B, C, H, W) images, each (B, C, H-1, W-1)."""
    return x[..., :-1, 1:] - x[..., :-1, :-1], x[..., 1:, :-1] - x[..., :-1, :-1]


def information_weights(sources, temperature=TEMPERATURE):
    """(B, 2, H, W) sources -> (B, 2) weights summing to 1: softmax over the sources of
    their mean gradient magnitude / temperature (the sharper source weighs more)."""
    dx, dy = spatial_gradients(sources)
    return torch.softmax(torch.sqrt(dx ** 2 + dy ** 2).mean((2, 3)) / temperature, dim=1)


def gradient_fidelity(fused, source):
    """(B,) mean squared difference of the forward differences of fused and source (B, 1, H, W)."""
    (fx, fy), (sx, sy) = spatial_gradients(fused), spatial_gradients(source)
    return ((fx - sx) ** 2).mean((1, 2, 3)) + ((fy - sy) ** 2).mean((1, 2, 3))


def ssim_window(image_size):
    return min(11, image_size // 2 * 2 - 1)


class DenseFusionNet(nn.Module):
    """Pair (B, 2, H, W) -> fused image (B, 1, H, W) in [0, 1] (see module doc)."""

    def __init__(self, stem, growth, layers=DENSE_LAYERS):
        super().__init__()
        self.stem = Convolution(2, 2, stem, kernel_size=3, act=ACT, norm=None)
        self.dense = ConvDenseBlock(2, stem, [growth] * layers, act=ACT, norm=None)
        self.features = nn.Identity()  # the adapter's layer: the encoder features
        dim = stem + layers * growth
        self.decoder = nn.Sequential(
            Convolution(2, dim, dim // 2, kernel_size=3, act=ACT, norm=None),
            Convolution(2, dim // 2, dim // 4, kernel_size=3, act=ACT, norm=None),
            Convolution(2, dim // 4, 1, kernel_size=3, conv_only=True),
        )

    def forward(self, pair):
        return torch.sigmoid(self.decoder(self.features(self.dense(self.stem(pair)))))


class FusionTask(Task):
    name = "fusion"
    head_prefix = "backbone.decoder.2."  # the decoder's last convolution
    metrics = ("vif", "ssim", "l1")
    # SSIM, not VIF: SSIM is bounded in [-1, 1] and comparable across pair types, while
    # VIF-P's scale depends on the sources' contrast (and exceeds 1 for a fused image
    # with more contrast than a source), so a client mean of VIF mixes scales.
    main_metric = "ssim"
    min_image_size = VIF_MIN_SIZE  # the smallest image_size federation() accepts

    def __init__(self, cfg):
        super().__init__(cfg)
        self._ssim_loss = SSIMLoss(spatial_dims=2, data_range=1.0, win_size=ssim_window(cfg.image_size),
                                   reduction="none")

    @classmethod
    def defaults(cls, scenario=None):
        # Three clients (CT-MRI, PET-MRI, SPECT-MRI, as in the paper), all every round.
        # Batch 4, lr 0.05: measured on synthetic pairs (32 training pairs per client, FedAvg),
        # SSIM to the sources rises from 0.11 to 0.70 by round 6; lr 0.1 with batch 8
        # collapsed to a flat output for some rounds before recovering.
        return {"scenario": scenario or "pairs", "clients": 3, "image_size": 64,
                "participation": 1.0, "batch_size": 4, "lr": 0.05}

    def federation(self):
        cfg = self.cfg
        check_image_size(cfg.image_size)
        if cfg.scenario not in SCENARIOS:
            raise ValueError(f"scenario: the fusion task has {SCENARIOS}, got {cfg.scenario!r}")
        if cfg.data == "synthetic":
            from ..data.fusion_pairs import synthetic_fusion_federation

            parts = synthetic_fusion_federation(cfg.clients, samples_per_client=cfg.synthetic_samples,
                                                image_size=cfg.image_size, seed=cfg.seed)
        elif cfg.data == "atlas":
            if not cfg.data_root:
                raise ValueError("data_root: required with data='atlas'")
            from ..data.atlas import atlas_federation

            parts = atlas_federation(cfg.data_root, image_size=cfg.image_size, seed=cfg.seed,
                                     max_per_client=cfg.samples_per_client)
            if len(parts) != cfg.clients:
                raise ValueError(f"clients: {cfg.data_root} has {len(parts)} pair folders "
                                 f"({', '.join(p[0] for p in parts)}), one client each; got clients={cfg.clients}")
        else:
            raise ValueError(f"data: the fusion task reads 'synthetic' or 'atlas', got {cfg.data!r}")
        return [ClientData(*part) for part in parts]

    @property
    def stem_width(self):
        """Channels of the stem and of each dense layer's output (16 at width 0.25)."""
        return max(8, round(64 * self.cfg.width))

    @property
    def adapter_dim(self):
        return (1 + DENSE_LAYERS) * self.stem_width  # the dense block's output: stem + every layer

    def build_model(self, *, omnifm, adapter_kwargs):
        backbone = DenseFusionNet(self.stem_width, growth=self.stem_width)
        if omnifm:
            model = OmniFMAdapter(backbone, "features", self.adapter_dim, 2, mode="spatial",
                                  size=min(8, self.cfg.image_size), **adapter_kwargs)
        else:
            model = Plain(backbone)
        backbone.features.register_forward_hook(keep_pooled_features)
        set_feature_module(model, backbone.features)
        return model

    def loss(self, output, target):
        """output (B, 1, H, W) fused, target (B, 2, H, W) the sources -> scalar (module doc)."""
        per_source = torch.stack([self._ssim_loss(output, source).view(-1)
                                  + GRADIENT_WEIGHT * gradient_fidelity(output, source)
                                  for source in target.split(1, dim=1)], 1)
        return (information_weights(target) * per_source).sum(1).mean()

    @torch.no_grad()
    def evaluate(self, model, dataset):
        from torchmetrics.image import VisualInformationFidelity

        model.eval()
        vif = VisualInformationFidelity()
        ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=ssim_window(self.cfg.image_size))
        l1 = MAEMetric()
        for pair, sources in in_order(dataset, 64):
            check_image_size(min(pair.shape[-2:]))
            fused = model(pair)
            for i in range(2):  # the same count of samples against each source: one mean is the mean of both
                source = sources[:, i:i + 1]
                vif.update(255 * fused, 255 * source)
                ssim(fused, source)
                l1(fused, source)
        return {"vif": vif.compute().item(), "ssim": ssim.aggregate().item(), "l1": l1.aggregate().item()}
