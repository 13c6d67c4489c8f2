import pytest
import torch

from omnifm.nn import ECAFusion
from omnifm.ops import eca_attention_ref
from tests.helpers import relerr


def test_module_matches_reference_and_trains():
    torch.manual_seed(0)
    m = ECAFusion(12, 8).double()
    r, protos = torch.randn(3, 10, 12, dtype=torch.float64), torch.randn(3, 2, 12, dtype=torch.float64)
    out = m(r, protos)
    assert relerr(out, eca_attention_ref(r, protos, m.wq, m.wk, m.wv)) < 1e-12
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert "head_dim=8" in repr(m)


def test_defaults_and_errors():
    assert ECAFusion(6).wq.shape == (6, 6)
    with pytest.raises(ValueError, match="head_dim"):
        ECAFusion(6, 0)
    with pytest.raises(ValueError, match="protos"):
        ECAFusion(6)(torch.randn(2, 3, 6), torch.randn(2, 1, 5))
