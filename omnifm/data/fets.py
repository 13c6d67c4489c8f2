"""FeTS 2022 / BraTS T1ce slices for federated segmentation, from the standard layout.

    <root>/partitioning_1.csv          columns Partition_ID,Subject_ID: one row per case
    <root>/<case>/<case>_t1ce.nii.gz   post-contrast T1 volume, skull-stripped (background 0)
    <root>/<case>/<case>_seg.nii.gz    labels 0, 1 necrosis, 2 edema, 4 (or 3) enhancing tumour

Clients: by default (scenario "all") every partition of the CSV is one client,
`institution-<Partition_ID>`. The paper groups FeTS 2022's 23 partitioning_1
institutions into four groups of 9 / 6 / 5 / 3 clients but does not list which ids form
each group; our convention (GROUPS in omnifm.data.lesions, shared with the synthetic
federation) is partition ids 1-9 (group1), 10-15 (group2), 16-20 (group3) and 21-23
(group4). Each client's cases are split 80/20 by case (no case in both splits).

Items: axial slices (the last array axis, as stored in BraTS/FeTS: 240 x 240 x 155),
read through MONAI `LoadImaged` + `EnsureChannelFirstd`, resized to image_size x
image_size (`Resized`, area) -> (image (1, S, S) float32 in [0, 1], mask (1, S, S)
float32 in {0, 1}). A slice is kept when nonzero T1ce voxels (brain) cover at least
`min_brain_fraction` of it; the others are counted, not used (`skipped_slices`).
Intensity is normalised per volume over its brain voxels: the 0.5th..99.5th
percentile maps to [0, 1], clipped; the background stays 0.
Target: the enhancing tumour. FeTS 2022 and BraTS up to 2021 label it 4, BraTS 2023
labels it 3. Rule: if a volume has any voxel labelled 4, the target is label 4, else
label 3 (so in an old-convention volume without enhancing tumour, a label 3 would be
read as enhancing; FeTS 2022 uses no 3).

Bad data raises, naming the file and the problem, when the federation is built (before
any training): a listed case without its folder or a file (FileNotFoundError); a
volume that is not 3-D, image/label shapes that differ, an unreadable or truncated
file, a label outside {0, 1, 2, 3, 4}, a selected partition without cases or without
brain slices, a partition too small to split by case, a malformed CSV (ValueError).
Cost: building the federation reads each selected case once (truncation and label
values cannot be seen in the header). Items are then read lazily: a dataset keeps the
resized slices of its last few cases (`cache_cases`), and its items are ordered by
case, so reading in order touches each file once; shuffled access over many more
cases than the cache holds re-reads volumes.
"""
import csv
import os
from collections import OrderedDict
from dataclasses import dataclass

import nibabel
import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import AsDiscreted, Compose, EnsureChannelFirstd, LoadImaged, Resized
from monai.utils import convert_to_tensor

from omnifm.data.lesions import GROUPS, client_seed

PARTITION_CSV = "partitioning_1.csv"
LABELS = frozenset({0, 1, 2, 3, 4})
KEYS = ("image", "label")
_LOAD = Compose([LoadImaged(KEYS, reader="NibabelReader", image_only=True, allow_missing_keys=True),
                 EnsureChannelFirstd(KEYS, allow_missing_keys=True)])


@dataclass(frozen=True)
class Case:
    """One validated case: its files, brain slices and normalisation."""
    name: str
    image: str
    label: str
    slices: tuple      # axial indices of the brain slices
    skipped: int       # its slices without enough brain
    lo: float          # brain intensity percentiles mapped to 0 and 1
    hi: float
    target: int        # the enhancing-tumour label (4 or 3)


def read_partitions(root):
    """{Partition_ID: [Subject_ID, ...]} of <root>/partitioning_1.csv, in file order."""
    path = os.path.join(root, PARTITION_CSV)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: partitioning CSV not found")
    partitions, seen = {}, set()
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.DictReader(f)
        if rows.fieldnames is None or not {"Partition_ID", "Subject_ID"} <= set(rows.fieldnames):
            raise ValueError(f"{path}: expected columns Partition_ID,Subject_ID, got {rows.fieldnames}")
        for row in rows:
            pid, case = (row["Partition_ID"] or "").strip(), (row["Subject_ID"] or "").strip()
            if not pid.isdecimal() or not case:
                raise ValueError(f"{path} line {rows.line_num}: need an integer Partition_ID and a Subject_ID, "
                                 f"got {pid!r}, {case!r}")
            if case in seen:
                raise ValueError(f"{path} line {rows.line_num}: {case} is listed twice")
            seen.add(case)
            partitions.setdefault(int(pid), []).append(case)
    return partitions


def _header_shape(path, what):
    """Shape from the NIfTI header (no voxel data read)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} file missing")
    try:
        shape = nibabel.load(path).shape
    except Exception as e:
        raise ValueError(f"{path}: unreadable NIfTI header ({type(e).__name__}: {e})") from e
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {shape}")
    return shape


def _read(path, key):
    """Voxels (H, W, D) float32 of one file, through MONAI."""
    try:
        return convert_to_tensor(_LOAD({key: path})[key][0], track_meta=False)
    except Exception as e:
        raise ValueError(f"{path}: unreadable or truncated NIfTI ({type(e).__name__}: {e})") from e


def _files(root, name):
    """(image path, label path) of one case, checked from the headers alone."""
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: folder of case {name} (listed in {PARTITION_CSV}) not found")
    image_path, label_path = (os.path.join(folder, f"{name}_{s}.nii.gz") for s in ("t1ce", "seg"))
    shapes = _header_shape(image_path, "T1ce image"), _header_shape(label_path, "segmentation")
    if shapes[0] != shapes[1]:
        raise ValueError(f"{label_path}: shape {shapes[1]} differs from its image {image_path} {shapes[0]}")
    return image_path, label_path


def _scan(name, image_path, label_path, min_brain_fraction):
    """Read one case's voxels: labels, brain slices, normalisation -> Case."""
    image, label = _read(image_path, "image"), _read(label_path, "label")
    values = set(torch.unique(label).tolist())
    if not values <= LABELS:
        bad = ", ".join(f"{v:g}" for v in sorted(values - LABELS))
        raise ValueError(f"{label_path}: label values [{bad}] outside {sorted(LABELS)}")
    brain = image != 0
    keep = brain.float().mean((0, 1)) >= min_brain_fraction
    lo, hi = np.percentile(image[brain].numpy(), [0.5, 99.5]) if brain.any() else (0.0, 1.0)
    return Case(name, image_path, label_path, tuple(torch.nonzero(keep)[:, 0].tolist()), int((~keep).sum()),
                float(lo), float(hi), 4 if 4 in values else 3)


class FetsSlices(Dataset):
    """Axial brain slices of some cases; item -> (image (1, S, S) float32 in [0, 1],
    enhancing-tumour mask (1, S, S) float32 in {0, 1}).

    Attributes: `cases` (names), `skipped_slices` (their slices without enough brain,
    not items), `brain_slices` (their slices with brain, before max_slices_per_client);
    `data[i]` is item i's {"case": Case, "z": axial index, "k": its rank in the case}.
    """

    def __init__(self, cases, slices, image_size, cache_cases=8):
        """cases: [Case]; slices: {case name: [axial index, ...]} (the items, by case)."""
        super().__init__([{"case": c, "z": z, "k": k} for c in cases for k, z in enumerate(slices[c.name])],
                         transform=self._item)
        self.cases = [c.name for c in cases]
        self.skipped_slices = sum(c.skipped for c in cases)
        self.brain_slices = sum(len(c.slices) for c in cases)
        self._slices, self._cache, self._cache_cases = slices, OrderedDict(), cache_cases
        self._resize = Compose([Resized(KEYS, (image_size, image_size), mode="area"),
                                AsDiscreted("label", threshold=0.5)])

    def _stack(self, case):
        """This dataset's slices of one case, normalised and resized -> (K, S, S) x 2."""
        z = list(self._slices[case.name])
        image, label = _read(case.image, "image")[..., z], _read(case.label, "label")[..., z]
        scaled = ((image - case.lo) / max(case.hi - case.lo, 1e-6)).clamp(0, 1)
        d = self._resize({"image": torch.where(image != 0, scaled, 0).permute(2, 0, 1),
                          "label": (label == case.target).float().permute(2, 0, 1)})
        return tuple(convert_to_tensor(d[k], dtype=torch.float32) for k in KEYS)

    def _item(self, item):
        case = item["case"]
        if case.name not in self._cache:
            self._cache[case.name] = self._stack(case)
            if len(self._cache) > self._cache_cases:
                self._cache.popitem(last=False)
        self._cache.move_to_end(case.name)
        image, label = self._cache[case.name]
        return image[item["k"]][None], label[item["k"]][None]


def _subsample(cases, cap, g):
    """{case name: sorted axial indices}: all brain slices, or `cap` of them drawn at random."""
    pairs = [(c.name, z) for c in cases for z in c.slices]
    if cap is not None and len(pairs) > cap:
        pairs = sorted(pairs[i] for i in torch.randperm(len(pairs), generator=g)[:cap].tolist())
    slices = {c.name: [] for c in cases}
    for name, z in pairs:
        slices[name].append(z)
    return slices


def fets_federation(root, scenario="all", *, image_size, seed, max_slices_per_client=None, min_brain_fraction=0.05):
    """[(f"institution-{Partition_ID}", train FetsSlices, test FetsSlices)] for the
    scenario ("all", or one of the paper's groups "group1".."group4"; see module doc).
    max_slices_per_client: keep at most this many slices per client, 80/20 between
    its splits, drawn at random (seeded)."""
    if scenario != "all" and scenario not in GROUPS:
        raise ValueError(f"scenario: expected 'all' or one of {tuple(GROUPS)}, got {scenario!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: need a positive int, got {image_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: need an int >= 0, got {seed!r}")
    if max_slices_per_client is not None and (not isinstance(max_slices_per_client, int) or max_slices_per_client < 2):
        raise ValueError(f"max_slices_per_client: need None or an int >= 2, got {max_slices_per_client!r}")
    if not 0 < min_brain_fraction <= 1:
        raise ValueError(f"min_brain_fraction: need a value in (0, 1], got {min_brain_fraction!r}")
    partitions = read_partitions(root)
    csv_path = os.path.join(root, PARTITION_CSV)
    ids = sorted(partitions) if scenario == "all" else GROUPS[scenario]
    if not ids:
        raise ValueError(f"{csv_path}: no cases listed")
    for pid in ids:
        if pid not in partitions:
            raise ValueError(f"{csv_path}: partition {pid} ({scenario}) has no cases")
        if len(partitions[pid]) < 2:
            raise ValueError(f"{csv_path}: partition {pid} has {len(partitions[pid])} case; "
                             "an 80/20 split by case needs >= 2")
    # validate every selected case before building any client: headers first (cheap)
    files = {name: _files(root, name) for pid in ids for name in partitions[pid]}
    scanned = {pid: [_scan(name, *files[name], min_brain_fraction) for name in partitions[pid]] for pid in ids}
    clients = []
    for pid in ids:
        cases = scanned[pid]
        if not any(c.slices for c in cases):
            raise ValueError(f"{csv_path}: partition {pid} has no slice with brain "
                             f"(min_brain_fraction={min_brain_fraction})")
        g = torch.Generator().manual_seed(client_seed(seed, pid))
        order = torch.randperm(len(cases), generator=g).tolist()
        n_test = max(1, round(0.2 * len(cases)))
        split = [sorted((cases[i] for i in part), key=lambda c: c.name) for part in (order[n_test:], order[:n_test])]
        caps = (None, None)
        if max_slices_per_client is not None:
            n_train = min(max_slices_per_client - 1, max(1, round(0.8 * max_slices_per_client)))
            caps = (n_train, max_slices_per_client - n_train)
        datasets = []
        for part, cap in zip(split, caps):
            slices = _subsample(part, cap, g)
            if not any(slices.values()):
                names = [c.name for c in part]
                raise ValueError(f"{csv_path}: partition {pid}: cases {names} have no slice with brain")
            datasets.append(FetsSlices(part, slices, image_size))
        clients.append((f"institution-{pid}", *datasets))
    return clients
