"""ECAFusion: owns the projections of omnifm.ops.eca_attention."""
import math

import torch
from torch import nn

from ..ops import eca_attention, eca_psp, eca_residual


class ECAFusion(nn.Module):
    """Tokens r (B, L, dim) attend to k prototypes (B, k, dim) -> Z (B, L, head_dim).

    The projections are stored as (dim, head_dim) matrices, the layout of the op.
    """

    def __init__(self, dim, head_dim=None, *, device=None, dtype=None):
        super().__init__()
        head_dim = dim if head_dim is None else head_dim
        for name, v in (("dim", dim), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        kw = {"device": device, "dtype": dtype}
        self.wq = nn.Parameter(torch.empty(dim, head_dim, **kw))
        self.wk = nn.Parameter(torch.empty(dim, head_dim, **kw))
        self.wv = nn.Parameter(torch.empty(dim, head_dim, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1 / math.sqrt(self.wq.shape[0])  # as nn.Linear(dim, head_dim)
        for w in (self.wq, self.wk, self.wv):
            nn.init.uniform_(w, -bound, bound)

    def forward(self, r, protos, out_weight=None, out_bias=None):
        """Z (B, L, head_dim); with out_weight (out, head_dim) and/or out_bias (out,),
        Z out_weight^T + out_bias (B, L, out), computed as attention over the k values
        already mapped (protos Wv out_weight^T + out_bias: the attention weights of a
        token sum to 1), so k rows go through the extra product and sum instead of L."""
        return eca_attention(r, protos, self.wq, self.wk, self._values(out_weight), value_bias=out_bias)

    def residual(self, x, protos, out_weight=None, out_bias=None):
        """x + (Z out_weight^T + out_bias)^T for channel-first tokens x (B, dim, L) (a
        feature map, flattened); the mapped Z must have x's width."""
        return eca_residual(x, protos, self.wq, self.wk, self._values(out_weight), value_bias=out_bias)

    def prefix(self, r, protos, out_weight, suffix):
        """[Z out_weight^T | r | suffix] (B, 2L + p, dim) for tokens r (B, L, dim) and
        suffix prompts (p, dim): sequence mode with PSP in one op (eca_psp)."""
        return eca_psp(r, protos, self.wq, self.wk, self.wv, out_weight, suffix)

    def _values(self, out_weight):
        return self.wv if out_weight is None else self.wv @ out_weight.transpose(0, 1)

    def extra_repr(self):
        return f"dim={self.wq.shape[0]}, head_dim={self.wq.shape[1]}"
