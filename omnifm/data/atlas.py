"""Fusion pairs in the folder layout of the public fusion benchmarks (Harvard whole brain
atlas pairs):

    <root>/<PAIR>/<MODALITY>/<n>.png      e.g. CT-MRI/CT/1.png with CT-MRI/MRI/1.png

One client per <PAIR> folder (sorted by name). A pair folder is named "<PARTNER>-MRI"
(or "MRI-<PARTNER>") and holds the folders MRI and <PARTNER>; a pair is the two PNGs
of the same file name in them. Images are 8-bit grey (L) or RGB PNGs read with MONAI
(PILReader), scaled to [0, 1]; colour images become their Y channel of YCbCr
(`fusion_pairs.rgb_to_y`, ITU-R BT.601: colour PET/SPECT are fused on Y, as is
standard; an RGB-stored grey MRI keeps its grey), then both are resized to
image_size x image_size (bilinear, anti-aliased when shrinking; the atlas slices are
square, others are stretched). An item is
(pair, pair), pair (2, S, S) = (MRI, partner), as in the synthetic generator. The
atlas is small (a few hundred pairs per type), so every pair is loaded into memory
when the federation is built.

Each client's pairs are split 80/20 into train and test with the seed, pair by pair:
the benchmarks publish no subject ids, so slices of one subject may fall on both sides.
max_per_client caps a client at that many pairs, drawn with the seed before the split
(file pairing is checked for every file, the images themselves for the pairs drawn).

Bad data is refused before training, with the file or folder named: a pair without
its MRI (or an MRI without its partner), partners of different shapes, an unreadable
or truncated PNG (PIL's verify reads every chunk), a PNG that is neither grey nor
RGB, an empty pair folder, a pair folder with fewer than 2 pairs (no test split), a
pair folder whose name is not "<PARTNER>-MRI", a root without pair folders. Entries
the layout does not use (other folders such as reference fusion results, files that
are not PNGs) are skipped, counted and reported in a warning.
"""
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, EnsureChannelFirst, LoadImage
from torch.utils.data import TensorDataset

from .fusion_pairs import rgb_to_y
from .png import inspect_png

MRI = "MRI"


def _partner_of(folder):
    """The partner modality of a pair folder named "<PARTNER>-MRI" or "MRI-<PARTNER>"."""
    parts = os.path.basename(folder).split("-")
    if len(parts) != 2 or MRI not in parts or parts[0] == parts[1]:
        raise ValueError(f"{folder}: a pair folder is named '<PARTNER>-MRI' or 'MRI-<PARTNER>' (e.g. CT-MRI)")
    return parts[1] if parts[0] == MRI else parts[0]


def _natural(name):
    """Sort key: "2.png" before "10.png"."""
    stem = os.path.splitext(name)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def scan_pair_folder(folder):
    """([(mri path, partner path)] in file-name order, [skipped paths]) of one pair folder."""
    partner = _partner_of(folder)
    pngs, skipped = {}, []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry not in (MRI, partner) or not os.path.isdir(path):
            skipped.append(path)
            continue
        names = sorted(os.listdir(path))
        pngs[entry] = {n for n in names if n.lower().endswith(".png")}
        skipped += [os.path.join(path, n) for n in names if n not in pngs[entry]]
    mri, other = pngs.get(MRI, set()), pngs.get(partner, set())
    if not mri and not other:
        raise ValueError(f"{folder}: empty pair folder (no PNGs in {MRI}/ or {partner}/)")
    no_mri, no_partner = sorted(other - mri, key=_natural), sorted(mri - other, key=_natural)
    if no_mri:
        raise ValueError(f"{os.path.join(folder, partner, no_mri[0])}: pair without its MRI "
                         f"({os.path.join(folder, MRI, no_mri[0])} is missing; {len(no_mri)} such files)")
    if no_partner:
        raise ValueError(f"{os.path.join(folder, MRI, no_partner[0])}: MRI without its {partner} "
                         f"({os.path.join(folder, partner, no_partner[0])} is missing; {len(no_partner)} such files)")
    return [(os.path.join(folder, MRI, n), os.path.join(folder, partner, n)) for n in sorted(mri, key=_natural)], \
        skipped


def _loader(image_size):
    """path -> (1, S, S) float32 in [0, 1]: MONAI reads (C, H, W), colour becomes Y, then resize.
    torch's anti-aliased bilinear resize, not MONAI's Resize: its Gaussian pre-filter pads
    with zeros and darkens the border."""
    read = Compose([LoadImage(reader="PILReader", image_only=True, reverse_indexing=False),  # (H, W), not PIL's (W, H)
                    EnsureChannelFirst()])

    def load(path):
        img = read(path).as_tensor().float() / 255
        if img.shape[0] == 3:
            img = rgb_to_y(img)
        img = F.interpolate(img[None], size=(image_size, image_size), mode="bilinear", align_corners=False,
                            antialias=True)[0]
        return img.clamp(0, 1)
    return load


def atlas_federation(root, *, image_size, seed, max_per_client=None):
    """[(pair folder name, train TensorDataset, test TensorDataset)], one client per pair
    folder of root (see module doc); items (pair (2, S, S), pair (2, S, S))."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"root: {root} is not a directory")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: need a positive int, got {image_size!r}")
    if max_per_client is not None and (not isinstance(max_per_client, int) or max_per_client < 2):
        raise ValueError(f"max_per_client: need an int >= 2 (a train and a test pair) or None, got {max_per_client!r}")
    folders, skipped = [], []
    for entry in sorted(os.listdir(root)):
        (folders if os.path.isdir(os.path.join(root, entry)) else skipped).append(os.path.join(root, entry))
    if not folders:
        raise ValueError(f"root: no pair folders under {root} (expected <PAIR>/<MODALITY>/<n>.png, "
                         "e.g. CT-MRI/CT/1.png with CT-MRI/MRI/1.png)")
    scans = []
    for folder in folders:
        pairs, ignored = scan_pair_folder(folder)
        if len(pairs) < 2:
            raise ValueError(f"{folder}: {len(pairs)} pair, need at least 2 (a train and a test pair)")
        scans.append((folder, pairs))
        skipped += ignored
    if skipped:
        warnings.warn(f"atlas: skipped {len(skipped)} entries outside the layout under {root}, e.g. {skipped[0]}",
                      stacklevel=2)
    load = _loader(image_size)
    federation = []
    for cid, (folder, pairs) in enumerate(scans):
        rng = np.random.default_rng([seed, cid])
        if max_per_client is not None and len(pairs) > max_per_client:
            pairs = [pairs[j] for j in sorted(rng.choice(len(pairs), max_per_client, replace=False))]
        for mri, other in pairs:
            (h1, w1), (h2, w2) = (inspect_png(f, ("L", "RGB")) for f in (mri, other))
            if (h1, w1) != (h2, w2):
                raise ValueError(f"{mri}: shape mismatch with its partner {other} ({w1}x{h1} vs {w2}x{h2})")
        x = torch.stack([torch.cat([load(mri), load(other)]) for mri, other in pairs])
        perm = torch.from_numpy(rng.permutation(len(pairs)))
        n_test = max(1, round(0.2 * len(pairs)))
        train, test = x[perm[n_test:]], x[perm[:n_test]]
        federation.append((os.path.basename(folder), TensorDataset(train, train), TensorDataset(test, test)))
    return federation
