"""Medical VQA (the paper's SLAKE / VQA-RAD settings): a CLIP-style vision encoder and
text encoder from Hugging Face `transformers`, a fusion block (the question attends
over the image tokens) and an answer head; answers are scored as closed-set
classification over the training answers of the whole federation (the usual protocol
for SLAKE and VQA-RAD). A test question whose answer never occurs in training can
only be wrong: those are counted and reported in a warning, never dropped.

Input of an item: {"image": (3, S, S), "input_ids": (T,), "attention_mask": (T,)};
target: the answer's index (-1 for an answer unseen in training).

Model (`--vqa-model`): `tiny` builds small CLIPVisionModel / CLIPTextModel configs in
code (random init, hidden width 256 * --width, 2 layers, patch 8) and a word-level
tokenizer over the training questions; PATH loads both encoders and the tokenizer
from a local `save_pretrained` CLIP directory (`save_pretrained` here writes one),
with local_files_only: nothing is downloaded. Images are resized to the vision
model's size and normalised with CLIP's mean and std.

OmniFM: the adapter runs in sequence mode on the vision encoder's output tokens r (a
hook on its last block), so the fusion block and the head read r' = [Z || r || c]
(prefix Z, tokens, suffix prompts c), the paper's r' feeding the head; the encoder
itself runs on its L tokens as usual. (On the encoder's input instead, every block
would run on 2L + p tokens: 1.7x FedAvg's round time at the --quick size, for no gain
in accuracy that we measured.) The spectral token is the image's.

Tuning regimes (`--tuning`), applied to both encoders: full; lora (peft LoraConfig,
r=8, alpha=32, on the attention q and v projections); adapter (a zero-initialised
bottleneck MLP added after every transformer block); layernorm / bias (only those
encoder parameters). The fusion block, the head and the OmniFM modules always train.
Frozen parameters are neither trained nor shared (the federation's policy).

Metrics per client: accuracy, accuracy_closed / accuracy_open (over those questions;
NaN for a client without any), and majority, the accuracy of always answering the
client's most frequent training answer (the trivial baseline).
"""
import math
import os
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..fl.client import in_order
from ..nn import OmniFMAdapter
from .base import ClientData, Plain, Task, set_feature_module

TUNINGS = ("full", "lora", "adapter", "layernorm", "bias")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
TINY_LAYERS, TINY_PATCH, TINY_TEXT_LENGTH = 2, 8, 32
LORA = dict(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _quiet_transformers():
    """Load reports and progress bars of from_pretrained would fill every run's log."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


# -- tokenizer and encoders -------------------------------------------------------
def build_tokenizer(questions, max_length=TINY_TEXT_LENGTH):
    """A word-level PreTrainedTokenizerFast over the words of `questions` (lowercased,
    split at spaces and punctuation), ids in sorted word order after the specials;
    encodes "[BOS] words [EOS]"."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({w for q in questions for w, _ in split.pre_tokenize_str(q.lower())})
    vocab = {w: i for i, w in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                       special_tokens=[(s, vocab[s]) for s in SPECIALS[2:]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=max_length)


def tiny_hidden(width):
    """Hidden width of the tiny encoders: 256 * width (a multiple of the 4 heads), at least 32."""
    return max(32, round(256 * width / 4) * 4)


def tiny_encoders(width, image_size, tokenizer):
    """(CLIPVisionModel, CLIPTextModel), random init, hidden tiny_hidden(width)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    hidden = tiny_hidden(width)
    shared = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=TINY_LAYERS,
                  num_attention_heads=4)
    vision = CLIPVisionModel(CLIPVisionConfig(**shared, image_size=image_size, patch_size=TINY_PATCH))
    text = CLIPTextModel(CLIPTextConfig(**shared, vocab_size=len(tokenizer),
                                        max_position_embeddings=tokenizer.model_max_length,
                                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id))
    return vision, text


def load_encoders(path):
    """(CLIPVisionModel, CLIPTextModel, tokenizer) from a local save_pretrained CLIP directory."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPVisionModel

    if not os.path.isdir(path):
        raise ValueError(f"vqa_model: expected 'tiny' or a local save_pretrained directory, got {path!r}")
    _quiet_transformers()
    try:
        encoders = []
        for cls in (CLIPVisionModel, CLIPTextModel):
            model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
            if info["missing_keys"]:  # from_pretrained would start them at random, silently
                raise ValueError(f"its weights lack {len(info['missing_keys'])} tensors of a {cls.__name__} "
                                 f"(e.g. {sorted(info['missing_keys'])[0]})")
            encoders.append(model)
        return (*encoders, AutoTokenizer.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: tensors of the wrong shape
        raise ValueError(f"vqa_model: {path} is not a CLIP save_pretrained directory with a tokenizer ({e})") from e


def _merged_state(encoder):
    """The encoder's state dict as a plain CLIP model names it: LoRA layers (peft) are
    merged into their base weights (W + scale * B @ A) on a copy."""
    import copy

    encoder = copy.deepcopy(encoder)
    for module in encoder.modules():
        if hasattr(module, "base_layer") and hasattr(module, "merge"):
            module.merge()
    return {k.replace(".base_layer.", "."): v for k, v in encoder.state_dict().items() if "lora_" not in k}


def save_pretrained(model, tokenizer, path):
    """Write the model's two encoders (as one CLIPModel) and the tokenizer to path, so
    that `--vqa-model path` loads them back. `model`: a VQA model, Plain or adapted;
    LoRA weights are merged in; the adapter regime's bottlenecks have no place in a
    CLIP model, so that regime is refused."""
    from transformers import CLIPConfig, CLIPModel

    _quiet_transformers()
    net = model.backbone
    if hasattr(net, "bottlenecks"):
        raise ValueError("save_pretrained: the adapter regime's bottleneck adapters are not part of a CLIP model; "
                         "save the model's state_dict instead")
    clip = CLIPModel(CLIPConfig(text_config=net.text.config.to_dict(), vision_config=net.vision.config.to_dict()))
    for part, encoder in ((clip.vision_model, net.vision), (clip.text_model, net.text)):
        part.load_state_dict(_merged_state(encoder))
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)


# -- model -------------------------------------------------------------------------
class QuestionAttention(nn.Module):
    """Fusion: the question (masked mean of its tokens) attends over the image tokens;
    features = MLP([q, a, q * a]) (B, dim), kept in `self.features` (MOON)."""

    def __init__(self, vision_dim, text_dim, dim, heads=4):
        super().__init__()
        self.to_q, self.to_kv = nn.Linear(text_dim, dim), nn.Linear(vision_dim, dim)
        self.attend = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mix = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.LayerNorm(dim))
        self.features = None

    def forward(self, image_tokens, text_tokens, attention_mask):
        m = attention_mask.unsqueeze(-1).to(text_tokens.dtype)
        q = self.to_q((text_tokens * m).sum(1) / m.sum(1).clamp(min=1))
        kv = self.to_kv(image_tokens)
        a = self.attend(q.unsqueeze(1), kv, kv, need_weights=False)[0][:, 0]
        self.features = self.mix(torch.cat([q, a, q * a], -1))
        return self.features


class Bottleneck(nn.Module):
    """Adapter after a transformer block: h + up(GELU(down(h))), up zero-initialised so
    the block starts unchanged. `after_block` is the block's forward hook (a bound
    method: deep copies of the model hook their own copy)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.down, self.up = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(F.gelu(self.down(h)))

    def after_block(self, module, inputs, output):
        if isinstance(output, tuple):  # some transformers versions return (hidden, attentions)
            return (self(output[0]), *output[1:])
        return self(output)


class VQANet(nn.Module):
    """{"image" (B, 3, S, S) in [0, 1], "input_ids" (B, T), "attention_mask" (B, T)}
    -> answer logits (B, n_answers)."""

    def __init__(self, vision, text, n_answers, dim=None):
        super().__init__()
        self.vision, self.text = vision, text
        vd, td = vision.config.hidden_size, text.config.hidden_size
        dim = dim or vd
        self.fusion = QuestionAttention(vd, td, dim)
        self.head = nn.Linear(dim, n_answers)
        self.size = vision.config.image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        image = x["image"]
        if image.shape[-1] != self.size or image.shape[-2] != self.size:
            image = F.interpolate(image, size=(self.size, self.size), mode="bilinear", align_corners=False)
        v = self.vision(pixel_values=(image - self.mean) / self.std).last_hidden_state
        t = self.text(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
        return self.head(self.fusion(v, t, x["attention_mask"]))


def encoder_layers(encoder):
    """The transformer blocks (nn.ModuleList) of a CLIP encoder."""
    return next(m for name, m in encoder.named_modules() if name.endswith("encoder.layers"))


def apply_tuning(net, regime):
    """Set requires_grad of the encoders' parameters for a tuning regime (adds LoRA
    layers or bottleneck adapters first when the regime has them)."""
    if regime not in TUNINGS:
        raise ValueError(f"tuning: expected one of {TUNINGS}, got {regime!r}")
    encoders = (net.vision, net.text)
    if regime == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        for encoder in encoders:
            inject_adapter_in_model(LoraConfig(**LORA), encoder)
    if regime == "adapter":
        net.bottlenecks = nn.ModuleList()
        for encoder in encoders:
            d = encoder.config.hidden_size
            for layer in encoder_layers(encoder):
                net.bottlenecks.append(Bottleneck(d, max(8, d // 8)))
                layer.register_forward_hook(net.bottlenecks[-1].after_block)
    trains = {"full": lambda name, module: True,
              "lora": lambda name, module: "lora_" in name,
              "adapter": lambda name, module: False,
              "layernorm": lambda name, module: isinstance(module, nn.LayerNorm),
              "bias": lambda name, module: name.endswith(".bias")}[regime]
    for encoder in encoders:
        for module_name, module in encoder.named_modules():
            for name, p in module.named_parameters(recurse=False):
                p.requires_grad_(trains(f"{module_name}.{name}", module))


class ImageTokenizer(nn.Module):
    """The spectral tokenizer applied to the image of a VQA input dict."""

    def __init__(self, spectral):
        super().__init__()
        self.spectral = spectral

    def forward(self, x):
        return self.spectral(x["image"])


# -- data ---------------------------------------------------------------------------
class VQADataset(Dataset):
    """Encoded questions of one client split (item: see module doc). images (m, 3, S, S)
    are shared with the pool; image (n,) indexes them; closed (n,) bool; majority: the
    answer index of the client's most frequent training answer."""

    def __init__(self, images, image, input_ids, attention_mask, targets, closed, majority):
        self.images, self.image = images, image
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.targets, self.closed, self.majority = targets, closed, majority

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.fetch_batch(i)

    def fetch_batch(self, idx):
        """Items idx (int64 tensor) as one batch, as default_collate stacks them (or, for
        an int, the one item)."""
        return ({"image": self.images[self.image[idx]], "input_ids": self.input_ids[idx],
                 "attention_mask": self.attention_mask[idx]}, self.targets[idx])


class VQATask(Task):
    name = "vqa"
    head_prefix = "backbone.head."
    metrics = ("accuracy", "accuracy_closed", "accuracy_open", "majority")
    main_metric = "accuracy"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.tuning not in TUNINGS:
            raise ValueError(f"tuning: expected one of {TUNINGS}, got {cfg.tuning!r}")
        self.tokenizer, self.answers, self.unseen = None, None, 0
        self._encoders = None  # (vision, text) loaded from vqa_model, until build_model takes them
        self.image_size = cfg.image_size  # a loaded model's own size replaces it (federation())

    @classmethod
    def defaults(cls, scenario=None):
        from ..data.vqa import MODALITIES

        scenario = scenario or "iid"
        return {"scenario": scenario, "clients": len(MODALITIES) if scenario == "modality" else 3,
                "participation": 1.0, "batch_size": 16, "lr": 0.05}

    def federation(self):
        from ..data.vqa import SOURCES, vqa_federation

        cfg = self.cfg
        if cfg.data not in SOURCES and not all(s in SOURCES[1:] for s in cfg.data.split("+")):
            raise ValueError(f"data: the vqa task reads {', '.join(SOURCES)} (or real sources joined by '+'), "
                             f"got {cfg.data!r}")
        if cfg.vqa_model != "tiny":  # images are read at the loaded model's size
            *self._encoders, self.tokenizer = load_encoders(cfg.vqa_model)
            self.image_size = self._encoders[0].config.image_size
        pool, clients = vqa_federation(cfg.data, cfg.data_root, cfg.scenario, cfg.clients,
                                       samples_per_client=cfg.synthetic_samples if cfg.data == "synthetic"
                                       else cfg.samples_per_client, image_size=self.image_size,
                                       seed=cfg.seed)
        train_rows = [r for _, tr, _ in clients for r in tr]
        self.answers = sorted({pool.answers[r] for r in train_rows})
        if cfg.vqa_model == "tiny":
            self.tokenizer = build_tokenizer([pool.questions[r] for r in train_rows])
            max_length = self.tokenizer.model_max_length
        else:  # a saved tokenizer may not state its length: the text model's positions bound it
            max_length = min(self.tokenizer.model_max_length, self._encoders[1].config.max_position_embeddings)
        index = {a: i for i, a in enumerate(self.answers)}
        out, self.unseen, n_test = [], 0, 0
        for name, train, test in clients:
            counts = Counter(index[pool.answers[r]] for r in train)
            majority = min(counts, key=lambda a: (-counts[a], a))  # ties: the first answer in sorted order
            splits = []
            for rows in (train, test):
                enc = self.tokenizer([pool.questions[r] for r in rows], padding="max_length", truncation=True,
                                     max_length=max_length, return_tensors="pt")
                targets = torch.tensor([index.get(pool.answers[r], -1) for r in rows], dtype=torch.int64)
                splits.append(VQADataset(pool.images, pool.image[rows], enc["input_ids"], enc["attention_mask"],
                                         targets, pool.closed[rows], majority))
            self.unseen += int((splits[1].targets < 0).sum())
            n_test += len(test)
            out.append(ClientData(name, *splits))
        if self.unseen:
            warnings.warn(f"vqa: {self.unseen} of {n_test} test questions have an answer never seen in training "
                          "(scored as wrong)", stacklevel=2)
        return out

    @property
    def adapter_dim(self):
        if self.cfg.vqa_model == "tiny":
            return tiny_hidden(self.cfg.width)
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig.from_pretrained(self.cfg.vqa_model, local_files_only=True).hidden_size

    def build_model(self, *, omnifm, adapter_kwargs):
        if self.answers is None:
            raise ValueError("vqa: build_model needs the answers and tokenizer of federation(); call it first")
        if self.cfg.vqa_model == "tiny":
            vision, text = tiny_encoders(self.cfg.width, self.cfg.image_size, self.tokenizer)
        elif self._encoders is not None:
            (vision, text), self._encoders = self._encoders, None
        else:
            vision, text, _ = load_encoders(self.cfg.vqa_model)
        net = VQANet(vision, text, len(self.answers))
        apply_tuning(net, self.cfg.tuning)
        if omnifm:
            blocks = next(name for name, _ in net.vision.named_modules() if name.endswith("encoder.layers"))
            layer = f"vision.{blocks}.{len(encoder_layers(net.vision)) - 1}"  # the encoder's last block
            model = OmniFMAdapter(net, layer, self.adapter_dim, 3, mode="sequence",
                                  size=min(8, self.image_size), **adapter_kwargs)
            model.tokenizer = ImageTokenizer(model.tokenizer)
        else:
            model = Plain(net)
        set_feature_module(model, net.fusion)
        return model

    def loss(self, output, target):
        return F.cross_entropy(output, target)

    @torch.no_grad()
    def evaluate(self, model, dataset):
        model.eval()
        pred = torch.cat([model(x).argmax(1) for x, _ in in_order(dataset, 64)])
        right = (pred == dataset.targets).float()
        closed = dataset.closed
        mean = lambda v: v.mean().item() if len(v) else math.nan
        return {"accuracy": mean(right), "accuracy_closed": mean(right[closed]), "accuracy_open": mean(right[~closed]),
                "majority": mean((dataset.targets == dataset.majority).float())}

    def metric_weights(self, dataset):
        n_closed = int(dataset.closed.sum())
        return {"accuracy": len(dataset), "accuracy_closed": n_closed, "accuracy_open": len(dataset) - n_closed,
                "majority": len(dataset)}
