"""Synthetic cross-modality images: one shared anatomy per sample, many modalities.

Each sample draws an anatomy: an organ (a large soft ellipse) and a structure whose
shape is the class label (disk, square, triangle, ring, cross, two disks, ellipse,
bar), with jittered position, size and orientation. Each modality renders that same
anatomy with its own contrast curve, texture, noise, blur and native channel count:

    mri         gray, structure bright, gamma contrast, Rician-like noise, mild blur
    ct          gray, structure dark in a bright organ, streak texture, Gaussian noise
    xray        gray, structure bright on dark, low-frequency gradient, Poisson noise
    pathology   RGB, H&E-like pink tissue, purple structure, dense nuclei texture
    dermoscopy  RGB, skin tone, brown lesion with ragged border, hairs, vignetting

so the same task is seen through different modalities. Seeded and deterministic.
Honest caveat: the generator builds in the paper's own assumption (the anatomy, hence
the low-frequency magnitude spectrum, is shared across modalities while contrast and
texture differ), so results on it show the method working where its premise holds,
not that the premise holds for real scanners.
"""
import math

import torch
import torch.nn.functional as F

MODALITIES = ("mri", "ct", "xray", "pathology", "dermoscopy")
NATIVE_CHANNELS = {"mri": 1, "ct": 1, "xray": 1, "pathology": 3, "dermoscopy": 3}
CLASS_NAMES = ("disk", "square", "triangle", "ring", "cross", "two_disks", "ellipse", "bar")


def _grid(n, size, g):
    """Per-sample rotated, shifted, scaled coordinates (n, size, size) in about [-1, 1]."""
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    cx, cy = (torch.rand(n, 1, 1, generator=g) - 0.5) * 0.5, (torch.rand(n, 1, 1, generator=g) - 0.5) * 0.5
    scale = 0.35 + 0.2 * torch.rand(n, 1, 1, generator=g)
    theta = (torch.rand(n, 1, 1, generator=g) - 0.5) * math.pi / 3
    x, y = (xx - cx) / scale, (yy - cy) / scale
    return x * torch.cos(theta) + y * torch.sin(theta), -x * torch.sin(theta) + y * torch.cos(theta)


def _soft(sd, sharp=12.0):
    """Signed distance (negative inside) -> soft mask in [0, 1]."""
    return torch.sigmoid(-sharp * sd)


def anatomy(labels, size, g):
    """(organ, structure) soft masks, each (n, size, size), for the given class labels."""
    n = labels.shape[0]
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    ax, ay = 0.75 + 0.15 * torch.rand(n, 1, 1, generator=g), 0.6 + 0.2 * torch.rand(n, 1, 1, generator=g)
    organ = _soft(torch.sqrt((xx / ax) ** 2 + (yy / ay) ** 2) - 1, 8.0)
    x, y = _grid(n, size, g)
    r = torch.sqrt(x ** 2 + y ** 2)
    shapes = [
        r - 1,                                                     # disk
        torch.maximum(x.abs(), y.abs()) - 0.85,                    # square
        torch.maximum(torch.maximum(-y - 0.6, y * 0.5 + x.abs() * 0.87 - 0.55), -y - 0.6),  # triangle
        (r - 0.8).abs() - 0.25,                                    # ring
        torch.minimum(torch.maximum(x.abs() - 0.3, y.abs() - 1), torch.maximum(x.abs() - 1, y.abs() - 0.3)),  # cross
        torch.minimum(torch.sqrt((x - 0.6) ** 2 + y ** 2), torch.sqrt((x + 0.6) ** 2 + y ** 2)) - 0.45,  # two disks
        torch.sqrt((x / 1.2) ** 2 + (y / 0.5) ** 2) - 1,           # ellipse
        torch.maximum((x - y).abs() / 1.41 - 0.25, (x + y).abs() / 1.41 - 1.1),  # bar
    ]
    sd = torch.stack(shapes, 1)[torch.arange(n), labels]
    return organ, _soft(sd)


def _blur(img, sigma):
    if sigma <= 0:
        return img
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[1]
    img = F.conv2d(F.pad(img, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(img, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def render(organ, structure, modality, g):
    """Render masks (n, S, S) as modality images (n, C_native, S, S) in [0, 1]."""
    n, S, _ = organ.shape
    noise = lambda c=1: torch.randn(n, c, S, S, generator=g)
    o, s = organ[:, None], structure[:, None]
    lin = torch.linspace(-1, 1, S)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    if modality == "mri":
        img = (0.08 + 0.4 * o + 0.45 * s * o + 0.3 * s * (1 - o)).clamp(0, 1) ** 0.8
        img = _blur(img, 0.6)
        img = torch.sqrt((img + 0.05 * noise()) ** 2 + (0.05 * noise()) ** 2)
    elif modality == "ct":
        streaks = 0.05 * torch.sin(20 * (xx * 0.8 + yy * 0.6))[None, None]
        img = 0.1 + 0.65 * o - 0.45 * s + streaks * o
        img = _blur(img, 0.3) + 0.03 * noise()
    elif modality == "xray":
        grad = (0.15 + 0.1 * yy)[None, None]
        img = _blur(grad + 0.25 * o + 0.5 * s, 1.0)
        img = torch.poisson(img.clamp(0, 1) * 60, generator=g) / 60
    elif modality == "pathology":
        tissue, struct = torch.tensor([0.92, 0.62, 0.78]), torch.tensor([0.45, 0.22, 0.62])
        nuclei = (torch.rand(n, 1, S, S, generator=g) > 0.93).float()
        img = tissue.view(1, 3, 1, 1) * (1 - s) + struct.view(1, 3, 1, 1) * s
        img = img * (0.75 + 0.25 * o) - 0.25 * _blur(nuclei, 0.5)
        img = _blur(img, 0.8) + 0.02 * noise(3)
    elif modality == "dermoscopy":
        skin, lesion = torch.tensor([0.86, 0.66, 0.52]), torch.tensor([0.38, 0.24, 0.15])
        ragged = (s + 0.25 * _blur(noise(), 1.0)).clamp(0, 1)
        img = skin.view(1, 3, 1, 1) * (1 - ragged) + lesion.view(1, 3, 1, 1) * ragged
        hair = (torch.sin(6 * xx[None, None] + 3 * torch.rand(n, 1, 1, 1, generator=g) * yy[None, None]).abs() < 0.04).float()
        vignette = (1 - 0.35 * (xx ** 2 + yy ** 2))[None, None]
        img = (img * (1 - 0.6 * hair)) * vignette + 0.02 * noise(3)
    else:
        raise ValueError(f"modality: expected one of {MODALITIES}, got {modality!r}")
    return img.clamp(0, 1)


def make_dataset(n, modality, *, image_size=32, n_classes=8, labels=None, seed=0):
    """n images of one modality -> (images (n, 3, S, S) float32 in [0, 1], labels (n,) int64).

    Gray modalities are replicated to 3 channels so every client shares one backbone
    input; labels may be given (e.g. by a partitioner) or are drawn uniformly.
    """
    if not 1 <= n_classes <= len(CLASS_NAMES):
        raise ValueError(f"n_classes: must be in [1, {len(CLASS_NAMES)}], got {n_classes}")
    if modality not in MODALITIES:
        raise ValueError(f"modality: expected one of {MODALITIES}, got {modality!r}")
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        labels = torch.randint(0, n_classes, (n,), generator=g)
    organ, structure = anatomy(labels, image_size, g)
    img = render(organ, structure, modality, g)
    if img.shape[1] == 1:
        img = img.repeat(1, 3, 1, 1)
    return img.float(), labels.long()
