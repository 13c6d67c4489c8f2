"""MedMNIST from local .npz files, combined into the paper's 24-class cross-modality
set (PathMNIST 9 classes, pathology; DermaMNIST 7, dermatoscopy; BloodMNIST 8,
blood-cell microscopy).

medmnist's own Dataset classes check the official sample counts and download on
demand; this loader reads the standard `<flag>.npz` (train/val/test images and
labels) itself and takes names, channels and labels from `medmnist.INFO`, so it
works on any file in that format, including the small ones the tests write.
"""
import os

import numpy as np
import torch

CROSS_MODALITY_FLAGS = ("pathmnist", "dermamnist", "bloodmnist")


def _info():
    import medmnist  # installed --no-deps: only its INFO table is used

    return medmnist.INFO


def load_npz(root, flag, split):
    """(images (n, 3, H, W) float32 in [0, 1], labels (n,) int64) of one flag/split."""
    info = _info()
    if flag not in info:
        raise ValueError(f"flag: unknown MedMNIST dataset {flag!r}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split: expected train, val or test, got {split!r}")
    path = os.path.join(root, f"{flag}.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data_root: {path} not found (place the standard MedMNIST .npz files there)")
    with np.load(path) as npz:
        images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    channels = info[flag]["n_channels"]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    y = torch.from_numpy(labels.reshape(len(labels), -1)[:, 0].astype(np.int64))
    n_classes = len(info[flag]["label"])
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{flag}.npz: labels outside [0, {n_classes})")
    return x, y


def load_cross_modality(root, split, flags=CROSS_MODALITY_FLAGS):
    """Concatenate flags with label offsets -> (images, labels, modality ids, class names)."""
    info = _info()
    xs, ys, ms, names, offset = [], [], [], [], 0
    for m, flag in enumerate(flags):
        x, y = load_npz(root, flag, split)
        xs.append(x)
        ys.append(y + offset)
        ms.append(torch.full_like(y, m))
        labels = info[flag]["label"]
        names += [f"{flag}:{labels[str(i)]}" for i in range(len(labels))]
        offset += len(labels)
    return torch.cat(xs), torch.cat(ys), torch.cat(ms), names
