"""BreaKHis (breast-cancer histology, Spanhol et al. 2016) as super-resolution pairs.

Reads the dataset's own folder layout,

    <root>/.../{benign,malignant}/SOB/<tumour type>/<patient>/<40X|100X|200X|400X>/*.png

with the eight tumour types of `omnifm.data.tissue.TISSUE_TYPES` (the first four
benign, the last four malignant), through MONAI dictionary transforms, item by item.
An item is (lr (3, S/scale, S/scale), hr (3, S, S)), float32 in [0, 1]: hr is an
S x S crop of the image, lr its bicubic downscaling (`tissue.bicubic_down`).

Clients follow the paper's two splits: `tissue` groups images by tumour type,
`magnification` by magnification. With n clients and G groups present, n <= G: client
i takes groups i, i + n, i + 2n, ... (named "a+b"); n > G: client i takes group i % G
(named "<group>-<i // G>") and the clients sharing a group deal its patients. The
train/test split is 80/20 by patient, drawn once per tumour type, so a test patient is
never trained on by any client (under `magnification` one patient's images sit in
several clients).

Crops are fixed when the federation is built: a seeded random position per training
image, the centre for test images, so an item is the same in every epoch and a
resumed run reads exactly what an uninterrupted one would.

Bad data is refused before training, with the file or folder named: a PNG outside the
layout, an unknown tumour-type or magnification folder (a misspelt folder would
otherwise drop a whole group from the split), a tumour type under the wrong class, an
unreadable or truncated PNG (PIL's verify reads every chunk), a non-RGB PNG, an image
smaller than image_size, an empty client partition (more clients sharing a group than
it has patients; a client whose tumour types have one patient each, hence no test
patient), a root without PNGs. Files that are not PNGs (notes, .DS_Store) are skipped,
counted and reported in a warning.
"""
import os
import warnings
from typing import NamedTuple

import numpy as np
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityRanged
from torch.utils.data import Dataset

from .png import inspect_png
from .tissue import MAGNIFICATIONS, SCENARIOS, TISSUE_TYPES, bicubic_down, check_divisible, client_names

CLASSES = {"benign": TISSUE_TYPES[:4], "malignant": TISSUE_TYPES[4:]}


class BreakHisImage(NamedTuple):
    path: str
    tumour: str
    patient: str
    magnification: str


def _record(root, path):
    """The BreakHisImage of one PNG, or ValueError naming what breaks the layout."""
    parts = os.path.relpath(path, root).split(os.sep)
    if len(parts) < 6 or parts[-5] != "SOB" or parts[-6] not in CLASSES:
        raise ValueError(f"{path}: PNG outside the BreaKHis layout "
                         "<root>/.../{benign,malignant}/SOB/<tumour type>/<patient>/<magnification>/*.png")
    cls, tumour, patient, mag = parts[-6], parts[-4], parts[-3], parts[-2]
    folder = os.path.join(root, *parts[:-3])
    if tumour not in TISSUE_TYPES:
        raise ValueError(f"{folder}: unknown tumour type folder {tumour!r}, expected one of {TISSUE_TYPES}")
    if tumour not in CLASSES[cls]:
        raise ValueError(f"{folder}: tumour type {tumour!r} is not {cls}")
    if mag not in MAGNIFICATIONS:
        raise ValueError(f"{os.path.dirname(path)}: unknown magnification folder {mag!r}, "
                         f"expected one of {MAGNIFICATIONS}")
    return BreakHisImage(path, tumour, patient, mag)


def scan_breakhis(root):
    """([BreakHisImage] sorted by path, [ignored non-PNG paths]) of a BreaKHis tree."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"root: {root} is not a directory")
    records, ignored = [], []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(folder, f)
            if f.lower().endswith(".png"):
                records.append(_record(root, path))
            else:
                ignored.append(path)
    if not records:
        raise ValueError(f"root: no PNG images under {root} (expected the BreaKHis layout "
                         "<root>/.../{benign,malignant}/SOB/<tumour type>/<patient>/<magnification>/*.png)")
    return records, ignored


def _inspect(path, image_size):
    """(height, width) of an RGB PNG at least image_size on each side, read cheaply."""
    h, w = inspect_png(path, ("RGB",))
    if h < image_size or w < image_size:
        raise ValueError(f"{path}: image {w}x{h} is smaller than image_size {image_size}")
    return h, w


def _partition(records, n_clients, scenario, rng):
    """[(name, train records, test records)] by the scenario's rule (see module doc)."""
    patients = sorted({(r.tumour, r.patient) for r in records})
    test_patients = set()
    for tumour in TISSUE_TYPES:
        own = [p for p in patients if p[0] == tumour]
        if len(own) >= 2:
            test_patients.update(own[j] for j in rng.permutation(len(own))[:max(1, round(len(own) / 5))])
    key = (lambda r: r.tumour) if scenario == "tissue" else (lambda r: r.magnification)
    present = {key(r) for r in records}
    groups = [g for g in (TISSUE_TYPES if scenario == "tissue" else MAGNIFICATIONS) if g in present]
    if n_clients <= len(groups):
        clients = []
        for i in range(n_clients):
            mine = groups[i::n_clients]
            clients.append(("+".join(mine), [r for r in records if key(r) in mine]))
    else:
        # each group's train and test patients are dealt separately among the clients
        # sharing it, so every sharer gets both when there are enough patients
        share = {}  # (group, patient) -> index among the group's clients
        for gi, group in enumerate(groups):
            sharers = len(range(gi, n_clients, len(groups)))
            members = sorted({(r.tumour, r.patient) for r in records if key(r) == group})
            for part in ([p for p in members if p not in test_patients], [p for p in members if p in test_patients]):
                for j, idx in enumerate(rng.permutation(len(part))):
                    share[group, part[idx]] = j % sharers
        clients = []
        for i, name in enumerate(client_names(groups, n_clients)):
            group, k = groups[i % len(groups)], i // len(groups)
            clients.append((name, [r for r in records if key(r) == group and share[group, (r.tumour, r.patient)] == k]))
    federation = []
    for name, chosen in clients:
        train = [r for r in chosen if (r.tumour, r.patient) not in test_patients]
        test = [r for r in chosen if (r.tumour, r.patient) in test_patients]
        for split, part in (("training", train), ("test", test)):
            if not part:
                n_pat = len({(r.tumour, r.patient) for r in chosen})
                raise ValueError(f"client {name!r}: empty {split} partition ({n_pat} patients, "
                                 f"{n_clients} clients over {len(groups)} {scenario} groups present)")
        federation.append((name, train, test))
    return federation


def _load_transform():
    return Compose([
        LoadImaged("image", reader="PILReader", reverse_indexing=False),  # (H, W, 3), not PIL's (W, H)
        EnsureChannelFirstd("image"),
        ScaleIntensityRanged("image", a_min=0, a_max=255, b_min=0, b_max=1, clip=True),
    ])


class BreakHisSR(Dataset):
    """(lr (3, S/scale, S/scale), hr (3, S, S)) pairs: MONAI loads each image, hr is its
    S x S crop at the stored corner. `records` and `crops` (top, left) are per item."""

    def __init__(self, records, crops, image_size, scale):
        self.records, self.crops = records, crops
        self.image_size, self.scale = image_size, scale
        self.images = MonaiDataset([{"image": r.path} for r in records], transform=_load_transform())

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        (top, left), s = self.crops[i], self.image_size
        hr = self.images[i]["image"].as_tensor()[:, top:top + s, left:left + s].contiguous()
        return bicubic_down(hr, self.scale), hr


def breakhis_federation(root, n_clients, scenario, *, scale, image_size, seed, max_per_client=None):
    """[(name, train BreakHisSR, test BreakHisSR)] per client (see module doc).

    max_per_client caps a client at that many training images and a quarter as many
    test images (at least 1), drawn with the seed. Every image used is checked here.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario: expected one of {SCENARIOS}, got {scenario!r}")
    if n_clients < 1:
        raise ValueError(f"n_clients: must be at least 1, got {n_clients}")
    if max_per_client is not None and max_per_client < 1:
        raise ValueError(f"max_per_client: must be at least 1 or None, got {max_per_client}")
    check_divisible(image_size, scale)
    records, ignored = scan_breakhis(root)
    if ignored:
        warnings.warn(f"BreaKHis: skipped {len(ignored)} files that are not PNGs under {root}, e.g. {ignored[0]}",
                      stacklevel=2)
    rng = np.random.default_rng(seed)
    test_cap = None if max_per_client is None else max(1, max_per_client // 4)
    federation = []
    for name, train, test in _partition(records, n_clients, scenario, rng):
        datasets = []
        for part, cap, random_crop in ((train, max_per_client, True), (test, test_cap, False)):
            if cap is not None and len(part) > cap:
                part = [part[j] for j in sorted(rng.choice(len(part), cap, replace=False))]
            crops = []
            for r in part:
                h, w = _inspect(r.path, image_size)
                if random_crop:
                    crops.append((int(rng.integers(h - image_size + 1)), int(rng.integers(w - image_size + 1))))
                else:
                    crops.append(((h - image_size) // 2, (w - image_size) // 2))
            datasets.append(BreakHisSR(part, crops, image_size, scale))
        federation.append((name, *datasets))
    return federation
