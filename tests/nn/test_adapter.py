import pytest
import torch
from torch import nn

from omnifm.nn import OmniFMAdapter
from omnifm.tasks.classification import build_model


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)).mean((2, 3)))


class TokenNet(nn.Module):
    """A token backbone: patches -> (B, L, d) -> encoder -> mean pooling."""

    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Conv2d(3, d, 4, stride=4)
        self.tokens = nn.Identity()
        self.encoder = nn.TransformerEncoderLayer(d, 2, 16, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        t = self.tokens(self.embed(x).flatten(2).transpose(1, 2))
        self.seen_tokens = None
        out = self.encoder(t)
        self.seen_tokens = out.shape[1]
        return self.head(out.mean(1))


def test_spatial_mode_starts_as_the_backbone_and_learns():
    torch.manual_seed(0)
    net = ConvNet()
    x = torch.rand(4, 3, 16, 16)
    plain = net(x)
    ad = OmniFMAdapter(net, "stem", 8, size=4, mix_dim=4, hidden_dim=8, n_suffix=2)
    ad.set_bank(torch.nn.functional.normalize(torch.randn(6, 8), dim=1))
    ad.train()
    out = ad(x)
    assert torch.allclose(out, plain, atol=1e-6)  # W_z and the prompts start at zero
    (out.sum() + ad.alignment_loss()).backward()
    assert ad.proj.weight.grad.abs().sum() > 0 and ad.suffix.grad.abs().sum() > 0
    assert ad.tokenizer.w2.grad.abs().sum() > 0  # SPAlign reaches the tokenizer
    assert ad.retrieval_counts.sum() == 4 * 2  # topk=2 per image


def test_retrieval_counts_every_training_retrieval_since_set_bank():
    """The counts equal a hand tally of cosine_topk's indices over several training
    forwards, with a read in between; evaluation forwards do not count; set_bank resets."""
    from omnifm.ops import cosine_topk

    torch.manual_seed(0)
    ad = OmniFMAdapter(ConvNet(), "stem", 8, size=4, mix_dim=4, hidden_dim=8, topk=2)
    bank = torch.nn.functional.normalize(torch.randn(7, 8), dim=1)
    ad.set_bank(bank)
    want = torch.zeros(7, dtype=torch.int64)
    for step in range(5):
        x = torch.rand(3, 3, 16, 16)
        ad.train()
        ad(x)
        with torch.no_grad():
            _, idx = cosine_topk(ad.tokenizer(x), bank, 2)
        want += torch.bincount(idx.flatten(), minlength=7)
        if step == 2:
            assert torch.equal(ad.retrieval_counts, want)  # a read in between
        ad.eval()
        ad(x)  # not counted
    assert torch.equal(ad.retrieval_counts, want) and want.sum() == 5 * 3 * 2
    ad.set_bank(bank)
    assert torch.equal(ad.retrieval_counts, torch.zeros(7, dtype=torch.int64))


def test_sequence_mode_adds_prefix_and_suffix_tokens():
    torch.manual_seed(0)
    net = TokenNet()
    ad = OmniFMAdapter(net, "tokens", 8, mode="sequence", size=4, mix_dim=4, hidden_dim=8, n_suffix=3)
    ad.set_bank(torch.randn(5, 8))
    ad(torch.rand(2, 3, 16, 16))
    assert net.seen_tokens == 16 + 16 + 3  # [Z | r | c]
    nopsp = OmniFMAdapter(TokenNet(), "tokens", 8, mode="sequence", size=4, psp=False)
    nopsp.set_bank(torch.randn(5, 8))
    nopsp(torch.rand(2, 3, 16, 16))
    assert nopsp.backbone.seen_tokens == 16  # the no-PSP projection keeps the count


class Capture(nn.Module):
    """Identity whose input is recorded: what the layer after the adapter's hook sees."""

    def forward(self, t):
        self.seen = t
        return t


@pytest.mark.parametrize("mode", ["spatial", "sequence"])
def test_fused_features_match_a_hand_computation(mode):
    """What the next layer receives, against the formulas written out with the op's
    float64 reference: spatial r + (ECA(r, Sg) W_z^T) + mean(c) at every position;
    sequence [ECA(r, Sg) W_z^T | r | c]. Retrieval is checked by hand too (top-2 cosine)."""
    from omnifm.ops import eca_attention_ref

    torch.manual_seed(1)
    d, B = 6, 3
    layer = nn.Conv2d(3, d, 3, padding=1).double() if mode == "spatial" else nn.Identity()
    after = Capture()
    net = nn.Sequential(layer, after) if mode == "spatial" else nn.Sequential(nn.Flatten(2), Transpose(), layer, after)
    ad = OmniFMAdapter(net, "0" if mode == "spatial" else "2", d if mode == "spatial" else 3, 3, mode=mode, size=4,
                       mix_dim=4, hidden_dim=8, n_suffix=2).double()
    for p in (ad.proj.weight, ad.suffix):
        nn.init.normal_(p)  # not the zero start: every term must show
    bank = torch.nn.functional.normalize(torch.randn(7, ad.proj.weight.shape[0], dtype=torch.float64), dim=1)
    ad.set_bank(bank)
    x = torch.rand(B, 3, 8, 8, dtype=torch.float64)
    ad(x)
    s = ad.tokenizer(x)
    idx = (torch.nn.functional.normalize(s, dim=1) @ bank.T).topk(2, dim=1).indices
    protos = bank[idx]
    f = ad.fusion
    if mode == "spatial":
        r = layer(x).flatten(2).transpose(1, 2)
        z = eca_attention_ref(r, protos, f.wq, f.wk, f.wv) @ ad.proj.weight.T
        want = (r + z + ad.suffix.mean(0)).transpose(1, 2).reshape(B, d, 8, 8)
    else:
        r = x.flatten(2).transpose(1, 2)
        z = eca_attention_ref(r, protos, f.wq, f.wk, f.wv) @ ad.proj.weight.T
        want = torch.cat([z, r, ad.suffix.expand(B, -1, -1)], dim=1)
    torch.testing.assert_close(after.seen, want, rtol=1e-10, atol=1e-12)


class Transpose(nn.Module):
    def forward(self, t):
        return t.transpose(1, 2)


@pytest.mark.parametrize("ablation", [dict(gskr=False), dict(eca=False), dict(psp=False)])
def test_ablations_run_and_train(ablation):
    model = build_model(4, omnifm=True, width=0.125, adapter_kwargs=dict(size=4, **ablation))
    model.set_bank(torch.randn(3, 32))
    out = model(torch.rand(2, 3, 16, 16))
    (out.sum() + model.alignment_loss()).backward()
    assert out.shape == (2, 4) and model.tokenizer.w1.grad is not None
    if not ablation.get("gskr", True):
        assert model.retrieval_counts.sum() == 0  # no retrieval


def test_empty_bank_and_errors():
    ad = OmniFMAdapter(ConvNet(), "stem", 8, size=4)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(ad(x), ad.backbone(x))
    assert ad.alignment_loss().item() == 0
    with pytest.raises(ValueError, match="layer"):
        OmniFMAdapter(ConvNet(), "nope", 8)
    with pytest.raises(ValueError, match="mode"):
        OmniFMAdapter(ConvNet(), "stem", 8, mode="grid")
