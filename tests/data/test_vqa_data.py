"""Medical VQA data (omnifm.data.vqa): synthetic templates, partitions, the SLAKE,
VQA-RAD and VQA-Med loaders on small files the tests write, and bad data refused by name.

Written images are uniform colours that encode their index (red = 20 * k), so a
question's image shows which file it was read from.
"""
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from omnifm.data import vqa
from omnifm.data.vqa import (MODALITIES, ORGANS, SHAPES, VQAPool, load_slake, load_vqa_med, load_vqa_rad,
                             partition, synthetic_vqa, vqa_federation)
from omnifm.tasks import config_for, get_task

pytestmark = pytest.mark.usefixtures("one_thread")

S = 32
YES_NO = {"yes", "no"}


# -- synthetic ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool():
    return synthetic_vqa(60, MODALITIES, image_size=S, seed=1)


def test_same_seed_same_pool_other_seed_other_pool(pool):
    again, other = (synthetic_vqa(60, MODALITIES, image_size=S, seed=s) for s in (1, 2))
    assert torch.equal(pool.images, again.images) and pool.questions == again.questions
    assert pool.answers == again.answers and torch.equal(pool.closed, again.closed)
    assert not torch.equal(pool.images, other.images) and pool.questions != other.questions


def test_pool_rows_types_and_images(pool):
    assert pool.images.shape == (60, 3, S, S) and pool.images.dtype == torch.float32
    assert 0 <= pool.images.min() and pool.images.max() <= 1
    assert pool.modality == [MODALITIES[i // 2 % 5] for i in range(60)]
    assert pool.closed.tolist() == [i % 2 == 0 for i in range(60)]  # closed and open alternate
    for i, (q, a, closed, m) in enumerate(zip(pool.questions, pool.answers, pool.closed.tolist(), pool.modality)):
        assert (a in YES_NO) == closed, (q, a)
        img = pool.images[pool.image[i]]
        gray = torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
        assert gray == (m in ("mri", "ct", "xray")), (i, m)  # the row's image has its modality's channels
        if q == "what modality is this image?":
            assert a == m
        if q.startswith("is this a "):
            assert a == ("yes" if q == f"is this a {m} image?" else "no")
        if q == "which organ is shown in this image?":
            assert a == ORGANS[m]
    kinds = {q.split()[0] + " " + q.split()[1] for q in pool.questions}
    assert len(kinds) >= 6  # several templates are drawn


def fake_lesion_slices(n, inst, *, image_size, g):
    """Image j has value j / 100; slice j has no lesion (j % 3 == 0), one on the image's
    left (1) or on its right (2)."""
    x = torch.arange(n).float().view(n, 1, 1, 1).expand(n, 1, image_size, image_size) / 100
    mask = torch.zeros(n, 1, image_size, image_size)
    mask[1::3, :, 10:14, 2:6] = 1
    mask[2::3, :, 10:14, image_size - 6:image_size - 2] = 1
    return x.clone(), mask


def fake_make_dataset(n, modality, *, image_size, labels, seed):
    """The structure's class label k rendered as the uniform value k / 10."""
    return labels.float().view(n, 1, 1, 1).expand(n, 3, image_size, image_size) / 10, labels


def test_templates_answer_the_generators_facts(monkeypatch):
    """With generators whose images show their facts, every answer matches them."""
    monkeypatch.setattr(vqa.lesions, "lesion_slices", fake_lesion_slices)
    monkeypatch.setattr(vqa.synthetic, "make_dataset", fake_make_dataset)
    p = synthetic_vqa(400, ("mri", "ct"), image_size=S, seed=0)
    seen = set()
    for q, a, m, img in zip(p.questions, p.answers, p.modality, p.image.tolist()):
        value = p.images[img, 0, 0, 0].item()
        if m == "mri":
            j = round(value * 100)
            lesion, side = j % 3 != 0, {1: "left", 2: "right"}.get(j % 3)
            expected = {"is there a lesion in this image?": "yes" if lesion else "no",
                        "where is the lesion?": side,
                        "how many lesions are there?": "1" if lesion else "0"}
        else:
            shape = SHAPES[round(value * 10)]
            expected = {"what shape is the structure?": shape,
                        "how many structures are there?": "2" if shape == "two disks" else "1"}
            if q.startswith("is the structure a "):
                expected[q] = "yes" if q == f"is the structure a {shape}?" else "no"
        if q in expected:
            assert a == expected[q], (q, a, value)
            seen.add((m, q.split()[0], a))
    assert {("mri", "where", "left"), ("mri", "where", "right"), ("mri", "is", "no"), ("ct", "how", "2"),
            ("ct", "is", "yes"), ("ct", "is", "no"), ("ct", "what", "two disks")} <= seen
    assert not any(q == "where is the lesion?" and a is None for q, a in zip(p.questions, p.answers))


def test_synthetic_bad_arguments():
    for kwargs in (dict(n=0), dict(modalities=("pet",)), dict(image_size=16)):
        args = {"n": 4, "modalities": MODALITIES, "image_size": S, "seed": 0, **kwargs}
        n, modalities = args.pop("n"), args.pop("modalities")
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            synthetic_vqa(n, modalities, **args)


# -- partitions --------------------------------------------------------------------
def toy_pool(n_images=24, per_image=2, modalities=("ct", "mri", "xray")):
    """per_image questions per image (the first closed, then open); answers a0..a5."""
    rows = [(img, j) for img in range(n_images) for j in range(per_image)]
    return VQAPool(torch.zeros(n_images, 3, 2, 2), [f"img{i}" for i in range(n_images)],
                   torch.tensor([r[0] for r in rows]), [f"q{j}" for _, j in rows],
                   [f"a{(img * 7 + j) % 6}" for img, j in rows], torch.tensor([j == 0 for _, j in rows]),
                   [modalities[img % len(modalities)] for img, _ in rows],
                   ["slake" if img < n_images // 2 else "vqa-rad" for img, _ in rows])


def images_of(p, rows):
    return set(p.image[rows].tolist())


@pytest.mark.parametrize("scenario", vqa.SCENARIOS)
def test_partitions_are_disjoint_and_split_by_image(scenario):
    p = toy_pool()
    clients = partition(p, 3, scenario, seed=0)
    assert partition(p, 3, scenario, seed=0) == clients
    seen = []
    for name, train, test in clients:
        assert train and test and not images_of(p, train) & images_of(p, test)  # an image on one side only
        rows = set(train) | set(test)
        assert rows == {r for r in range(len(p)) if p.image[r].item() in images_of(p, train) | images_of(p, test)}
        seen += train + test
    assert sorted(seen) == list(range(len(p)))  # every question in exactly one client
    if scenario in ("modality", "dataset"):
        key = p.modality if scenario == "modality" else p.dataset
        for name, train, test in clients:
            assert {key[r] for r in train + test} == {re.sub(r"-\d+$", "", name)}  # sharers: group-i


def test_groups_shared_by_several_clients_are_dealt():
    p = toy_pool(n_images=40)
    clients = partition(p, 4, "dataset", seed=0)
    assert [c[0] for c in clients] == ["slake-0", "vqa-rad-0", "slake-1", "vqa-rad-1"]
    assert not images_of(p, clients[0][1] + clients[0][2]) & images_of(p, clients[2][1] + clients[2][2])


def test_noniid_skews_the_answers():
    p = toy_pool(n_images=90, per_image=1)
    iid, skew = (partition(p, 3, s, seed=0) for s in ("iid", "noniid"))

    def spread(clients):  # mean total-variation distance of client answer histograms from the pool's
        pool_hist = np.bincount([int(a[1]) for a in p.answers], minlength=6) / len(p)
        out = []
        for _, tr, te in clients:
            h = np.bincount([int(p.answers[r][1]) for r in tr + te], minlength=6)
            out.append(0.5 * np.abs(h / h.sum() - pool_hist).sum())
        return np.mean(out)
    assert spread(skew) > 2 * spread(iid)


def test_test_split_is_stratified_by_answer_type():
    p, clients = vqa_federation("synthetic", None, "iid", 3, samples_per_client=12, image_size=S, seed=0)
    for _, train, test in clients:
        assert set(p.closed[test].tolist()) == {True, False}


@pytest.mark.parametrize("n_clients", [3, 5])
@pytest.mark.parametrize("scenario", ["modality", "dataset"])
def test_synthetic_modality_and_dataset_clients(scenario, n_clients):
    """Client k holds the k-th group (sorted, cycling) and exactly the questions made for
    it, also when several clients share a group."""
    groups = sorted(MODALITIES if scenario == "modality" else vqa.SYNTHETIC_DATASETS)
    p, clients = vqa_federation("synthetic", None, scenario, n_clients, samples_per_client=10, image_size=S, seed=0)
    key = p.modality if scenario == "modality" else p.dataset
    for k, (name, train, test) in enumerate(clients):
        assert len(train) + len(test) == 10, name
        assert {key[r] for r in train + test} == {groups[k % len(groups)]} and name.startswith(groups[k % len(groups)])


def test_fewer_clients_than_groups_is_refused():
    with pytest.raises(ValueError, match="clients: the data has 2 groups .* got 1 clients"):
        partition(toy_pool(), 1, "dataset", seed=0)


def test_empty_client_partition_is_refused():
    with pytest.raises(ValueError, match="client 'mri-0': empty test partition"):
        partition(toy_pool(n_images=7), 6, "modality", seed=0)


# -- SLAKE and VQA-RAD ---------------------------------------------------------------
def write_image(path, k, size=(20, 24), fmt="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((*size, 3), (20 * k, 100, 200), np.uint8)).save(path, fmt)


def slake_item(k, question="Is this an MRI?", answer="Yes", answer_type="CLOSED", modality="MRI", lang="en"):
    return {"img_name": f"xmlab{k}/source.jpg", "question": question, "answer": answer, "answer_type": answer_type,
            "modality": modality, "q_lang": lang, "qid": k}


def write_slake(root, items, images=(0, 1, 2)):
    for k in images:
        write_image(os.path.join(root, "imgs", f"xmlab{k}", "source.jpg"), k)
    for name, part in items.items():
        with open(os.path.join(root, name), "w") as fh:
            json.dump(part, fh)


def slake_tree(root):
    write_slake(root, {"train.json": [slake_item(0), slake_item(1, "Which organ?", "Lung", "OPEN", "CT"),
                                      slake_item(1, "这是什么?", "肺", "OPEN", "CT", lang="zh")],
                       "test.json": [slake_item(2, "Where is the lesion?", " Left Lung ", "OPEN", "X-Ray")]})


def red_index(p, row):
    return round(p.images[p.image[row], 0].mean().item() * 255 / 20)


def test_slake_reads_english_questions_with_their_images(tmp_path):
    slake_tree(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 questions not in English"):
        p = load_slake(str(tmp_path), 16)
    assert p.questions == ["Is this an MRI?", "Which organ?", "Where is the lesion?"]
    assert p.answers == ["yes", "lung", "left lung"]
    assert p.closed.tolist() == [True, False, False]
    assert p.modality == ["MRI", "CT", "X-Ray"] and p.dataset == ["slake"] * 3
    assert p.images.shape == (3, 3, 16, 16)
    assert [red_index(p, r) for r in range(3)] == [0, 1, 2]
    assert p.image_names[p.image[2]] == os.path.join(str(tmp_path), "imgs", "xmlab2", "source.jpg")


def write_vqa_rad(root, items, folder="VQA_RAD Image Folder", images=(0, 1)):
    for k in images:
        write_image(os.path.join(root, folder, f"synpic{k}.jpg"), k)
    with open(os.path.join(root, "VQA_RAD Dataset Public.json"), "w") as fh:
        json.dump(items, fh)


def rad_item(k, question="is there a fracture?", answer="no", answer_type="CLOSED"):
    return {"image_name": f"synpic{k}.jpg", "question": question, "answer": answer, "answer_type": answer_type,
            "image_organ": "CHEST"}


def test_vqa_rad_reads_questions_with_their_images(tmp_path):
    write_vqa_rad(tmp_path, [rad_item(1), rad_item(0, "how many ribs?", 12, "OPEN"), rad_item(1, "what organ?", "Lung",
                                                                                             "OPEN")])
    p = load_vqa_rad(str(tmp_path), 16)
    assert p.answers == ["no", "12", "lung"] and p.closed.tolist() == [True, False, False]
    assert [red_index(p, r) for r in range(3)] == [1, 0, 1] and len(p.images) == 2  # one image read once
    assert p.dataset == ["vqa-rad"] * 3 and p.modality == [""] * 3
    with pytest.raises(ValueError, match="record no modality"):
        partition(p, 1, "modality", seed=0)


def test_two_datasets_one_client_each(tmp_path):
    slake_tree(tmp_path / "slake")
    write_vqa_rad(tmp_path / "vqa-rad", [rad_item(0), rad_item(1, "what organ?", "lung", "OPEN")])
    with pytest.warns(UserWarning):
        p, clients = vqa_federation("slake+vqa-rad", str(tmp_path), "dataset", 2, samples_per_client=None,
                                    image_size=16, seed=0)
    assert [c[0] for c in clients] == ["slake", "vqa-rad"]
    assert {p.dataset[r] for r in clients[1][1] + clients[1][2]} == {"vqa-rad"}
    assert len(p.images) == 5


def write_vqa_med(root, files, images=(0, 1), folder="Train_images"):
    """files: {relative path: [line, ...]}; images synpic<k>.jpg in root/folder."""
    for k in images:
        write_image(os.path.join(root, folder, f"synpic{k}.jpg"), k)
    for name, lines in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "w") as fh:
            fh.write("\n".join(lines) + "\n")


MED_2019 = {"QAPairsByCategory/C1_Modality_train.txt": ["synpic1|is this a ct scan?|Yes",
                                                        "synpic0|what modality is shown?|mr - flair"],
            "QAPairsByCategory/C3_Organ_train.txt": ["synpic0|what organ system is shown?|skull and contents"],
            # the all-category file repeats the category files' questions, with the category
            "All_QA_Pairs_train.txt": ["synpic1|modality|is this a ct scan?|Yes", "",
                                       "synpic0|organ|what organ system is shown?|skull and contents"]}


def test_vqa_med_reads_both_line_formats_once_with_their_images(tmp_path):
    write_vqa_med(tmp_path, MED_2019)
    with pytest.warns(UserWarning, match="read 2 repeated questions once"):
        p = load_vqa_med(str(tmp_path), 16)
    # files in sorted path order: All_QA_Pairs_train.txt, then QAPairsByCategory/C1..., C3...
    assert p.questions == ["is this a ct scan?", "what organ system is shown?", "what modality is shown?"]
    assert p.answers == ["yes", "skull and contents", "mr - flair"]
    assert p.closed.tolist() == [True, False, False]
    assert [red_index(p, r) for r in range(3)] == [1, 0, 0] and len(p.images) == 2
    assert p.modality == [""] * 3 and p.dataset == ["vqa-med"] * 3
    with pytest.raises(ValueError, match="record no modality"):
        partition(p, 1, "modality", seed=0)


def test_vqa_med_image_ids_resolve_to_the_nearest_folder(tmp_path):
    """The same image id in two years' folders: each QA file reads its own year's image."""
    write_vqa_med(tmp_path / "2019", {"qa.txt": ["synpic0|is this an mri?|no"]}, images=(0,))
    write_vqa_med(tmp_path / "2020", {"sub/qa.txt": ["synpic0|what plane?|axial"]}, images=())
    write_image(str(tmp_path / "2020" / "img" / "synpic0.jpg"), 5)
    p = load_vqa_med(str(tmp_path), 16)
    assert p.questions == ["is this an mri?", "what plane?"]
    assert [red_index(p, r) for r in range(2)] == [0, 5]


def med_tree(root, k):
    write_vqa_med(root, {"qa.txt": [f"synpic{k}|is there a mass?|no", f"synpic{k + 1}|which plane?|coronal"]},
                  images=(k, k + 1))


MED_COLOURS = {"vqa-med": {0, 1}, "vqa-med-2019": {2, 3}, "vqa-med-2020": {4, 5}}


@pytest.mark.parametrize("sources, names", [
    ("slake+vqa-rad+vqa-med", ["slake", "vqa-med", "vqa-rad"]),
    ("vqa-rad+vqa-med-2019+vqa-med-2020", ["vqa-med-2019", "vqa-med-2020", "vqa-rad"])])
def test_vqa_task_reads_vqa_med_one_dataset_per_client(tmp_path, sources, names):
    slake_tree(tmp_path / "slake")
    write_vqa_rad(tmp_path / "vqa-rad", [rad_item(0), rad_item(1, "what organ?", "lung", "OPEN")])
    for name, colours in MED_COLOURS.items():
        med_tree(tmp_path / name, min(colours))
    cfg = config_for("vqa", data=sources, data_root=str(tmp_path), scenario="dataset", clients=3, image_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SLAKE's skipped question, answers unseen in training
        clients = get_task("vqa", cfg).federation()
    assert [c.name for c in clients] == names
    for c in [c for c in clients if c.name in MED_COLOURS]:  # each VQA-Med client holds its own images
        reds = {round(c.train.images[i, 0].mean().item() * 255 / 20) for part in (c.train, c.test)
                for i in part.image.tolist()}
        assert reds == MED_COLOURS[c.name], c.name


def test_vqa_med_empty_client_partition_is_refused(tmp_path):
    med_tree(tmp_path, 0)
    with pytest.raises(ValueError, match="client 'client-0': empty test partition"):
        vqa_federation("vqa-med", str(tmp_path), "iid", 2, samples_per_client=None, image_size=16, seed=0)


# -- bad data ------------------------------------------------------------------------
def break_absent(root):
    write_slake(root, {"train.json": [slake_item(0), slake_item(3)]})
    return "xmlab3/source.jpg: image file is absent"


def break_truncated(root):
    write_slake(root, {"train.json": [slake_item(0), slake_item(1)]})
    path = os.path.join(root, "imgs", "xmlab1", "source.jpg")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    return "xmlab1/source.jpg: unreadable or truncated image"


def break_unreadable(root):
    write_slake(root, {"train.json": [slake_item(0), slake_item(2)]})
    open(os.path.join(root, "imgs", "xmlab2", "source.jpg"), "wb").write(b"not an image at all")
    return "xmlab2/source.jpg: unreadable or truncated image"


def break_missing_field(root):
    item = slake_item(1)
    del item["answer_type"]
    write_slake(root, {"train.json": [slake_item(0)], "test.json": [item]})
    return "test.json: question 0 lacks the field 'answer_type'"


def break_answer_type(root):
    write_slake(root, {"train.json": [slake_item(0), slake_item(1, answer_type="YESNO")]})
    return "train.json: question 1 has unknown answer_type 'YESNO'"


def break_not_a_list(root):
    write_slake(root, {"train.json": {"questions": [slake_item(0)]}})
    return "train.json: expected a JSON list"


def break_no_json(root):
    write_slake(root, {})
    return "no train.json, validate.json or test.json"


@pytest.mark.parametrize("damage", [break_absent, break_truncated, break_unreadable, break_missing_field,
                                    break_answer_type, break_not_a_list, break_no_json])
def test_bad_slake_data_is_refused_by_name(tmp_path, damage):
    message = damage(str(tmp_path))
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_slake(str(tmp_path), 16)


def test_bad_vqa_rad_data_is_refused_by_name(tmp_path):
    write_vqa_rad(tmp_path, [rad_item(0), rad_item(5)])
    with pytest.raises(ValueError, match=r"synpic5\.jpg: image file is absent"):
        load_vqa_rad(str(tmp_path), 16)
    write_vqa_rad(tmp_path, [rad_item(0), {"image_name": "synpic1.jpg", "question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="question 1 lacks the field 'answer_type'"):
        load_vqa_rad(str(tmp_path), 16)
    (tmp_path / "extra.json").write_text("[]")
    with pytest.raises(ValueError, match="exactly one .json"):
        load_vqa_rad(str(tmp_path), 16)


def med_absent(root):
    write_vqa_med(root, {"qa.txt": ["synpic0|q?|yes", "synpic7|q?|no"]})
    return "qa.txt:2: synpic7.jpg: image file is absent"


def med_truncated(root):
    write_vqa_med(root, {"qa.txt": ["synpic0|q?|yes", "synpic1|q?|no"]})
    path = os.path.join(root, "Train_images", "synpic1.jpg")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    return "synpic1.jpg: unreadable or truncated image"


def med_unreadable_image(root):
    write_vqa_med(root, {"qa.txt": ["synpic0|q?|yes"]})
    open(os.path.join(root, "Train_images", "synpic0.jpg"), "wb").write(b"not an image at all")
    return "synpic0.jpg: unreadable or truncated image"


def med_two_fields(root):
    write_vqa_med(root, {"qa.txt": ["synpic0|q?|yes", "synpic1|what is this?"]})
    return "qa.txt:2: expected image_id|question|answer or image_id|category|question|answer"


def med_five_fields(root):
    write_vqa_med(root, {"All_QA_Pairs_val.txt": ["synpic0|organ|q?|yes|extra"]})
    return "All_QA_Pairs_val.txt:1: expected image_id|question|answer"


def med_empty_answer(root):
    write_vqa_med(root, {"a.txt": ["synpic0|q?|yes"], "b.txt": ["", "synpic1|q?| "]})
    return "b.txt:2: expected image_id|question|answer"


def med_ambiguous(root):
    write_vqa_med(root, {"qa.txt": ["synpic0|q?|yes"]}, images=(0,), folder="a")
    write_vqa_med(root, {}, images=(0,), folder="b")
    return "qa.txt:1: synpic0.jpg is ambiguous"


def med_not_text(root):
    write_vqa_med(root, {"qa.txt": ["synpic0|q?|yes"]})
    open(os.path.join(root, "notes.txt"), "wb").write(b"\xff\xfe\x00binary")
    return "notes.txt: unreadable QA file"


def med_no_qa_files(root):
    write_vqa_med(root, {})
    return "no QA .txt files under"


def med_no_questions(root):
    write_vqa_med(root, {"qa.txt": ["", "  "]})
    return "no questions in"


@pytest.mark.parametrize("damage", [med_absent, med_truncated, med_unreadable_image, med_two_fields, med_five_fields,
                                    med_empty_answer, med_ambiguous, med_not_text, med_no_qa_files, med_no_questions])
def test_bad_vqa_med_data_is_refused_by_name(tmp_path, damage):
    message = damage(str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_vqa_med(str(tmp_path), 16)
