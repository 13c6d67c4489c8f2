"""Synthetic co-registered image pairs for multimodal fusion (the Harvard atlas setting).

Each sample is one brain slice (the anatomy of `omnifm.data.lesions`: brain outline,
grey-matter band, ventricles, and in some slices a tumour with an enhancing rim,
necrotic core and edema) rendered in two modalities:

    MRI    the lesions module's T1ce-like acquisition of the client's scanner
           (bias field, Rician noise, intensity curve), skull-stripped: soft-tissue
           contrast, no bone
    CT     bone bright (a skull ring around the brain), scalp, brain parenchyma with
           low soft-tissue contrast, CSF dark, Gaussian noise
    PET    a function image: glucose uptake (grey matter above white matter, CSF and
           necrosis cold, enhancing tumour hot), acquired on a coarse detector grid
           (24 pixels across the image, ~6 mm) with Poisson counting noise, shown
           through the "hot" colour map (RGB)
    SPECT  a perfusion image: as PET with other weights, on a coarser grid (16
           across, ~10 mm) with fewer counts, shown through the "jet" colour map
           (RGB); its detector pixel is often larger than the lesion, and jet's
           luminance is not monotone, so the lesion is faint in its Y channel

One pair type per client: client 1 CT-MRI, client 2 PET-MRI, client 3 SPECT-MRI;
with more clients the pair types repeat (client k takes PAIR_TYPES[k % 3]) and each
client also has its own MRI scanner (`lesions.draw_institution`).

Colour PET/SPECT are fused on the Y channel of YCbCr, as is standard (the fused Y is
recombined with the function image's Cb and Cr for display): a model input is the
single-channel pair (MRI, Y of the partner), `rgb_to_y` (ITU-R BT.601 luma, as PIL
and OpenCV convert). The atlas loader (`omnifm.data.atlas`) uses the same conversion.

Honest caveat: the premise of fusion is built in: both images are perfectly
co-registered renderings of one anatomy, and the modalities differ only in contrast,
resolution, noise and which tissue they show. Results here show a method fusing under
that premise, not coping with the misregistration and artefacts of real scans.
"""
from typing import NamedTuple

import matplotlib
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .lesions import MIN_IMAGE_SIZE, _acquire, _anatomy, client_seed, draw_institution
from .synthetic import _blur
from .tissue import client_names

PAIR_TYPES = ("CT-MRI", "PET-MRI", "SPECT-MRI")
PARTNER = {"CT-MRI": "CT", "PET-MRI": "PET", "SPECT-MRI": "SPECT"}
Y_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, the Y of JPEG's (PIL's, OpenCV's) YCbCr

# Function imaging: (grey-matter gain, tumour gain, detector pixels across the image, counts at full
# uptake, colour map). A 64 px slice is ~3 mm/px; PET resolves ~6 mm, SPECT ~10 mm.
FUNCTION = {
    "PET": (0.35, 0.7, 24, 200.0, "hot"),
    "SPECT": (0.45, 0.5, 16, 60.0, "jet"),
}


class FusionPairs(NamedTuple):
    """n co-registered pairs: mri (n, 1, S, S) and partner (n, C, S, S) (C = 1 for CT,
    3 for the colour PET/SPECT) float32 in [0, 1]; the shared anatomy's brain and
    lesion masks (n, 1, S, S) bool."""
    mri: torch.Tensor
    partner: torch.Tensor
    brain: torch.Tensor
    lesion: torch.Tensor


def rgb_to_y(rgb):
    """(..., 3, H, W) RGB in [0, 1] -> (..., 1, H, W) the Y (luma) channel of YCbCr."""
    if rgb.dim() < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb: expected (..., 3, H, W), got shape {tuple(rgb.shape)}")
    w = torch.tensor(Y_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * w).sum(-3, keepdim=True)


def model_input(pairs):
    """FusionPairs -> (n, 2, S, S): channel 0 the MRI, channel 1 the partner (its Y if colour)."""
    partner = rgb_to_y(pairs.partner) if pairs.partner.shape[1] == 3 else pairs.partner
    return torch.cat([pairs.mri, partner], 1)


def _dilate(mask, radius):
    """Binary dilation of a (n, 1, S, S) float mask by a square of the given radius."""
    return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius)


def _ct(t, brain, g):
    """Head CT (n, 1, S, S): skull ring a CSF gap away from the brain, scalp, parenchyma."""
    n, size, _ = t.shape
    unit = max(1, round(size / 64))  # one pixel at 64 px, scaled with the image
    inner = _dilate(brain, unit)
    bone = _dilate(brain, 5 * unit) - inner
    head = _dilate(brain, 6 * unit)
    soft = 0.35 + 0.3 * (t[:, None] - 0.55)  # grey/white differ little, CSF dark, enhancing tumour bright
    img = 0.3 * head + (soft - 0.3) * brain + (0.95 - 0.3) * bone
    img = _blur(img, 0.5) + 0.015 * torch.randn(n, 1, size, size, generator=g)
    return (img * head).clamp(0, 1)


def _function(t, brain, tracer, g):
    """Colour function image (n, 3, S, S) of one tracer (see FUNCTION)."""
    n, size, _ = t.shape
    grey_gain, tumour_gain, detector_pixels, counts, cmap = FUNCTION[tracer]
    divisor = max(2, round(size / detector_pixels))
    t = t[:, None]
    band = max(1, round(size / 16))
    cortex = brain - (-_dilate(-brain, band))  # the brain's outer band (erosion = -dilate(-x))
    cold = ((0.3 - t) / 0.15).clamp(0, 1)  # ventricles and necrotic cores (T1 dark)
    hot = ((t - 0.7) / 0.2).clamp(0, 1)  # enhancing tumour (T1ce bright)
    uptake = (brain * (0.4 + grey_gain * cortex) * (1 - 0.8 * cold) + tumour_gain * hot * brain).clamp(0, 1)
    low = F.avg_pool2d(_blur(uptake, divisor / 2), divisor, ceil_mode=True)  # the detector's resolution
    low = torch.poisson(low * counts, generator=g) / counts
    activity = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    rgb = torch.from_numpy(matplotlib.colormaps[cmap](activity[:, 0].numpy())[..., :3]).float().permute(0, 3, 1, 2)
    return rgb * (activity / 0.05).clamp(max=1)  # black outside the head, as the atlas shows it


def render_pairs(n, pair, inst, *, image_size, g):
    """n FusionPairs of one pair type (PAIR_TYPES), MRI from institution `inst`, drawn from g."""
    if pair not in PAIR_TYPES:
        raise ValueError(f"pair: expected one of {PAIR_TYPES}, got {pair!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size: need an int >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    t, brain, lesion = _anatomy(n, image_size, inst, g)
    mri = _acquire(t, brain, inst, g)
    brain_f = brain[:, None].float()
    partner = _ct(t, brain_f, g) if pair == "CT-MRI" else _function(t, brain_f, PARTNER[pair], g)
    return FusionPairs(mri.float(), partner.float(), brain[:, None], lesion[:, None])


def synthetic_fusion_federation(n_clients, *, samples_per_client, image_size, seed):
    """[(name, train TensorDataset, test TensorDataset)] per client, one pair type per client
    (see module doc), 80/20 split. Items are (pair, pair), pair = model_input (2, S, S): the
    sources are the target (the fusion loss is unsupervised)."""
    if not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"n_clients: need an int >= 1, got {n_clients!r}")
    if not isinstance(samples_per_client, int) or samples_per_client < 2:
        raise ValueError(f"samples_per_client: need an int >= 2 (a train and a test sample), "
                         f"got {samples_per_client!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: need an int >= 0, got {seed!r}")
    n_test = max(1, round(0.2 * samples_per_client))
    k = samples_per_client - n_test  # samples are i.i.d. within a client
    clients = []
    for cid, name in enumerate(client_names(PAIR_TYPES, n_clients)):
        g = torch.Generator().manual_seed(client_seed(seed, cid))
        pairs = render_pairs(samples_per_client, PAIR_TYPES[cid % len(PAIR_TYPES)], draw_institution(g),
                             image_size=image_size, g=g)
        x = model_input(pairs)
        clients.append((name, TensorDataset(x[:k], x[:k]), TensorDataset(x[k:], x[k:])))
    return clients
