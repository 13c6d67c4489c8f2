"""SpectralTokenizer: owns the parameters of omnifm.ops.spectral_token."""
import math

import torch
from torch import nn

from ..ops import spectral_token


class SpectralTokenizer(nn.Module):
    """Image (B, C, H, W) -> spectral token (B, dim), a unit vector.

    Args:
        in_channels: C of the images.
        size: edge K of the low-pass window (K*K frequency bins), at most min(H, W).
        mix_dim: m, width of FreqMix (channels -> m, plus an embedding per bin).
        hidden_dim: h, hidden width of the two-layer GELU MLP.
        dim: d, token dimension (match the backbone's token width).
    """

    def __init__(self, in_channels, size=16, mix_dim=32, hidden_dim=128, dim=256, *, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("size", size), ("mix_dim", mix_dim),
                        ("hidden_dim", hidden_dim), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.size = size
        kw = {"device": device, "dtype": dtype}
        self.mix_weight = nn.Parameter(torch.empty(mix_dim, in_channels, **kw))
        self.freq_embed = nn.Parameter(torch.empty(size * size, mix_dim, **kw))
        self.w1 = nn.Parameter(torch.empty(hidden_dim, mix_dim, **kw))
        self.b1 = nn.Parameter(torch.empty(hidden_dim, **kw))
        self.w2 = nn.Parameter(torch.empty(dim, hidden_dim, **kw))
        self.b2 = nn.Parameter(torch.empty(dim, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's initialisation for the linear maps; small noise for the bin embedding.
        for w, b in ((self.mix_weight, None), (self.w1, self.b1), (self.w2, self.b2)):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if b is not None:
                bound = 1 / math.sqrt(w.shape[1])
                nn.init.uniform_(b, -bound, bound)
        nn.init.normal_(self.freq_embed, std=0.02)

    def forward(self, x):
        return spectral_token(x, self.mix_weight, self.freq_embed, self.w1, self.b1, self.w2, self.b2,
                              size=self.size)

    def extra_repr(self):
        m, c = self.mix_weight.shape
        return f"in_channels={c}, size={self.size}, mix_dim={m}, hidden_dim={self.w1.shape[0]}, dim={self.w2.shape[0]}"
