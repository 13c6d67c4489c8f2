"""The atlas fusion-pair loader on small PNG trees the tests write.

Pixels say where they came from: an MRI is a flat grey of 10 + pair number, its
partner a flat grey (CT) or colour (PET/SPECT) of its own, so every item shows which
files it pairs, and flat images keep their value through the resize.
"""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from omnifm.data.atlas import atlas_federation

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 20, 24  # written size (not square: a transposed read shows)
S = 8  # image_size
PARTNER_COLOUR = {"CT": (200,), "PET": (250, 120, 10), "SPECT": (30, 160, 220)}


def write_png(path, value, size=(H, W), mode=None):
    """A flat PNG of one grey (1-tuple) or RGB (3-tuple) value."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.broadcast_to(np.array(value, dtype=np.uint8), (*size, len(value)))
    img = Image.fromarray(np.ascontiguousarray(pixels[..., 0] if len(value) == 1 else pixels))
    (img.convert(mode) if mode else img).save(path)
    return path


def write_pair(root, pair, n, partner_value=None, size=(H, W)):
    partner = pair.replace("-MRI", "")
    write_png(os.path.join(root, pair, "MRI", f"{n}.png"), (10 + n,), size)
    return write_png(os.path.join(root, pair, partner, f"{n}.png"), partner_value or PARTNER_COLOUR[partner], size)


def write_tree(root, pairs=("CT-MRI", "PET-MRI", "SPECT-MRI"), n=5):
    for pair in pairs:
        for i in range(1, n + 1):
            write_pair(root, pair, i)
    return str(root)


def y_of(rgb):
    """ITU-R BT.601 luma, by hand."""
    r, g, b = (c / 255 for c in (rgb * 3 if len(rgb) == 1 else rgb))
    return 0.299 * r + 0.587 * g + 0.114 * b


def build(root, **kwargs):
    return atlas_federation(str(root), **{**dict(image_size=S, seed=0), **kwargs})


def test_one_client_per_pair_folder(tmp_path):
    parts = build(write_tree(tmp_path))
    assert [name for name, _, _ in parts] == ["CT-MRI", "PET-MRI", "SPECT-MRI"]
    for name, train, test in parts:
        assert len(train) == 4 and len(test) == 1  # 80/20 of 5 pairs
        for ds in (train, test):
            x, y = ds.tensors
            assert x.shape[1:] == (2, S, S) and x.dtype == torch.float32 and torch.equal(x, y)
        x = torch.cat([train.tensors[0], test.tensors[0]])
        # channel 0 is the MRI (grey 11..15, so it also names the pair), channel 1 the partner
        mri = x[:, 0].flatten(1)
        assert torch.allclose(mri, mri[:, :1], atol=1e-6)  # flat images stay flat
        assert sorted((mri[:, 0] * 255).round().int().tolist()) == [11, 12, 13, 14, 15]
        expected = y_of(PARTNER_COLOUR[name.replace("-MRI", "")])
        assert torch.allclose(x[:, 1], torch.full_like(x[:, 1], expected), atol=1e-5), name


def test_colour_becomes_the_y_channel(tmp_path):
    """Each RGB partner is its Y = 0.299 R + 0.587 G + 0.114 B, per pixel."""
    rows = np.arange(S)[:, None, None]
    rgb = np.concatenate([np.full((S, S, 1), 240), 30 * rows + np.zeros((S, S, 1)), 255 - 30 * rows
                          + np.zeros((S, S, 1))], -1).astype(np.uint8)  # colour varies down the rows
    for n in (1, 2):
        os.makedirs(tmp_path / "PET-MRI" / "PET", exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / "PET-MRI" / "PET" / f"{n}.png")
        write_png(str(tmp_path / "PET-MRI" / "MRI" / f"{n}.png"), (50,), (S, S))
    (_, train, _), = build(tmp_path)
    y = train.tensors[0][0, 1]
    expected = torch.tensor([[y_of(tuple(rgb[r, c])) for c in range(S)] for r in range(S)], dtype=torch.float32)
    assert torch.allclose(y, expected, atol=1e-5)  # also: rows stay rows (no transposed read)


def test_resize_keeps_orientation(tmp_path):
    """A written H x W image with a dark top half comes back dark on top."""
    for n in (1, 2):
        img = np.zeros((H, W), dtype=np.uint8)
        img[H // 2:] = 255
        for modality in ("MRI", "CT"):
            os.makedirs(tmp_path / "CT-MRI" / modality, exist_ok=True)
            Image.fromarray(img).save(tmp_path / "CT-MRI" / modality / f"{n}.png")
    (_, train, _), = build(tmp_path)
    x = train.tensors[0][0]
    assert x[:, :S // 2 - 1].max() < 0.05 and x[:, S // 2 + 1:].min() > 0.95


def test_seeded_split_and_cap(tmp_path):
    root = write_tree(tmp_path, pairs=("CT-MRI",), n=10)

    def test_mris(seed, **kwargs):
        (_, _, test), = build(root, seed=seed, **kwargs)
        return sorted((test.tensors[0][:, 0, 0, 0] * 255).round().int().tolist())

    assert test_mris(0) == test_mris(0) and len(test_mris(0)) == 2
    assert len({tuple(test_mris(seed)) for seed in range(5)}) > 1
    (_, train, test), = build(root, max_per_client=5)
    assert len(train) + len(test) == 5


def test_skipped_entries_are_counted(tmp_path):
    root = write_tree(tmp_path, pairs=("CT-MRI",))
    (tmp_path / "CT-MRI" / "MRI" / "notes.txt").write_text("x")
    os.makedirs(tmp_path / "CT-MRI" / "Fused")
    (tmp_path / "README").write_text("x")
    with pytest.warns(UserWarning, match="skipped 3 entries"):
        build(root)


def test_pair_without_its_mri(tmp_path):
    root = write_tree(tmp_path, pairs=("CT-MRI",))
    os.remove(tmp_path / "CT-MRI" / "MRI" / "3.png")
    path = os.path.join(root, "CT-MRI", "CT", "3.png")
    with pytest.raises(ValueError, match=f"{re.escape(path)}: pair without its MRI"):
        build(root)


def test_mri_without_its_partner(tmp_path):
    root = write_tree(tmp_path, pairs=("PET-MRI",))
    os.remove(tmp_path / "PET-MRI" / "PET" / "2.png")
    path = os.path.join(root, "PET-MRI", "MRI", "2.png")
    with pytest.raises(ValueError, match=f"{re.escape(path)}: MRI without its PET"):
        build(root)


def test_shape_mismatch_between_partners(tmp_path):
    root = write_tree(tmp_path, pairs=("CT-MRI",))
    write_png(os.path.join(root, "CT-MRI", "CT", "4.png"), (200,), size=(H, W + 2))
    path = os.path.join(root, "CT-MRI", "MRI", "4.png")
    with pytest.raises(ValueError, match=f"{re.escape(path)}: shape mismatch with its partner .*4.png "
                                         f"\\({W}x{H} vs {W + 2}x{H}\\)"):
        build(root)


@pytest.mark.parametrize("damage", ["truncated", "not_png"])
def test_unreadable_png(tmp_path, damage):
    root = write_tree(tmp_path, pairs=("SPECT-MRI",))
    path = os.path.join(root, "SPECT-MRI", "SPECT", "2.png")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2] if damage == "truncated" else b"not an image")
    with pytest.raises(ValueError, match=f"{re.escape(path)}: unreadable or truncated PNG"):
        build(root)


def test_neither_grey_nor_rgb(tmp_path):
    root = write_tree(tmp_path, pairs=("PET-MRI",))
    path = os.path.join(root, "PET-MRI", "PET", "2.png")
    write_png(path, PARTNER_COLOUR["PET"], mode="RGBA")
    with pytest.raises(ValueError, match=f"{re.escape(path)}: expected an 8-bit grey \\(L\\) or RGB PNG, got PNG "
                                         "mode RGBA"):
        build(root)


def test_empty_pair_folder(tmp_path):
    root = write_tree(tmp_path, pairs=("CT-MRI",))
    os.makedirs(tmp_path / "PET-MRI" / "MRI")
    os.makedirs(tmp_path / "PET-MRI" / "PET")
    with pytest.raises(ValueError, match=f"{re.escape(os.path.join(root, 'PET-MRI'))}: empty pair folder"):
        build(root)


def test_single_pair_has_no_test_split(tmp_path):
    root = write_tree(tmp_path, pairs=("CT-MRI",), n=1)
    with pytest.raises(ValueError, match=f"{re.escape(os.path.join(root, 'CT-MRI'))}: 1 pair, need at least 2"):
        build(root)


@pytest.mark.parametrize("folder", ["CT", "CT-PET", "MRI-MRI", "CT-MRI-2"])
def test_pair_folder_name(tmp_path, folder):
    os.makedirs(tmp_path / folder / "MRI")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / folder))}: a pair folder is named"):
        build(tmp_path)


def test_mri_first_folder_name(tmp_path):
    for n in (1, 2):
        write_png(str(tmp_path / "MRI-SPECT" / "MRI" / f"{n}.png"), (40,))
        write_png(str(tmp_path / "MRI-SPECT" / "SPECT" / f"{n}.png"), (90,))
    (name, train, _), = build(tmp_path)
    assert name == "MRI-SPECT" and abs(train.tensors[0][0, 1, 0, 0].item() - 90 / 255) < 1e-6


def test_empty_or_missing_root(tmp_path):
    with pytest.raises(ValueError, match="root: no pair folders"):
        build(tmp_path)
    with pytest.raises(FileNotFoundError, match="root"):
        build(tmp_path / "absent")


@pytest.mark.parametrize("kwargs,name", [(dict(image_size=0), "image_size"),
                                         (dict(max_per_client=1), "max_per_client")])
def test_bad_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        build(write_tree(tmp_path, pairs=("CT-MRI",)), **kwargs)
