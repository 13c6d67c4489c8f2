"""The BreaKHis loader on small PNG trees the tests write.

Every pixel says where it came from: red = 10 + 30 * tumour-type index, green =
10 + 60 * magnification index + column, blue = 8 * row, so an item's target shows its
file's type and magnification and the crop's corner, in (H, W) order.
"""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from omnifm.data.breakhis import CLASSES, breakhis_federation, scan_breakhis
from omnifm.data.tissue import MAGNIFICATIONS, TISSUE_TYPES, bicubic_down

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 24, 32  # written image size (not square: a transposed read shows)
S = 16  # image_size


def class_of(tumour):
    return next(c for c, types in CLASSES.items() if tumour in types)


def write_png(root, tumour, patient, mag, name="img.png", size=(H, W), cls=None, mode="RGB"):
    folder = os.path.join(root, "histology_slides", "breast", cls or class_of(tumour), "SOB", tumour, patient, mag)
    os.makedirs(folder, exist_ok=True)
    rows, cols = np.mgrid[:size[0], :size[1]]
    pixels = np.stack([np.full(size, 10 + 30 * TISSUE_TYPES.index(tumour) if tumour in TISSUE_TYPES else 0),
                       10 + 60 * (MAGNIFICATIONS.index(mag) if mag in MAGNIFICATIONS else 0) + cols,
                       8 * rows], -1).astype(np.uint8)
    path = os.path.join(folder, name)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def write_tree(root, tumours=TISSUE_TYPES, patients=3, mags=MAGNIFICATIONS):
    """One image per (tumour type, patient, magnification)."""
    for tumour in tumours:
        for p in range(patients):
            for mag in mags:
                write_png(root, tumour, f"SOB_{tumour[:3]}_{p}", mag)
    return str(root)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("breakhis"))


def build(root, n_clients, scenario, **kwargs):
    return breakhis_federation(root, n_clients, scenario, **dict(dict(scale=2, image_size=S, seed=0), **kwargs))


def patients(dataset):
    return {(r.tumour, r.patient) for r in dataset.records}


def check_items(dataset, centre):
    """Every item: shapes, range, lr = bicubic_down(hr), and hr is its own file's pixels
    at its stored crop (the centre for test data)."""
    for (lr, hr), r, (top, left) in zip(dataset, dataset.records, dataset.crops):
        assert type(hr) is torch.Tensor and hr.dtype == lr.dtype == torch.float32
        assert hr.shape == (3, S, S) and lr.shape == (3, S // 2, S // 2)
        torch.testing.assert_close(lr, bicubic_down(hr, 2), rtol=0, atol=0)
        if centre:
            assert (top, left) == ((H - S) // 2, (W - S) // 2)
        assert 0 <= top <= H - S and 0 <= left <= W - S
        rows, cols = torch.meshgrid(torch.arange(top, top + S), torch.arange(left, left + S), indexing="ij")
        expect = torch.stack([torch.full((S, S), 10 + 30 * TISSUE_TYPES.index(r.tumour)),
                              10 + 60 * MAGNIFICATIONS.index(r.magnification) + cols, 8 * rows]) / 255
        torch.testing.assert_close(hr, expect.float(), rtol=0, atol=1e-6)


def test_tissue_split(tree):
    """One client per tumour type; 80/20 by patient (3 patients: 2 train, 1 test); every
    image used exactly once; items are the right pixels."""
    fed = build(tree, 8, "tissue")
    assert [name for name, _, _ in fed] == list(TISSUE_TYPES)
    used = []
    for name, train, test in fed:
        assert {r.tumour for r in train.records + test.records} == {name}
        assert len(patients(train)) == 2 and len(patients(test)) == 1
        assert (len(train), len(test)) == (8, 4)
        used += [r.path for r in train.records + test.records]
    assert sorted(used) == sorted(r.path for r in scan_breakhis(tree)[0])
    check_items(fed[0][1], centre=False)
    check_items(fed[0][2], centre=True)


def test_magnification_split(tree):
    """One client per magnification, each with every patient; a test patient is a test
    patient in every client, so no client trains on it."""
    fed = build(tree, 4, "magnification", scale=4)
    assert [name for name, _, _ in fed] == list(MAGNIFICATIONS)
    test_patients = patients(fed[0][2])
    assert len(test_patients) == 8  # one per tumour type
    for name, train, test in fed:
        assert {r.magnification for r in train.records + test.records} == {name}
        assert patients(test) == test_patients
        assert len(patients(train)) == 16 and not patients(train) & test_patients
    lr, hr = fed[3][2][0]
    assert lr.shape == (3, S // 4, S // 4)


def test_fewer_and_more_clients_than_groups(tree):
    """Fewer clients: client i takes groups i, i + n, ...; more: the clients sharing a
    group split its patients, each getting train and test patients."""
    fed = build(tree, 3, "tissue")
    assert [name for name, _, _ in fed] == ["+".join(TISSUE_TYPES[i::3]) for i in range(3)]
    for i, (_, train, test) in enumerate(fed):
        assert {r.tumour for r in train.records + test.records} == set(TISSUE_TYPES[i::3])
    fed = build(tree, 8, "magnification")
    assert [name for name, _, _ in fed] == [f"{m}-{k}" for k in range(2) for m in MAGNIFICATIONS]
    for m in range(4):
        (_, train_a, test_a), (_, train_b, test_b) = fed[m], fed[m + 4]
        a, b = patients(train_a) | patients(test_a), patients(train_b) | patients(test_b)
        assert not a & b and len(a | b) == 24
        assert len(patients(test_a)) == len(patients(test_b)) == 4


def test_seeded(tree):
    """Same seed: same partition, crops and items (an epoch or a resumed run reads the
    same crops); another seed: another patient split; training crops vary."""
    a, b, c = build(tree, 4, "magnification"), build(tree, 4, "magnification"), build(tree, 4, "magnification", seed=1)
    for (_, train_a, test_a), (_, train_b, test_b) in zip(a, b):
        assert train_a.records == train_b.records and train_a.crops == train_b.crops
        assert test_a.records == test_b.records
    assert torch.equal(a[1][1][5][1], b[1][1][5][1])
    assert patients(a[0][2]) != patients(c[0][2])
    assert len(set(a[0][1].crops)) > 5


def test_max_per_client(tree):
    fed = build(tree, 2, "tissue", max_per_client=5)
    for _, train, test in fed:
        assert (len(train), len(test)) == (5, 1)
    check_items(fed[1][1], centre=False)


def test_skipped_files_are_counted(tmp_path):
    root = write_tree(tmp_path, tumours=TISSUE_TYPES[:2], patients=2, mags=MAGNIFICATIONS[:1])
    (tmp_path / "Folds.csv").write_text("fold,mag,grp,filename\n")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning, match="skipped 2 files that are not PNGs"):
        build(root, 2, "tissue")
    assert len(scan_breakhis(root)[1]) == 2


# -- bad data: refused when the federation is built, naming the file or folder ----------

def small_tree(root):
    return write_tree(root, tumours=TISSUE_TYPES[:2], patients=2, mags=MAGNIFICATIONS[:1])


@pytest.mark.parametrize("damage", ["truncated", "not_png"])
def test_unreadable_png(tmp_path, damage):
    root = small_tree(tmp_path)
    path = write_png(root, TISSUE_TYPES[0], "SOB_ade_1", "40X", name="bad.png")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2] if damage == "truncated" else b"not an image")
    with pytest.raises(ValueError, match=f"{re.escape(path)}: unreadable or truncated PNG"):
        build(root, 2, "tissue")


@pytest.mark.parametrize("folders, bad, problem", [
    (("adenosiss", "40X", "benign"), "adenosiss", "unknown tumour type folder 'adenosiss'"),
    (("adenosis", "50X", "benign"), "50X", "unknown magnification folder '50X'"),
    (("ductal_carcinoma", "40X", "benign"), "ductal_carcinoma", "tumour type 'ductal_carcinoma' is not benign"),
])
def test_unknown_folder(tmp_path, folders, bad, problem):
    """Refused, not skipped: a misspelt folder would silently drop a group of images."""
    tumour, mag, cls = folders
    root = small_tree(tmp_path)
    path = write_png(root, tumour, "SOB_x_1", mag, cls=cls)
    with pytest.raises(ValueError, match=problem) as err:
        build(root, 2, "tissue")
    folder = str(err.value).split(": ")[0]  # the message starts with the offending folder
    assert path.startswith(folder + os.sep) and os.path.basename(folder) == bad


def test_png_outside_layout(tmp_path):
    root = small_tree(tmp_path)
    path = os.path.join(root, "benign", "SOB", "adenosis", "40X", "stray.png")  # no patient folder
    os.makedirs(os.path.dirname(path))
    Image.new("RGB", (W, H)).save(path)
    with pytest.raises(ValueError, match=f"{re.escape(path)}: PNG outside the BreaKHis layout"):
        build(root, 2, "tissue")


def test_not_rgb(tmp_path):
    root = small_tree(tmp_path)
    path = write_png(root, TISSUE_TYPES[1], "SOB_fib_0", "40X", name="gray.png", mode="L")
    with pytest.raises(ValueError, match=f"{re.escape(path)}: expected an 8-bit RGB PNG, got PNG mode L"):
        build(root, 2, "tissue")


def test_image_smaller_than_image_size(tmp_path):
    root = small_tree(tmp_path)
    path = write_png(root, TISSUE_TYPES[0], "SOB_ade_0", "40X", name="small.png", size=(H, S - 1))
    with pytest.raises(ValueError, match=f"{re.escape(path)}: image {S - 1}x{H} is smaller than image_size {S}"):
        build(root, 2, "tissue")


@pytest.mark.parametrize("n_clients, scenario, client, split", [
    (3, "tissue", "adenosis-1", "training"),  # 2 patients: both go to adenosis-0
    (5, "magnification", "40X-2", "training"),  # only 40X: 2 train patients for 5 clients
])
def test_empty_client_partition(tmp_path, n_clients, scenario, client, split):
    root = small_tree(tmp_path)
    with pytest.raises(ValueError, match=f"client '{client}': empty {split} partition"):
        build(root, n_clients, scenario)


def test_single_patient_type_has_no_test_split(tmp_path):
    root = write_tree(tmp_path, tumours=TISSUE_TYPES[:2], patients=1, mags=MAGNIFICATIONS[:1])
    with pytest.raises(ValueError, match="client 'adenosis': empty test partition"):
        build(root, 2, "tissue")


def test_empty_or_missing_root(tmp_path):
    with pytest.raises(ValueError, match="no PNG images under"):
        build(str(tmp_path), 2, "tissue")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        build(str(tmp_path / "missing"), 2, "tissue")


def test_bad_arguments(tree):
    with pytest.raises(ValueError, match="scenario"):
        build(tree, 2, "patient")
    with pytest.raises(ValueError, match="image_size: 18 is not divisible by scale 4"):
        build(tree, 2, "tissue", image_size=18, scale=4)
    with pytest.raises(ValueError, match="max_per_client"):
        build(tree, 2, "tissue", max_per_client=0)
