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
    images, labels = _read_split(path, split)
    channels = info[flag]["n_channels"]
    if images.ndim != (3 if channels == 1 else 4) or (channels > 1 and images.shape[3] != channels):
        raise ValueError(f"{path}: {split}_images has shape {images.shape}, expected (n, H, W"
                         f"{'' if channels == 1 else f', {channels}'}) for {flag}")
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} {split}_images but {len(labels)} {split}_labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    y = torch.from_numpy(labels.reshape(len(labels), -1)[:, 0].astype(np.int64))
    n_classes = len(info[flag]["label"])
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{path}: labels outside [0, {n_classes})")
    return x, y


def _read_split(path, split):
    """(images, labels) arrays of one split; a file that is not a readable MedMNIST .npz
    is refused with an error naming it (allow_pickle stays off: nothing read runs code)."""
    keys = (f"{split}_images", f"{split}_labels")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # empty or random bytes: EOFError, a "pickled data" ValueError, ...
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds one array, not a MedMNIST .npz archive")
    with npz:
        missing = [k for k in keys if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)} (it has {', '.join(npz.files) or 'no arrays'})")
        try:
            return tuple(npz[k] for k in keys)
        except Exception as exc:  # a damaged member of the archive
            raise ValueError(f"{path}: damaged ({type(exc).__name__}: {exc})") from exc


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
