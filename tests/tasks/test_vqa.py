"""The VQA task: tuning regimes (what trains, what is shared, what a round sends),
the from_pretrained round trip, and the metric wiring on a hand-checked case."""
import math

import pytest
import torch
from torch import nn

from omnifm.fl import Simulation
from omnifm.fl.client import in_order
from omnifm.tasks import config_for, get_task
from omnifm.tasks.vqa import TUNINGS, VQADataset, encoder_layers, save_pretrained

# 12 questions per client leave some test answers unseen in training: expected here
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:vqa.*never seen")]

TINY = dict(clients=3, samples_per_client=12, width=0.125, local_epochs=1, batch_size=4, rounds=1)
ADAPTER = dict(topk=2, gskr=True, eca=True, psp=True)


def cfg(**kw):
    return config_for("vqa", **{**TINY, **kw})


def task_and_model(omnifm=False, **kw):
    task = get_task("vqa", cfg(**kw))
    parts = task.federation()
    torch.manual_seed(0)
    return task, parts, task.build_model(omnifm=omnifm, adapter_kwargs=ADAPTER)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model):
    """State-dict names of trainable parameters."""
    return {n for n, t in model.state_dict(keep_vars=True).items() if isinstance(t, nn.Parameter) and t.requires_grad}


def encoder_params(model, keep=lambda name, module: True):
    """Names of the encoders' parameters (as the model names them) whose module passes keep."""
    out = set()
    for prefix, enc in (("backbone.vision", model.backbone.vision), ("backbone.text", model.backbone.text)):
        for mname, module in enc.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                if keep(f"{mname}.{pname}", module):
                    out.add(f"{prefix}.{mname}.{pname}")
    return out


@pytest.mark.parametrize("omnifm", [False, True])
@pytest.mark.parametrize("regime", TUNINGS)
def test_each_regime_trains_its_parameters(regime, omnifm):
    _, _, model = task_and_model(omnifm, tuning=regime)
    names = {n for n, _ in model.named_parameters()}
    encoders = encoder_params(model)
    always = names - encoders  # fusion, head, bottlenecks, OmniFM modules
    assert any(n.startswith("backbone.fusion.") for n in always) and any(n.startswith("backbone.head.") for n in always)
    if omnifm:
        assert {"suffix", "proj.weight", "tokenizer.spectral.w1"} <= always
    expected = {
        "full": encoders,
        "lora": encoder_params(model, lambda n, m: ".lora_A." in n or ".lora_B." in n),
        "adapter": set(),
        "layernorm": encoder_params(model, lambda n, m: isinstance(m, nn.LayerNorm)),
        "bias": encoder_params(model, lambda n, m: n.endswith(".bias")),
    }[regime]
    assert trainable(model) == always | expected
    if regime == "lora":  # r = 8 on q and v of every block of both encoders (2 blocks each)
        assert len(expected) == 2 * 2 * 2 * 2
        assert all(".q_proj." in n or ".v_proj." in n for n in expected)
        a = dict(model.named_parameters())["backbone.vision.encoder.layers.0.self_attn.q_proj.lora_A.default.weight"]
        assert a.shape[0] == 8
    if regime == "adapter":  # one bottleneck after each of the 2 + 2 blocks, all trainable
        bottlenecks = {n for n in names if n.startswith("backbone.bottlenecks.")}
        assert len(model.backbone.bottlenecks) == 4 and len(bottlenecks) == 4 * 4 and bottlenecks <= trainable(model)
    if regime in ("layernorm", "bias"):
        assert expected and expected < encoders


@pytest.mark.parametrize("regime", ["lora", "adapter"])
def test_added_layers_start_as_the_plain_model_and_take_part(regime):
    """LoRA (B = 0) and bottlenecks (up = 0) leave the initial outputs unchanged; once
    their weights move, the outputs move (the layers are really in the forward)."""
    _, parts, full = task_and_model(tuning="full")
    _, _, tuned = task_and_model(tuning=regime)
    x, _ = next(in_order(parts[0].test, 8))
    full.eval(), tuned.eval()
    with torch.no_grad():
        assert torch.allclose(full(x), tuned(x), atol=1e-6)
        for n, p in tuned.named_parameters():
            if ".lora_B." in n or ".up." in n:
                p.add_(0.1)
        assert not torch.allclose(full(x), tuned(x), atol=1e-3)


def one_round(strategy="fedavg", **kw):
    sim = Simulation(cfg(strategy=strategy, **kw), progress=False)
    before = {k: v.clone() for k, v in sim.model.state_dict().items()}
    sim.run()
    return sim, before


@pytest.mark.parametrize("strategy", ["fedavg", "omnifm"])
def test_lora_trains_and_shares_only_lora_weights(strategy):
    sim, before = one_round(strategy, tuning="lora")
    train = trainable_state(sim.model)
    private = {n for n in train if n.startswith("backbone.head.") or n == "suffix"} if strategy == "omnifm" else set()
    assert set(sim.global_state) == train - private
    lora = {n for n in sim.global_state if ".lora_" in n}
    assert lora and not {n for n in sim.global_state if n.startswith(("backbone.vision", "backbone.text"))} - lora
    assert any(sim.global_state[n].abs().sum() > 0 for n in lora if ".lora_B." in n)  # LoRA trained (B from 0)
    frozen = {n for n, p in sim.model.named_parameters() if not p.requires_grad}
    assert frozen and frozen.isdisjoint(sim.global_state)
    for c in sim.clients:  # frozen weights: bitwise the initial ones, on every client
        for n in frozen:
            assert torch.equal(c.local_state[n], before[n]), n


def test_fedrep_leaves_frozen_parameters_frozen():
    sim, before = one_round("fedrep", tuning="bias")
    frozen = {n for n, p in sim.model.named_parameters() if not p.requires_grad}
    assert frozen == set(sim.strategy.frozen) and frozen
    for n in frozen:
        assert torch.equal(sim.clients[0].local_state[n], before[n]), n


def test_bytes_sent_are_the_trainable_parameters():
    sent = {}
    for regime in ("full", "lora", "bias"):
        sim, _ = one_round(tuning=regime)
        row = sim.history[-1]
        n_trainable = sum(sim.model.state_dict()[n].numel() for n in trainable_state(sim.model))
        assert row["bytes_up"] == row["bytes_down"] == 3 * 4 * n_trainable  # 3 clients, float32
        sent[regime] = row["bytes_up"]
    assert sent["lora"] < 0.5 * sent["full"] and sent["bias"] < 0.5 * sent["full"]


def test_from_pretrained_round_trip(tmp_path):
    task, parts, model = task_and_model()
    save_pretrained(model, task.tokenizer, str(tmp_path))
    loaded_task, loaded_parts, loaded = task_and_model(vqa_model=str(tmp_path))
    assert loaded_task.tokenizer.get_vocab() == task.tokenizer.get_vocab()
    assert torch.equal(loaded_parts[0].test.input_ids, parts[0].test.input_ids)
    before = {n: p for n, p in model.named_parameters() if n.startswith(("backbone.vision", "backbone.text"))}
    after = {n: p for n, p in loaded.named_parameters() if n.startswith(("backbone.vision", "backbone.text"))}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    for name in ("fusion", "head"):  # new (random) layers: take the original's to compare outputs
        getattr(loaded.backbone, name).load_state_dict(getattr(model.backbone, name).state_dict())
    x, _ = next(in_order(parts[0].test, 8))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_omnifm_feeds_prefix_tokens_suffix_to_the_fusion_block_not_to_the_encoder():
    task, parts, model = task_and_model(omnifm=True)
    model.set_bank(torch.nn.functional.normalize(torch.randn(5, task.adapter_dim), dim=1))
    seen = {}
    model.backbone.fusion.register_forward_pre_hook(lambda m, args: seen.update(fusion=args[0].shape))
    first = encoder_layers(model.backbone.vision)[0]
    first.register_forward_pre_hook(lambda m, args: seen.update(encoder=args[0].shape))
    x, _ = next(in_order(parts[0].train, 4))
    model.eval()
    with torch.no_grad():
        model(x)
    L = (32 // 8) ** 2 + 1  # patches and the class token
    assert seen["encoder"][1] == L and seen["fusion"][1] == 2 * L + model.suffix.shape[0]


def test_lora_is_merged_into_the_saved_encoders(tmp_path):
    task, parts, model = task_and_model(tuning="lora")
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero: give it a value so the merge matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    save_pretrained(model, task.tokenizer, str(tmp_path))
    _, _, loaded = task_and_model(vqa_model=str(tmp_path))
    x, _ = next(in_order(parts[0].test, 8))
    pixels = torch.rand(4, 3, 32, 32)
    for a, b, inputs in ((model.backbone.vision, loaded.backbone.vision, dict(pixel_values=pixels)),
                         (model.backbone.text, loaded.backbone.text,
                          dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"]))):
        a.eval(), b.eval()
        with torch.no_grad():
            torch.testing.assert_close(b(**inputs).last_hidden_state, a(**inputs).last_hidden_state,
                                       rtol=1e-4, atol=1e-5)


def test_adapter_regime_cannot_be_saved_as_clip(tmp_path):
    task, _, model = task_and_model(tuning="adapter")
    with pytest.raises(ValueError, match="bottleneck adapters are not part of a CLIP model"):
        save_pretrained(model, task.tokenizer, str(tmp_path))


def test_a_saved_model_missing_weights_is_refused_and_sets_the_image_size(tmp_path):
    from safetensors.torch import load_file, save_file

    task, _, model = task_and_model()
    save_pretrained(model, task.tokenizer, str(tmp_path))
    loaded_task, parts, _ = task_and_model(vqa_model=str(tmp_path), image_size=16)
    assert parts[0].train.images.shape[-1] == model.backbone.vision.config.image_size == 32  # the model's size
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(k for k in weights if "vision_model" in k and "layers.0" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="vqa_model: .* lack 1 tensors of a CLIPVisionModel"):
        get_task("vqa", cfg(vqa_model=str(tmp_path))).federation()


class Oracle(nn.Module):
    """Returns fixed logits whatever the input (stands in for a model)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[:len(x["input_ids"])]


def test_fetch_batch_equals_collated_items():
    """The federation's batches of a VQA split (one indexing per field) equal what
    default_collate makes of the same items, built here from the split's fields (not
    through the class), shared images and repeated indices too."""
    from torch.utils.data import default_collate

    from omnifm.fl.client import fetch

    g = torch.Generator().manual_seed(3)
    n = 9
    ds = VQADataset(torch.rand(4, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g),
                    torch.randint(0, 50, (n, 6), generator=g), torch.randint(0, 2, (n, 6), generator=g),
                    torch.randint(-1, 5, (n,), generator=g), torch.rand(n, generator=g) > 0.5, majority=0)
    idx = torch.tensor([5, 0, 5, 8, 2])
    items = [({"image": ds.images[ds.image[i]], "input_ids": ds.input_ids[i], "attention_mask": ds.attention_mask[i]},
              ds.targets[i]) for i in idx.tolist()]
    (x, y), (want_x, want_y) = fetch(ds, idx), default_collate(items)
    assert ds[int(idx[0])][0]["image"].shape == (3, 8, 8)  # one item is an item, not a batch
    assert x.keys() == want_x.keys() and torch.equal(y, want_y)
    assert all(torch.equal(x[k], want_x[k]) for k in x)


def test_metrics_on_a_hand_checked_case():
    """targets 0 1 2 -1 (unseen), closed T T F F, predictions 0 0 2 1, client majority 1:
    right = T F T F -> accuracy 1/2, closed 1/2, open 1/2, majority (target == 1) 1/4."""
    task = get_task("vqa", cfg())
    n = 4
    ds = VQADataset(torch.zeros(1, 3, 8, 8), torch.zeros(n, dtype=torch.int64), torch.zeros(n, 5, dtype=torch.int64),
                    torch.ones(n, 5, dtype=torch.int64), torch.tensor([0, 1, 2, -1]),
                    torch.tensor([True, True, False, False]), majority=1)
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 2, 1]), 3).float()
    assert task.evaluate(Oracle(logits), ds) == {"accuracy": 0.5, "accuracy_closed": 0.5, "accuracy_open": 0.5,
                                                 "majority": 0.25}
    closed_only = VQADataset(ds.images, ds.image, ds.input_ids, ds.attention_mask, ds.targets,
                             torch.ones(n, dtype=torch.bool), majority=0)
    m = task.evaluate(Oracle(logits), closed_only)
    assert math.isnan(m["accuracy_open"]) and m["accuracy_closed"] == 0.5 and m["majority"] == 0.25
    # the federation's mean counts each question once: closed/open by their own numbers
    assert task.metric_weights(ds) == {"accuracy": 4, "accuracy_closed": 2, "accuracy_open": 2, "majority": 4}
    assert task.metric_weights(closed_only) == {"accuracy": 4, "accuracy_closed": 4, "accuracy_open": 0,
                                                "majority": 4}


def test_majority_is_the_clients_most_frequent_training_answer():
    task = get_task("vqa", cfg())
    for part in task.federation():
        counts = torch.bincount(part.train.targets, minlength=len(task.answers))
        assert part.test.majority == int(counts.argmax())  # argmax: the first of tied answers


def test_unseen_test_answers_are_counted_and_reported():
    task = get_task("vqa", cfg())
    with pytest.warns(UserWarning, match=r"vqa: (\d+) of (\d+) test questions have an answer never seen") as rec:
        parts = task.federation()
    train_answers = {task.answers[t] for p in parts for t in p.train.targets.tolist()}
    assert train_answers == set(task.answers)
    unseen = sum(int((p.test.targets == -1).sum()) for p in parts)
    assert unseen == task.unseen > 0
    assert f"{unseen} of {sum(len(p.test) for p in parts)} test" in str(rec[0].message)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="tuning"):
        get_task("vqa", cfg(tuning="qlora"))
    with pytest.raises(ValueError, match="data"):
        get_task("vqa", cfg(data="medmnist")).federation()
    with pytest.raises(ValueError, match="vqa_model"):
        get_task("vqa", cfg(vqa_model="/nonexistent/clip")).federation()


def test_checkpoint_older_than_the_tuning_settings_resumes(tmp_path):
    """A checkpoint written before FLConfig had tuning / vqa_model ran with their
    defaults: it resumes under them, and is refused under other values."""
    Simulation(cfg(rounds=1), str(tmp_path), progress=False).run()
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["tuning"], state["config"]["vqa_model"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"different settings: \['tuning'\]"):
        Simulation(cfg(rounds=2, tuning="bias"), str(tmp_path), progress=False).run(resume=True)
    resumed = Simulation(cfg(rounds=2), str(tmp_path), progress=False)
    assert len(resumed.run(resume=True)) == 2
