"""Synthetic brain-MRI slices with an enhancing lesion, from heterogeneous institutions.

A FeTS-like segmentation federation without real data. Each sample is an axial,
skull-stripped (background exactly 0, as in BraTS/FeTS) T1ce-like slice, one gray
channel:

    brain       an ellipse whose size follows the slice level, white matter brighter
                than a cortical gray-matter band, smooth tissue texture
    ventricles  two dark CSF ellipses near the middle
    lesion      (in a fraction of the slices) an irregular blob or ring of enhancing
                tissue inside the brain, a dark necrotic core in rings, a faint
                hypointense edema halo; the target is the enhancing region only
                (as FeTS's enhancing-tumour label), a (1, H, W) float32 mask in {0, 1}

Intra-modality heterogeneity, as between FeTS institutions: each institution has its
own scanner intensity curve (gamma and contrast window), strength of a smooth
multiplicative bias field, Rician noise level, lesion size distribution and share of
slices with a lesion, all drawn deterministically from (seed, institution id).

Honest caveat: the anatomy and the lesion's appearance (enhancing = brighter than
brain) are the same for every institution; only the acquisition and the lesion size
differ. That is the FeTS premise (one task, one modality, different scanners and
populations) built in: results here show a method coping with that kind of shift, not
that real institutions differ only in these ways.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from omnifm.data.synthetic import _blur, _soft

# The paper's four FeTS groups (9 / 6 / 5 / 3 institutions) as institution (FeTS
# partition) ids. The paper does not list its ids: this grouping is our convention,
# shared with omnifm.data.fets.
GROUPS = {
    "group1": tuple(range(1, 10)),
    "group2": tuple(range(10, 16)),
    "group3": tuple(range(16, 21)),
    "group4": tuple(range(21, 24)),
}
MIN_IMAGE_SIZE = 32  # the smallest lesion (2.5 px radius) must still fit in the smallest brain


def client_seed(seed, client_id):
    """The generator seed of one client: distinct for distinct (seed, id), 0 <= id < 1e6."""
    return seed * 1_000_003 + client_id


@dataclass(frozen=True)
class Institution:
    """Acquisition and population parameters of one institution."""
    gamma: float          # scanner intensity curve exponent
    lo: float             # ... and its output window [lo, hi]
    hi: float
    bias: float           # bias field amplitude: intensity * (1 + bias * field), |field| <= 1
    noise: float          # Rician noise sigma
    lesion_radius: float  # median lesion radius (image half-width = 1)
    p_lesion: float       # share of slices with a lesion


def draw_institution(g):
    """Institution parameters drawn from generator g."""
    u = torch.rand(7, generator=g).tolist()
    return Institution(gamma=math.exp(0.9 * (u[0] - 0.5)), lo=0.12 * u[1], hi=0.75 + 0.25 * u[2],
                       bias=0.05 + 0.2 * u[3], noise=0.01 + 0.06 * u[4],
                       lesion_radius=0.07 + 0.15 * u[5], p_lesion=0.6 + 0.3 * u[6])


def _ellipse_sd(xx, yy, cx, cy, ax, ay):
    """Approximate signed distance (negative inside) to an axis-aligned ellipse."""
    return (torch.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2) - 1) * torch.minimum(ax, ay)


def _anatomy(n, size, inst, g):
    """Tissue intensity before acquisition (n, S, S), brain mask and enhancing-lesion
    mask (n, S, S) bool."""
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)
    sharp, px = size / 2, 2 / (size - 1)  # edges about one pixel wide; pixel pitch
    zero = torch.zeros(n, 1, 1)

    level = rand(0.65, 1.0)  # smaller brain sections away from the middle of the head
    ax, ay = rand(0.62, 0.74) * level, rand(0.78, 0.9) * level
    brain_sd = _ellipse_sd(xx, yy, zero, zero, ax, ay)
    brain = brain_sd < 0
    cortex = _soft(-(brain_sd + 0.12 * level), sharp / 2)
    vs = rand(0.5, 1.2) * level
    vent = [_soft(_ellipse_sd(xx, yy, s * 0.1 * vs, zero - 0.05, 0.09 * vs + 0.02, 0.22 * vs), sharp) for s in (-1, 1)]
    texture = _blur(torch.randn(n, 1, size, size, generator=g), size / 16)[:, 0]
    texture = texture / texture.std((1, 2), keepdim=True)

    has = torch.rand(n, 1, 1, generator=g) < inst.p_lesion
    r = (inst.lesion_radius * torch.exp(0.35 * torch.randn(n, 1, 1, generator=g))).clamp(min=2.5 * px)
    r = torch.minimum(r, 0.5 * torch.minimum(ax, ay))
    rho, phi = torch.sqrt(rand(0, 1)), rand(0, 2 * math.pi)
    cx, cy = (ax - 1.25 * r) * rho * torch.cos(phi), (ay - 1.25 * r) * rho * torch.sin(phi)
    d, theta = torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2), torch.atan2(yy - cy, xx - cx)
    r_eff = r * (1 + 0.12 * rand(0, 1) * torch.cos(2 * theta + rand(0, 2 * math.pi))
                 + 0.08 * rand(0, 1) * torch.cos(3 * theta + rand(0, 2 * math.pi)))
    # rings keep a rim of >= ~2 px; small lesions and about a third of the rest are solid
    solid = (torch.rand(n, 1, 1, generator=g) < 0.35) | (r < 6 * px)
    core_frac = torch.where(solid, -1.0, rand(0.3, 0.65))
    lesion_sd = torch.maximum(d - r_eff, core_frac * r_eff - d)
    enhancing = _soft(lesion_sd, sharp) * has
    core = _soft(d - core_frac * r_eff, sharp) * (has & ~solid)
    edema = _soft(d - 1.9 * r_eff, sharp / 4) * has

    t = 0.55 - 0.15 * cortex + 0.04 * texture - 0.1 * edema  # T1: gray matter darker than white
    for v in vent:
        t = t * (1 - v) + 0.1 * v
    t = t * (1 - enhancing) + 0.95 * enhancing
    t = t * (1 - core) + 0.2 * core
    return t, brain, (lesion_sd < 0) & brain & has


def _acquire(t, brain, inst, g):
    """Scanner: bias field, Rician noise, intensity curve, skull stripping -> (n, 1, S, S)."""
    n, size, _ = t.shape
    field = F.interpolate(torch.randn(n, 1, 3, 3, generator=g), size=(size, size), mode="bicubic",
                          align_corners=True)[:, 0]
    t = t * (1 + inst.bias * field / field.abs().amax((1, 2), keepdim=True))
    noise = lambda: inst.noise * torch.randn(n, size, size, generator=g)
    t = torch.sqrt((t + noise()) ** 2 + noise() ** 2)
    img = inst.lo + (inst.hi - inst.lo) * t.clamp(0, 1) ** inst.gamma
    return (img * brain)[:, None]


def lesion_slices(n, inst, *, image_size, g):
    """n slices of one institution -> (images (n, 1, S, S) float32 in [0, 1],
    enhancing-lesion masks (n, 1, S, S) float32 in {0, 1})."""
    t, brain, mask = _anatomy(n, image_size, inst, g)
    return _acquire(t, brain, inst, g).float(), mask[:, None].float()


def synthetic_segmentation_federation(scenario, *, samples_per_client, image_size, seed):
    """[(institution name, train TensorDataset, test TensorDataset)] for one of the
    paper's FeTS groups (GROUPS): one client per institution, 80/20 split, items
    (image (1, S, S), mask (1, S, S)) as in `lesion_slices`."""
    if scenario not in GROUPS:
        raise ValueError(f"scenario: expected one of {tuple(GROUPS)}, got {scenario!r}")
    if not isinstance(samples_per_client, int) or samples_per_client < 2:
        raise ValueError(f"samples_per_client: need an int >= 2 (a train and a test sample), "
                         f"got {samples_per_client!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size: need an int >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: need an int >= 0, got {seed!r}")
    n_test = max(1, round(0.2 * samples_per_client))
    clients = []
    for inst_id in GROUPS[scenario]:
        g = torch.Generator().manual_seed(client_seed(seed, inst_id))
        x, y = lesion_slices(samples_per_client, draw_institution(g), image_size=image_size, g=g)
        k = samples_per_client - n_test  # samples are i.i.d. within an institution
        clients.append((f"institution-{inst_id}", TensorDataset(x[:k], y[:k]), TensorDataset(x[k:], y[k:])))
    return clients
