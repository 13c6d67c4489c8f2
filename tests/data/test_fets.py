"""The FeTS/BraTS loader (omnifm.data.fets) on tiny NIfTI volumes written here."""
import os

import nibabel
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import Dataset

from omnifm.data import fets
from omnifm.data.fets import fets_federation

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (16, 16, 6)  # axial slices 0 and 5 empty, slice 1 with too little brain: 3 skipped


def volume(seed, labels=(0, 1, 2, 4), shape=SHAPE):
    """(T1ce image, segmentation) arrays: a brain with varied intensity in the middle
    slices, tumour labels drawn from `labels` inside it."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    seg = np.zeros(shape, np.uint8)
    h, w, d = shape
    yy, xx = np.mgrid[:h, :w]
    brain = ((yy - h / 2 + 0.5) / (0.4 * h)) ** 2 + ((xx - w / 2 + 0.5) / (0.35 * w)) ** 2 < 1
    for z in range(2, d - 1):
        # negative values too (z-scored releases): the background must still map to 0
        image[..., z][brain] = rng.uniform(-100, 1000, brain.sum())
        seg[..., z][brain] = rng.choice(labels, brain.sum())
    image[h // 2, w // 2, 1] = 7.0  # one voxel of brain: below min_brain_fraction
    return image, seg


def write(path, array):
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(path))


def write_case(root, name, image, seg):
    os.makedirs(root / name, exist_ok=True)
    write(root / name / f"{name}_t1ce.nii.gz", image)
    write(root / name / f"{name}_seg.nii.gz", seg)


def write_root(root, cases_per_partition, **labels):
    """A data root: partition id -> number of cases, each with its own volume;
    returns {case name: (image, seg)}."""
    rows, arrays = ["Partition_ID,Subject_ID"], {}
    for pid, n in cases_per_partition.items():
        for i in range(n):
            name = f"FeTS2022_{pid:02d}{i:03d}"
            arrays[name] = volume(100 * pid + i, **labels)
            write_case(root, name, *arrays[name])
            rows.append(f"{pid},{name}")
    (root / fets.PARTITION_CSV).write_text("\n".join(rows) + "\n")
    return arrays


def normalised(image):
    """The documented per-volume normalisation, in numpy."""
    brain = image != 0
    lo, hi = np.percentile(image[brain], [0.5, 99.5])
    return np.where(brain, np.clip((image - lo) / (hi - lo), 0, 1), 0)


def items(dataset):
    """[(case name, axial index, image, mask)] of every item, in order."""
    return [(d["case"].name, d["z"], *dataset[i]) for i, d in enumerate(dataset.data)]


def test_items_are_the_normalised_brain_slices_and_enhancing_masks(tmp_path):
    arrays = write_root(tmp_path, {1: 5})
    [(name, train, test)] = fets_federation(tmp_path, image_size=16, seed=0)
    assert name == "institution-1"
    assert isinstance(train, Dataset) and isinstance(test, Dataset)
    for ds in (train, test):
        assert ds.skipped_slices == 3 * len(ds.cases) and ds.brain_slices == 3 * len(ds.cases)
        assert len(ds) == 3 * len(ds.cases)
        seen = set()
        for case, z, x, y in items(ds):
            image, seg = arrays[case]
            seen.add((case, z))
            assert x.shape == y.shape == (1, 16, 16) and x.dtype == y.dtype == torch.float32
            np.testing.assert_allclose(x[0].numpy(), normalised(image)[..., z], atol=1e-5)
            assert torch.equal(y[0], torch.from_numpy(seg[..., z] == 4).float())
        assert seen == {(c, z) for c in ds.cases for z in (2, 3, 4)}


def test_resized_items_stay_in_range_and_binary(tmp_path):
    arrays = write_root(tmp_path, {1: 2})
    [(_, train, _)] = fets_federation(tmp_path, image_size=8, seed=0)
    for case, z, x, y in items(train):
        assert x.shape == y.shape == (1, 8, 8)
        assert 0 <= x.min() and x.max() <= 1
        et = torch.from_numpy(arrays[case][1][..., z] == 4).float()[None, None]
        assert torch.equal(y[None], (F.interpolate(et, size=(8, 8), mode="area") >= 0.5).float())


def test_target_is_label_4_else_3(tmp_path):
    """FeTS 2022 labels enhancing tumour 4, BraTS 2023 uses 3: a volume with any 4
    targets 4 (its 3s are not enhancing), one without targets 3."""
    root = tmp_path
    new, old = volume(1, labels=(0, 1, 2, 3)), volume(2, labels=(0, 1, 2, 3, 4))
    write_case(root, "new", *new)
    write_case(root, "old", *old)
    (root / fets.PARTITION_CSV).write_text("Partition_ID,Subject_ID\n1,new\n1,old\n")
    [(_, train, test)] = fets_federation(root, image_size=16, seed=0)
    target = {"new": 3, "old": 4}
    for case, z, _, y in items(train) + items(test):
        seg = (new, old)[case == "old"][1][..., z]
        assert torch.equal(y[0], torch.from_numpy(seg == target[case]).float())


def test_split_is_by_case_80_20_and_seeded(tmp_path):
    write_root(tmp_path, {3: 10})
    [(_, train, test)] = fets_federation(tmp_path, image_size=16, seed=0)
    assert len(train.cases) == 8 and len(test.cases) == 2
    assert set(train.cases).isdisjoint(test.cases)
    assert {d["case"].name for d in train.data} == set(train.cases)
    [(_, train2, test2)] = fets_federation(tmp_path, image_size=16, seed=0)
    assert test2.cases == test.cases
    for a, b in zip(items(test), items(test2)):
        assert a[:2] == b[:2] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    [(_, _, test3)] = fets_federation(tmp_path, image_size=16, seed=1)
    assert test3.cases != test.cases


def test_max_slices_per_client_caps_both_splits(tmp_path):
    write_root(tmp_path, {1: 5})
    [(_, train, test)] = fets_federation(tmp_path, image_size=16, seed=0, max_slices_per_client=5)
    assert (len(train), len(test)) == (4, 1)
    assert train.brain_slices == 12 and test.brain_slices == 3  # what the cap chose from
    for case, z, _, _ in items(train) + items(test):
        assert z in (2, 3, 4)


@pytest.mark.parametrize("scenario,ids", [
    ("group1", range(1, 10)), ("group2", range(10, 16)), ("group3", range(16, 21)), ("group4", range(21, 24)),
    ("all", range(1, 24)),
])
def test_scenarios_select_partitions(tmp_path, scenario, ids):
    write_root(tmp_path, {pid: 2 for pid in range(1, 24)})
    clients = fets_federation(tmp_path, scenario, image_size=8, seed=0)
    assert [name for name, _, _ in clients] == [f"institution-{i}" for i in ids]
    for name, train, test in clients:
        pid = int(name.split("-")[1])
        assert {c[:-3] for c in train.cases + test.cases} == {f"FeTS2022_{pid:02d}"}


def test_items_are_read_lazily_once_per_case_in_order(tmp_path, monkeypatch):
    write_root(tmp_path, {1: 5})
    reads = []
    real_read = fets._read
    monkeypatch.setattr(fets, "_read", lambda path, key: reads.append(path) or real_read(path, key))
    [(_, train, _)] = fets_federation(tmp_path, image_size=16, seed=0)
    assert len(reads) == 10  # the validation pass: every file once
    reads.clear()
    items(train)
    assert sorted(reads) == sorted(p for d in train.data[::3] for p in (d["case"].image, d["case"].label))


# ---- bad data: raised when the federation is built, naming the file ----

def test_missing_case_folder(tmp_path):
    write_root(tmp_path, {1: 3})
    with open(tmp_path / fets.PARTITION_CSV, "a") as f:
        f.write("1,FeTS2022_absent\n")
    with pytest.raises(FileNotFoundError, match="FeTS2022_absent.*not found"):
        fets_federation(tmp_path, image_size=16, seed=0)


def test_missing_segmentation_file(tmp_path):
    write_root(tmp_path, {1: 3})
    path = tmp_path / "FeTS2022_01001" / "FeTS2022_01001_seg.nii.gz"
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=f"{path}: segmentation file missing"):
        fets_federation(tmp_path, image_size=16, seed=0)


def test_image_and_segmentation_shapes_differ(tmp_path):
    write_root(tmp_path, {1: 3})
    path = tmp_path / "FeTS2022_01002" / "FeTS2022_01002_seg.nii.gz"
    write(path, np.zeros((16, 16, 5), np.uint8))
    with pytest.raises(ValueError, match=rf"{path}: shape \(16, 16, 5\) differs"):
        fets_federation(tmp_path, image_size=16, seed=0)


@pytest.mark.parametrize("keep", [0.5, 40], ids=["voxels-cut", "header-cut"])
def test_truncated_file(tmp_path, keep):
    write_root(tmp_path, {1: 3})
    path = tmp_path / "FeTS2022_01000" / "FeTS2022_01000_t1ce.nii.gz"
    data = path.read_bytes()
    n = int(len(data) * keep) if keep < 1 else keep
    path.write_bytes(data[:n])
    if keep < 1:  # the header alone still reads: only reading the voxels can tell
        assert nibabel.load(path).shape == SHAPE
    with pytest.raises(ValueError, match=f"{path}: unreadable"):
        fets_federation(tmp_path, image_size=16, seed=0)


def test_label_outside_the_brats_set(tmp_path):
    write_root(tmp_path, {1: 3})
    image, seg = volume(0)
    seg[8, 8, 3] = 7
    path = tmp_path / "FeTS2022_01001" / "FeTS2022_01001_seg.nii.gz"
    write(path, seg)
    with pytest.raises(ValueError, match=rf"{path}: label values \[7\] outside"):
        fets_federation(tmp_path, image_size=16, seed=0)


def test_volume_that_is_not_3d(tmp_path):
    write_root(tmp_path, {1: 3})
    path = tmp_path / "FeTS2022_01000" / "FeTS2022_01000_t1ce.nii.gz"
    write(path, np.zeros(SHAPE + (2,), np.float32))
    with pytest.raises(ValueError, match=f"{path}: expected a 3-D volume"):
        fets_federation(tmp_path, image_size=16, seed=0)


def test_group_partition_without_cases(tmp_path):
    write_root(tmp_path, {21: 2, 22: 2})
    with pytest.raises(ValueError, match="partition 23 .group4. has no cases"):
        fets_federation(tmp_path, "group4", image_size=16, seed=0)


def test_partition_with_one_case(tmp_path):
    write_root(tmp_path, {1: 2, 2: 1})
    with pytest.raises(ValueError, match="partition 2 has 1 case"):
        fets_federation(tmp_path, image_size=16, seed=0)


def test_csv_without_cases(tmp_path):
    (tmp_path / fets.PARTITION_CSV).write_text("Partition_ID,Subject_ID\n")
    with pytest.raises(ValueError, match="no cases listed"):
        fets_federation(tmp_path, image_size=16, seed=0)


@pytest.mark.parametrize("empty,problem", [
    (("FeTS2022_01000", "FeTS2022_01001"), "partition 1 has no slice with brain"),
    (("FeTS2022_01001",), r"partition 1: cases \['FeTS2022_01001'\] have no slice with brain"),
], ids=["whole-partition", "one-split"])
def test_partition_without_brain(tmp_path, empty, problem):
    write_root(tmp_path, {1: 2})
    for name in empty:
        write(tmp_path / name / f"{name}_t1ce.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match=problem):
        fets_federation(tmp_path, image_size=16, seed=0)


@pytest.mark.parametrize("text,problem", [
    ("Partition,Subject\n1,a\n", "expected columns Partition_ID,Subject_ID"),
    ("", "expected columns Partition_ID,Subject_ID"),
    ("Partition_ID,Subject_ID\nfirst,a\n", "line 2: need an integer Partition_ID"),
    ("Partition_ID,Subject_ID\n1\n", "line 2: need an integer Partition_ID and a Subject_ID"),
    ("Partition_ID,Subject_ID\n1,a\n2,a\n", "line 3: a is listed twice"),
])
def test_malformed_csv(tmp_path, text, problem):
    (tmp_path / fets.PARTITION_CSV).write_text(text)
    with pytest.raises(ValueError, match=f"{tmp_path / fets.PARTITION_CSV}.*{problem}"):
        fets_federation(tmp_path, image_size=16, seed=0)


def test_missing_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match=fets.PARTITION_CSV):
        fets_federation(tmp_path, image_size=16, seed=0)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(scenario="group5"), "scenario"),
    (dict(image_size=0), "image_size"),
    (dict(seed=-1), "seed"),
    (dict(max_slices_per_client=1), "max_slices_per_client"),
    (dict(min_brain_fraction=0), "min_brain_fraction"),
])
def test_bad_arguments(tmp_path, kwargs, arg):
    write_root(tmp_path, {1: 2})
    with pytest.raises(ValueError, match=arg):
        fets_federation(tmp_path, **(dict(scenario="all", image_size=16, seed=0) | kwargs))
