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
