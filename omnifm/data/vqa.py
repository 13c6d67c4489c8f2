"""Medical VQA data: synthetic questions about the generators' own images, and the
SLAKE and VQA-RAD formats, partitioned into clients for the paper's three settings.

Everything lands in a `VQAPool`: the images (in memory, (m, 3, S, S) float32 in
[0, 1]) and one row per question (its image, question, lowercase answer, whether it
is closed (yes/no) or open, the image's modality and the dataset it came from).

Synthetic (`synthetic_vqa`): one question per image, drawn from templates about what
the generator itself knows, so every answer is correct by construction:

    mri          brain slices of `omnifm.data.lesions` (organ "brain"): is there a
                 lesion (closed), where is it ("left"/"right": the image half holding
                 the lesion's centre; asked only when there is one), how many lesions
                 ("0"/"1": the generator draws at most one)
    ct, xray,    the structure images of `omnifm.data.synthetic`: what shape is the
    pathology,   structure (its 8 class names, open), is the structure a <shape>
    dermoscopy   (closed, true half the time), how many structures ("2" for two disks,
                 else "1")
    every image  what modality is this (open), is this a <modality> image (closed,
                 true half the time), which organ is shown (open)

The organ of a structure image is a name attached to its modality (ORGANS): the
generator renders one generic organ ellipse, so organ questions there are answerable
from the modality alone. Closed and open questions alternate (even rows closed).

Real formats (English questions only; other languages are skipped, counted and
reported in a warning):

    slake     <root>/imgs/<img_name> (img_name like "xmlab0/source.jpg") and any of
              <root>/train.json, validate.json, test.json: JSON lists of questions with
              img_name, question, answer, answer_type (OPEN/CLOSED), modality, q_lang
    vqa-rad   <root>/<one .json> (a list with image_name, question, answer,
              answer_type) and the images in <root>/VQA_RAD Image Folder or
              <root>/images; VQA-RAD records no modality (modality "")
    vqa-med   ImageCLEF VQA-Med 2019-2021: every .txt file under <root> (any depth) is
              a QA file, one "image_id|question|answer" per line (2020, 2021, 2019's
              QAPairsByCategory/C*_*.txt) or "image_id|category|question|answer" (2019's
              all-category files in some releases); the image <image_id>.jpg may lie
              anywhere under <root> (an id in several folders: the one nearest the QA
              file; two equally near are refused as ambiguous). Answers "yes"/"no"
              are closed, the rest open; no modality.
              A question repeated verbatim (2019 ships each in its category file and in
              All_QA_Pairs) is read once, the repeats counted in a warning. Sources
              vqa-med-2019 / -2020 / -2021 read the same way, each its own dataset (the
              paper's five-dataset setting: slake+vqa-rad+vqa-med-2019+...).

The official splits are pooled and re-split per client (as the MedMNIST loader does):
scenarios `iid` (questions dealt at random, grouped by image), `noniid` (Dirichlet(0.5)
label skew over the answers), `modality` (client k holds modality k mod M; clients
sharing one deal its images) and `dataset` (the same by source dataset). Each client's
images are then split 80/20 into train and test, stratified by the answer type of an
image's first question (at least one test image for a client with two), so an image's
questions never sit on both sides.

Bad data raises ValueError naming the file and the problem before training: a question
whose image is absent, an unreadable or truncated image, a missing JSON field, an
unknown answer_type, a JSON file that is not a list, a VQA-Med line that is not 3 or 4
'|'-separated non-empty fields (named file:line), an empty client partition.
"""
import json
import functools
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import lesions, synthetic
from ..fl.partition import dirichlet_label_skew

SCENARIOS = ("iid", "noniid", "modality", "dataset")
VQA_MED = ("vqa-med", "vqa-med-2019", "vqa-med-2020", "vqa-med-2021")  # the years: one dataset each
SOURCES = ("synthetic", "slake", "vqa-rad", *VQA_MED)
MODALITIES = synthetic.MODALITIES  # mri is drawn by the lesion generator, the rest by the structure one
ORGANS = {"mri": "brain", "ct": "abdomen", "xray": "chest", "pathology": "breast tissue", "dermoscopy": "skin"}
SHAPES = tuple(name.replace("_", " ") for name in synthetic.CLASS_NAMES)
# the synthetic scenario `dataset`: three "datasets" with disjoint modalities
SYNTHETIC_DATASETS = {"brain-mri": ("mri",), "radiology": ("ct", "xray"), "optical": ("pathology", "dermoscopy")}
NONIID_GAMMA = 0.5


@dataclass
class VQAPool:
    """Images and questions. images (m, 3, S, S) float32 in [0, 1], image_names (m,)
    (a path, or a synthetic id) for messages; per question (n rows): image (n,) int64
    index into images, questions, answers (lowercase), closed (n,) bool, modality and
    dataset names."""
    images: torch.Tensor
    image_names: list
    image: torch.Tensor
    questions: list
    answers: list
    closed: torch.Tensor
    modality: list
    dataset: list

    def __len__(self):
        return len(self.questions)


# -- synthetic -----------------------------------------------------------------
def _mri_facts(n, image_size, g):
    """Brain slices (n, 3, S, S) and their facts: lesion present, lesion side."""
    x, mask = lesions.lesion_slices(n, lesions.draw_institution(g), image_size=image_size, g=g)
    has = mask.flatten(1).amax(1) > 0
    cols = torch.arange(image_size, dtype=torch.float32)
    centre = (mask[:, 0].sum(1) * cols).sum(1) / mask[:, 0].sum((1, 2)).clamp(min=1)
    side = ["left" if c < (image_size - 1) / 2 else "right" for c in centre.tolist()]
    return x.repeat(1, 3, 1, 1), has.tolist(), side


def _ask(kind, facts, rng):
    """(question, answer, closed) of one template kind for one image's facts."""
    modality = facts["modality"]
    if kind == "modality":
        if rng.random() < 0.5:
            return f"is this a {modality} image?", "yes", True
        other = MODALITIES[(MODALITIES.index(modality) + 1 + rng.integers(len(MODALITIES) - 1)) % len(MODALITIES)]
        return f"is this a {other} image?", "no", True
    if kind == "modality_open":
        return "what modality is this image?", modality, False
    if kind == "organ":
        return "which organ is shown in this image?", ORGANS[modality], False
    if modality == "mri":
        if kind == "presence":
            return "is there a lesion in this image?", "yes" if facts["lesion"] else "no", True
        if kind == "location":
            if facts["lesion"]:
                return "where is the lesion?", facts["side"], False
            return "how many lesions are there?", "0", False
        return "how many lesions are there?", "1" if facts["lesion"] else "0", False
    shape = facts["shape"]
    if kind == "presence":
        asked = shape if rng.random() < 0.5 else SHAPES[(SHAPES.index(shape) + 1 + rng.integers(len(SHAPES) - 1))
                                                         % len(SHAPES)]
        return f"is the structure a {asked}?", "yes" if asked == shape else "no", True
    if kind == "location":
        return "what shape is the structure?", shape, False
    return "how many structures are there?", "2" if shape == "two disks" else "1", False


CLOSED_KINDS = ("modality", "presence")
OPEN_KINDS = ("modality_open", "organ", "location", "count")


def synthetic_vqa(n, modalities, *, image_size, seed, dataset="synthetic"):
    """A VQAPool of n questions, one per image, over the given modalities: rows 2j and
    2j + 1 show modalities[j % len], the first asked a closed question, the second an
    open one (see module doc)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: need an int >= 1, got {n!r}")
    unknown = [m for m in modalities if m not in MODALITIES]
    if not modalities or unknown:
        raise ValueError(f"modalities: expected a non-empty subset of {MODALITIES}, got {modalities!r}")
    if not isinstance(image_size, int) or image_size < lesions.MIN_IMAGE_SIZE:
        raise ValueError(f"image_size: need an int >= {lesions.MIN_IMAGE_SIZE}, got {image_size!r}")
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows = [modalities[i // 2 % len(modalities)] for i in range(n)]
    images = torch.empty(n, 3, image_size, image_size)
    facts = [None] * n
    for modality in dict.fromkeys(rows):
        idx = [i for i, m in enumerate(rows) if m == modality]
        if modality == "mri":
            x, has, side = _mri_facts(len(idx), image_size, g)
            row_facts = [{"lesion": h, "side": s} for h, s in zip(has, side)]
        else:
            labels = torch.randint(0, len(SHAPES), (len(idx),), generator=g)
            x, _ = synthetic.make_dataset(len(idx), modality, image_size=image_size, labels=labels,
                                          seed=int(torch.randint(0, 2 ** 31, (1,), generator=g)))
            row_facts = [{"shape": SHAPES[k]} for k in labels.tolist()]
        images[idx] = x
        for i, f in zip(idx, row_facts):
            facts[i] = {**f, "modality": modality}
    questions, answers, closed = [], [], []
    for i in range(n):
        kinds = CLOSED_KINDS if i % 2 == 0 else OPEN_KINDS
        q, a, c = _ask(kinds[rng.integers(len(kinds))], facts[i], rng)
        questions.append(q), answers.append(a), closed.append(c)
    return VQAPool(images, [f"{dataset}-{i}" for i in range(n)], torch.arange(n), questions, answers,
                   torch.tensor(closed), rows, [dataset] * n)


# -- real formats -----------------------------------------------------------------
def read_image(path, image_size):
    """(3, S, S) float32 in [0, 1]: the image at path, RGB, resized (bilinear)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: image file is absent")
    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte: a truncated file fails here
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    except Exception as e:  # PIL raises OSError, SyntaxError or ValueError for broken files
        raise ValueError(f"{path}: unreadable or truncated image ({e})") from e
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(0, 1)


def _read_json(path):
    try:
        with open(path) as fh:
            items = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(items).__name__}")
    return items


def _pool(rows, image_size, dataset):
    """VQAPool of rows (image path, question, answer, answer_type, modality, source
    file, question index); answer_type must be OPEN or CLOSED."""
    paths = list(dict.fromkeys(r[0] for r in rows))
    where = {p: k for k, p in enumerate(paths)}
    closed = []
    for _, _, _, answer_type, _, json_path, i in rows:
        kind = str(answer_type).strip().upper()
        if kind not in ("OPEN", "CLOSED"):
            raise ValueError(f"{json_path}: question {i} has unknown answer_type {answer_type!r} "
                             "(expected OPEN or CLOSED)")
        closed.append(kind == "CLOSED")
    images = torch.stack([read_image(p, image_size) for p in paths])
    return VQAPool(images, paths, torch.tensor([where[r[0]] for r in rows], dtype=torch.int64),
                   [str(r[1]).strip() for r in rows], [str(r[2]).strip().lower() for r in rows],
                   torch.tensor(closed), [str(r[4]).strip() for r in rows], [dataset] * len(rows))


def _field(item, key, path, i):
    if not isinstance(item, dict) or key not in item:
        raise ValueError(f"{path}: question {i} lacks the field {key!r}")
    return item[key]


def load_slake(root, image_size):
    """VQAPool of the English questions of a SLAKE folder (see module doc)."""
    files = [os.path.join(root, f) for f in ("train.json", "validate.json", "test.json")
             if os.path.isfile(os.path.join(root, f))]
    if not files:
        raise ValueError(f"data_root: no train.json, validate.json or test.json in {root} (the SLAKE layout)")
    rows, skipped = [], 0
    for path in files:
        for i, item in enumerate(_read_json(path)):
            fields = [_field(item, k, path, i) for k in
                      ("img_name", "question", "answer", "answer_type", "modality", "q_lang")]
            if fields[5] != "en":
                skipped += 1
                continue
            rows.append((os.path.join(root, "imgs", fields[0]), *fields[1:5], path, i))
    if skipped:
        warnings.warn(f"SLAKE: skipped {skipped} questions not in English under {root}", stacklevel=2)
    if not rows:
        raise ValueError(f"data_root: no English questions in {files}")
    return _pool(rows, image_size, "slake")


def load_vqa_rad(root, image_size):
    """VQAPool of a VQA-RAD folder (see module doc)."""
    jsons = sorted(f for f in os.listdir(root) if f.endswith(".json")) if os.path.isdir(root) else []
    if len(jsons) != 1:
        raise ValueError(f"data_root: expected exactly one .json file in {root} (VQA-RAD), found {jsons}")
    folder = next((os.path.join(root, d) for d in ("VQA_RAD Image Folder", "images")
                   if os.path.isdir(os.path.join(root, d))), None)
    if folder is None:
        raise ValueError(f"data_root: no image folder 'VQA_RAD Image Folder' or 'images' in {root}")
    path = os.path.join(root, jsons[0])
    rows = []
    for i, item in enumerate(_read_json(path)):
        name, question, answer, answer_type = (_field(item, k, path, i) for k in
                                               ("image_name", "question", "answer", "answer_type"))
        rows.append((os.path.join(folder, name), question, answer, answer_type, "", path, i))
    if not rows:
        raise ValueError(f"{path}: no questions")
    return _pool(rows, image_size, "vqa-rad")


def _nearest(candidates, qa_path):
    """The candidate path sharing the longest folder prefix with qa_path, or None when
    several tie."""
    depth = {c: len(os.path.commonpath([c, qa_path])) for c in candidates}
    best = [c for c in candidates if depth[c] == max(depth.values())]
    return best[0] if len(best) == 1 else None


def load_vqa_med(root, image_size, dataset="vqa-med"):
    """VQAPool of an ImageCLEF VQA-Med folder (see module doc), named `dataset`."""
    qa_files, images = [], {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext == ".txt":
                qa_files.append(os.path.join(folder, f))
            elif ext == ".jpg":
                images.setdefault(stem, []).append(os.path.join(folder, f))
    if not qa_files:
        raise ValueError(f"data_root: no QA .txt files under {root} (the VQA-Med layout)")
    rows, seen, repeats = [], set(), 0
    for path in qa_files:
        try:
            with open(path, encoding="utf-8-sig") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable QA file ({e})") from e
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = [f.strip() for f in line.split("|")]
            if len(fields) not in (3, 4) or not all(fields):
                raise ValueError(f"{path}:{number}: expected image_id|question|answer or "
                                 f"image_id|category|question|answer, got {line!r}")
            image_id, question, answer = fields[0], fields[-2], fields[-1].lower()
            if image_id not in images:
                raise ValueError(f"{path}:{number}: {image_id}.jpg: image file is absent under {root}")
            image = _nearest(images[image_id], path)
            if image is None:
                raise ValueError(f"{path}:{number}: {image_id}.jpg is ambiguous: {images[image_id]}")
            if (image, question, answer) in seen:
                repeats += 1
                continue
            seen.add((image, question, answer))
            rows.append((image, question, answer, "CLOSED" if answer in ("yes", "no") else "OPEN", "", path, number))
    if repeats:
        warnings.warn(f"VQA-Med: read {repeats} repeated questions once under {root}", stacklevel=2)
    if not rows:
        raise ValueError(f"data_root: no questions in {qa_files}")
    return _pool(rows, image_size, dataset)


LOADERS = {"slake": load_slake, "vqa-rad": load_vqa_rad,
           **{name: functools.partial(load_vqa_med, dataset=name) for name in VQA_MED}}


def load_pool(source, root, image_size):
    """The VQAPool of one real source, or of several ("slake+vqa-rad+vqa-med": each
    read from root/<source>), concatenated."""
    names = source.split("+")
    unknown = [s for s in names if s not in LOADERS]
    if unknown:
        raise ValueError(f"data: expected {' or '.join(LOADERS)} (or several joined by '+'), got {source!r}")
    if not root:
        raise ValueError(f"data_root: required with data={source!r}")
    pools = [LOADERS[s](root if len(names) == 1 else os.path.join(root, s), image_size) for s in names]
    return concat(pools)


def concat(pools):
    offset = np.cumsum([0] + [len(p.images) for p in pools])
    return VQAPool(torch.cat([p.images for p in pools]), sum((p.image_names for p in pools), []),
                   torch.cat([p.image + o for p, o in zip(pools, offset)]), sum((p.questions for p in pools), []),
                   sum((p.answers for p in pools), []), torch.cat([p.closed for p in pools]),
                   sum((p.modality for p in pools), []), sum((p.dataset for p in pools), []))


# -- partitions ------------------------------------------------------------------
def _by_group(pool, key, n_clients):
    """[(name, image indices)]: client k holds group k mod G (the sorted values of key
    per image); clients sharing a group deal its images in turn."""
    per_image = {}
    for img, value in zip(pool.image.tolist(), key):
        per_image.setdefault(img, value)
    groups = sorted(set(per_image.values()))
    if "" in groups:
        raise ValueError("scenario: some questions record no modality (VQA-RAD and VQA-Med have none); "
                         "use --scenario iid, noniid or dataset")
    if n_clients < len(groups):  # a group without a client would be dropped without a word
        raise ValueError(f"clients: the data has {len(groups)} groups ({', '.join(map(str, groups))}), one per "
                         f"client at least; got {n_clients} clients")
    clients = []
    for k in range(n_clients):
        group = groups[k % len(groups)]
        sharers = list(range(k % len(groups), n_clients, len(groups)))
        images = [i for i, v in sorted(per_image.items()) if v == group]
        name = group if len(sharers) == 1 else f"{group}-{sharers.index(k)}"
        clients.append((name, images[sharers.index(k)::len(sharers)]))
    return clients


def partition(pool, n_clients, scenario, *, seed):
    """[(client name, train question indices, test question indices)] (see module doc)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario: expected one of {SCENARIOS}, got {scenario!r}")
    if not isinstance(n_clients, int) or n_clients < 1:
        raise ValueError(f"n_clients: need an int >= 1, got {n_clients!r}")
    rng = np.random.default_rng(seed)
    n_images = len(pool.images)
    if scenario == "modality":
        clients = _by_group(pool, pool.modality, n_clients)
    elif scenario == "dataset":
        clients = _by_group(pool, pool.dataset, n_clients)
    elif scenario == "iid":
        order = rng.permutation(n_images)
        clients = [(f"client-{k}", sorted(order[k::n_clients].tolist())) for k in range(n_clients)]
    else:  # label skew over each image's first answer, then the image's questions follow it
        first = np.full(n_images, -1)
        for row, img in reversed(list(enumerate(pool.image.tolist()))):
            first[img] = row
        labels = np.unique([pool.answers[r] for r in first], return_inverse=True)[1]
        if n_images < 2 * n_clients:
            raise ValueError(f"n_clients: {n_images} images cannot give {n_clients} clients a train and a test image")
        parts = dirichlet_label_skew(labels, n_clients, NONIID_GAMMA, seed=seed, min_size=2)
        clients = [(f"client-{k}", p.tolist()) for k, p in enumerate(parts)]
    rows_of = [[] for _ in range(n_images)]
    for row, img in enumerate(pool.image.tolist()):
        rows_of[img].append(row)
    out = []
    for name, images in clients:
        strata = {}
        for img in images:
            strata.setdefault(bool(pool.closed[rows_of[img][0]]), []).append(img)
        test = []
        for members in strata.values():
            test += [members[j] for j in rng.permutation(len(members))[:round(0.2 * len(members))]]
        if not test and len(images) >= 2:  # strata too small to give one each: one test image anyway
            test = [images[rng.integers(len(images))]]
        test = set(test)
        train_rows = sorted(r for img in images if img not in test for r in rows_of[img])
        test_rows = sorted(r for img in test for r in rows_of[img])
        for split, rows in (("training", train_rows), ("test", test_rows)):
            if not rows:
                raise ValueError(f"client {name!r}: empty {split} partition ({len(images)} images; "
                                 f"{n_clients} clients, scenario {scenario!r})")
        out.append((name, train_rows, test_rows))
    return out


def vqa_federation(data, root, scenario, n_clients, *, samples_per_client, image_size, seed):
    """(pool, [(client name, train rows, test rows)]) for a data source and scenario.

    Synthetic: samples_per_client questions per client, generated per client under
    `modality` (client k: the (k mod 5)-th modality, sorted) and `dataset` (the (k mod 3)-th
    of SYNTHETIC_DATASETS, sorted), as one pool partitioned otherwise. Real: samples_per_client caps each client's training
    questions and a quarter as many test questions (at least 1), drawn with the seed.
    """
    if data == "synthetic":
        if scenario in ("modality", "dataset"):
            groups = ({m: (m,) for m in MODALITIES} if scenario == "modality" else SYNTHETIC_DATASETS)
            names = sorted(groups)  # the order partition() deals groups to clients in
            pools = [synthetic_vqa(samples_per_client, groups[names[k % len(names)]], image_size=image_size,
                                   seed=seed * 1009 + k, dataset=names[k % len(names)]) for k in range(n_clients)]
            pool = concat(pools)
            return pool, partition(pool, n_clients, scenario, seed=seed)
        pool = synthetic_vqa(n_clients * samples_per_client, MODALITIES, image_size=image_size, seed=seed)
        return pool, partition(pool, n_clients, scenario, seed=seed)
    pool = load_pool(data, root, image_size)
    clients = partition(pool, n_clients, scenario, seed=seed)
    if samples_per_client:
        rng = np.random.default_rng(seed)
        cap = lambda rows, n: sorted(rng.choice(rows, n, replace=False).tolist()) if len(rows) > n else rows
        clients = [(name, cap(tr, samples_per_client), cap(te, max(1, samples_per_client // 4)))
                   for name, tr, te in clients]
    return pool, clients
