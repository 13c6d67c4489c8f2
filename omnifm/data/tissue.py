"""Synthetic H&E-like tissue for super-resolution, and the bicubic degradation.

`render_tissue` draws breast-histology-like RGB textures: pink eosin stroma crossed by
wavy collagen fibres, purple hematoxylin nuclei of varying density, size and
pleomorphism, and glands or ducts (white lumens, some with papillary fronds, lined by
a band of crowded epithelial nuclei) or pale mucin pools, coloured by Beer-Lambert
mixing of the two stains' optical densities. Eight tissue types, named after
BreaKHis's tumour types, differ in those statistics (e.g. packed small tubules for
tubular adenoma, compressed slit-like ducts in dense fibres for fibroadenoma, sheets of
large pleomorphic nuclei for ductal carcinoma, single files of small nuclei along
fibres for lobular carcinoma, mucin pools for mucinous carcinoma). A magnification
(40X/100X/200X/400X) zooms the same tissue: every length (nucleus, gland, fibre
spacing, stain mottling) scales with it, and a defocus blur grows with it, so 40X
images are full of barely resolved detail and 400X images show a few large nuclei.

`synthetic_sr_federation` gives each client pairs (low-resolution input, high-
resolution target), the input being the target's bicubic downscaling (`bicubic_down`),
non-IID as the paper's two BreaKHis splits: `tissue` (each client one tissue type,
magnifications mixed) or `magnification` (each client one magnification, types mixed).

Honest caveat: the low-resolution input is exactly the bicubic downscaling of the
target, the same degradation in training and test (the paper's protocol, not a real
microscope's optics), and the tissue types differ only in the hand-picked texture
statistics above, so heterogeneity between clients is what these parameters build in.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .synthetic import _blur, _soft

TISSUE_TYPES = ("adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma",
                "ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma")
MAGNIFICATIONS = ("40X", "100X", "200X", "400X")
ZOOM = {"40X": 0.5, "100X": 1.0, "200X": 2.0, "400X": 4.0}  # pixel lengths relative to 100X
SCENARIOS = ("tissue", "magnification")

# Unit optical-density vectors (RGB): hematoxylin as in Ruifrok & Johnston; eosin
# from a typical pink stroma pixel (240, 150, 190), pinker than their magenta vector.
_HEMA = F.normalize(torch.tensor([0.65, 0.70, 0.29]), dim=0)
_EOSIN = F.normalize(torch.tensor([0.06, 0.47, 0.23]), dim=0)


@dataclass(frozen=True)
class _Texture:
    """A tissue type's statistics; lengths in pixels at 100X, densities per 100 px^2."""
    nuclei: float           # stromal/sheet nucleus density
    radius: float           # nucleus radius
    pleo: float             # relative spread of nucleus radii (pleomorphism)
    glands: float = 0.0     # glands per 1000 px^2
    gland_radius: float = 5.0
    elong: float = 1.2      # gland aspect ratio
    fronds: float = 0.0     # papillary boundary ripple (relative radius)
    epi: float = 3.0        # epithelium thickness around a gland (0: bare pool)
    epi_nuclei: float = 8.0  # nucleus density in the epithelium
    fibres: float = 0.4     # collagen fibre strength
    spacing: float = 6.0    # fibre spacing
    single_file: bool = False  # stromal nuclei only along fibres (lobular pattern)
    mucin: bool = False     # lumens are pale blue-grey mucin instead of empty
    eosin: float = 0.55
    hema: float = 1.1


_TEXTURES = {
    "adenosis": _Texture(0.6, 1.6, 0.1, glands=1.5, gland_radius=5.0, elong=1.3, epi=4.0, fibres=0.5),
    "fibroadenoma": _Texture(0.4, 1.5, 0.1, glands=0.6, gland_radius=8.0, elong=4.0, fibres=0.9, spacing=5.0,
                             eosin=0.7),
    "phyllodes_tumor": _Texture(2.0, 1.7, 0.2, glands=0.3, gland_radius=9.0, elong=5.0, fronds=0.3, fibres=0.6,
                                spacing=7.0, eosin=0.6),
    "tubular_adenoma": _Texture(0.5, 1.6, 0.1, glands=3.0, gland_radius=4.0, epi=3.5, epi_nuclei=12.0,
                                fibres=0.2, spacing=8.0, eosin=0.5),
    "ductal_carcinoma": _Texture(3.0, 2.6, 0.45, glands=0.3, gland_radius=5.0, elong=1.5, fronds=0.2,
                                 fibres=0.3, spacing=8.0, eosin=0.5, hema=1.3),
    "lobular_carcinoma": _Texture(2.5, 1.8, 0.15, fibres=0.7, single_file=True, eosin=0.6),
    "mucinous_carcinoma": _Texture(1.0, 2.2, 0.3, glands=0.5, gland_radius=10.0, elong=1.4, fronds=0.15, epi=0.0,
                                   mucin=True, eosin=0.45),
    "papillary_carcinoma": _Texture(1.2, 2.0, 0.3, glands=0.6, gland_radius=10.0, fronds=0.35, epi=4.0,
                                    epi_nuclei=14.0, fibres=0.3),
}


def _check_scale(scale):
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale: expected a positive integer, got {scale!r}")


def check_divisible(image_size, scale):
    """ValueError unless the image side `image_size` is a multiple of `scale`."""
    _check_scale(scale)
    if image_size % scale:
        raise ValueError(f"image_size: {image_size} is not divisible by scale {scale}")


# Both resamplers use PIL's (and MATLAB imresize's) bicubic: Keys' kernel with a = -0.5,
# widened by the scale when downsampling (torch takes that path with antialias=True).
def bicubic_down(hr, scale):
    """(..., C, H, W) in [0, 1] -> (..., C, H/scale, W/scale): antialiased bicubic, clamped."""
    h, w = hr.shape[-2:]
    check_divisible(h, scale)
    check_divisible(w, scale)
    x = hr.reshape(-1, *hr.shape[-3:])
    lr = F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", align_corners=False, antialias=True)
    return lr.clamp(0, 1).reshape(*hr.shape[:-2], h // scale, w // scale)


def bicubic_up(lr, scale):
    """(..., C, h, w) -> (..., C, h*scale, w*scale): bicubic upsampling, clamped to [0, 1]."""
    _check_scale(scale)
    h, w = lr.shape[-2:]
    x = lr.reshape(-1, *lr.shape[-3:])
    hr = F.interpolate(x, size=(h * scale, w * scale), mode="bicubic", align_corners=False, antialias=True)
    return hr.clamp(0, 1).reshape(*lr.shape[:-2], h * scale, w * scale)


def _blobs(points, radius):
    """Points (n, 1, S, S) -> soft disks of the given radius (px) around each point."""
    sigma = radius / math.sqrt(2 * math.log(2))  # the blurred point is at half its peak at `radius`
    t = torch.arange(-max(1, int(3 * sigma)), max(1, int(3 * sigma)) + 1, dtype=points.dtype)
    peak = (1 / torch.exp(-0.5 * (t / sigma) ** 2).sum()) ** 2  # _blur's centre weight
    return torch.sigmoid(12 * (_blur(points, sigma) / peak - 0.5))


def _gland_distance(n, size, p, zoom, g):
    """Signed distance (n, S, S) in px to the nearest gland boundary (negative inside)."""
    sd = torch.full((n, size, size), float("inf"))
    expected = p.glands / 1000 * (size / zoom) ** 2
    if expected == 0:
        return sd
    candidates = min(32, math.ceil(2 * expected) + 1)
    lin = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    for _ in range(candidates):
        keep = torch.rand(n, 1, 1, generator=g) < expected / candidates
        r = p.gland_radius * zoom * (0.7 + 0.6 * torch.rand(n, 1, 1, generator=g))
        cx, cy = ((torch.rand(n, 2, 1, 1, generator=g) * (size + 2 * r[:, None])) - r[:, None]).unbind(1)
        phi = torch.rand(n, 1, 1, generator=g) * math.pi
        u = (xx - cx) * torch.cos(phi) + (yy - cy) * torch.sin(phi)
        v = -(xx - cx) * torch.sin(phi) + (yy - cy) * torch.cos(phi)
        a, b = r * math.sqrt(p.elong), r / math.sqrt(p.elong)
        offset = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
        ripple = 1 + p.fronds * torch.sin(6 * torch.atan2(v / b, u / a) + offset)
        d = (torch.sqrt((u / a) ** 2 + (v / b) ** 2) - ripple) * r
        sd = torch.minimum(sd, torch.where(keep, d, torch.inf))
    return sd


def render_tissue(n, tissue, magnification, size, g):
    """n H&E-like images (n, 3, size, size) in [0, 1] of one tissue type and magnification."""
    p, z = _TEXTURES[tissue], ZOOM[magnification]
    lin = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    noise = lambda: torch.randn(n, 1, size, size, generator=g)
    mottle = _blur(noise(), 4 * z)
    mottle = mottle / mottle.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    # Wavy collagen fibres: thin crests of a warped plane wave.
    theta = torch.rand(n, 1, 1, 1, generator=g) * math.pi
    warp = _blur(noise(), 3 * z)
    warp = 3 * warp / warp.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    phase = 2 * math.pi / (p.spacing * z) * (xx * torch.cos(theta) + yy * torch.sin(theta)) + warp
    fibre = torch.cos(phase).clamp_min(0) ** 6
    sd = _gland_distance(n, size, p, z, g)[:, None]
    lumen = _soft(sd, 1.5 / z)
    epithelium = _soft(sd - p.epi * z, 1.5 / z) * (1 - lumen) if p.epi > 0 else torch.zeros_like(lumen)
    # Nucleus centres: a density map sampled once per pixel, in px^-2 at this zoom.
    stroma_density = p.nuclei / 100 / z ** 2 * (1 + 0.4 * mottle).clamp_min(0)
    if p.single_file:
        stroma_density = stroma_density * 4 * (torch.cos(phase) > 0.9)
    density = stroma_density * (1 - lumen) * (1 - epithelium) + p.epi_nuclei / 100 / z ** 2 * epithelium
    centres = (torch.rand(n, 1, size, size, generator=g) < density).float()
    kind = torch.randint(0, 3, (n, 1, size, size), generator=g)
    nuclei = torch.stack([_blobs(centres * (kind == k), p.radius * z * (1 + p.pleo * (k - 1)))
                          for k in range(3)]).amax(0)
    chromatin = 0.8 + 0.4 * torch.rand(n, 1, size, size, generator=g)
    # Stain concentrations, with a per-slide stain-strength jitter.
    pool = (0.25, 0.12) if p.mucin else (0.02, 0.03)
    hema = 0.06 + p.hema * nuclei * chromatin + 0.15 * epithelium + pool[0] * lumen
    eosin = (p.eosin * (1 + 0.15 * mottle) + 0.5 * p.fibres * fibre) * (1 - lumen) * (1 - 0.3 * nuclei) \
        + pool[1] * lumen
    hema = hema * torch.exp(0.1 * torch.randn(n, 1, 1, 1, generator=g))
    eosin = eosin * torch.exp(0.1 * torch.randn(n, 1, 1, 1, generator=g))
    od = hema * _HEMA.view(1, 3, 1, 1) + eosin.clamp_min(0) * _EOSIN.view(1, 3, 1, 1)
    img = _blur(torch.exp(-od), 0.5 * math.sqrt(z))  # defocus grows with magnification
    return (img + 0.01 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def _client_generator(seed, client):
    """A generator for one client, independent of the number of clients."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, client]).generate_state(1)[0]))


def client_names(groups, n_clients):
    """Client i takes group i % len(groups); with more clients than groups every name gets
    the suffix -k, k = i // len(groups)."""
    names = []
    for i in range(n_clients):
        group = groups[i % len(groups)]
        names.append(group if n_clients <= len(groups) else f"{group}-{i // len(groups)}")
    return names


def synthetic_sr_federation(n_clients, scenario, *, scale, samples_per_client, image_size, seed):
    """[(name, train, test)] per client, each a TensorDataset(lr (n, 3, S/scale, S/scale),
    hr (n, 3, S, S)), float32 in [0, 1], 80/20 train/test split.

    scenario "tissue": client i renders tissue type i % 8, with magnifications drawn per
    image; "magnification": client i renders magnification i % 4, with tissue types
    drawn per image. A client's data depends on (seed, its index) only.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario: expected one of {SCENARIOS}, got {scenario!r}")
    if n_clients < 1:
        raise ValueError(f"n_clients: must be at least 1, got {n_clients}")
    if samples_per_client < 2:
        raise ValueError(f"samples_per_client: need at least 2 for a train/test split, got {samples_per_client}")
    check_divisible(image_size, scale)
    groups, others = (TISSUE_TYPES, MAGNIFICATIONS) if scenario == "tissue" else (MAGNIFICATIONS, TISSUE_TYPES)
    n_test = max(1, round(samples_per_client / 5))
    federation = []
    for i, name in enumerate(client_names(groups, n_clients)):
        g = _client_generator(seed, i)
        drawn = torch.randint(0, len(others), (samples_per_client,), generator=g)
        hr = torch.empty(samples_per_client, 3, image_size, image_size)
        for k, other in enumerate(others):
            idx = (drawn == k).nonzero().flatten()
            if len(idx):
                pair = (groups[i % len(groups)], other) if scenario == "tissue" else (other, groups[i % len(groups)])
                hr[idx] = render_tissue(len(idx), *pair, image_size, g)
        lr = bicubic_down(hr, scale)
        federation.append((name, TensorDataset(lr[n_test:], hr[n_test:]), TensorDataset(lr[:n_test], hr[:n_test])))
    return federation
