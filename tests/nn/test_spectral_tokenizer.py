import pytest
import torch
from torch import nn

from omnifm.nn import SpectralTokenizer
from omnifm.ops import spectral_token_ref
from tests.helpers import fast_backends, forced, relerr

BACKENDS = ["reference"] + [b for b, dev in fast_backends("spectral_token") if dev == "cpu"]


class TinyModel(nn.Module):
    """A classifier that uses the spectral token beside a conv path, as OmniFM does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.tok = SpectralTokenizer(3, size=6, mix_dim=8, hidden_dim=16, dim=8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        feats = self.conv(x).mean((2, 3))
        return self.head(feats + self.tok(x))


def test_module_matches_functional_reference():
    tok = SpectralTokenizer(2, size=5, mix_dim=4, hidden_dim=8, dim=6).double()
    x = torch.rand(3, 2, 12, 11, dtype=torch.float64)
    ref = spectral_token_ref(x, tok.mix_weight, tok.freq_embed, tok.w1, tok.b1, tok.w2, tok.b2, size=5)
    assert relerr(tok(x), ref) < 1e-12
    assert "size=5" in repr(tok)


def test_every_parameter_gets_a_gradient():
    tok = SpectralTokenizer(3, size=4, mix_dim=4, hidden_dim=8, dim=6)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    (tok(x) * torch.randn(2, 6)).sum().backward()
    for name, p in [("x", x), *tok.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backend,compiler", [(b, "aot_eager") for b in BACKENDS] + [("ext", "inductor")])
def test_torch_compile_fullgraph(backend, compiler):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} not available here")
    torch.manual_seed(0)
    model = TinyModel()
    x = torch.rand(4, 3, 16, 16)
    with forced(backend):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=compiler)
        out = compiled(x)
        out.sum().backward()
    assert relerr(out, eager) < 1e-5
    assert all(p.grad is not None for p in model.parameters())


def test_constructor_errors():
    with pytest.raises(ValueError, match="size"):
        SpectralTokenizer(3, size=0)
    with pytest.raises(ValueError, match="in_channels"):
        SpectralTokenizer(0)
    with pytest.raises(ValueError, match="size"):
        SpectralTokenizer(3, size=16)(torch.rand(1, 3, 8, 8))
