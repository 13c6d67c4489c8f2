"""OmniFMAdapter: attaches OmniFM to any backbone at a named layer, without editing it.

Per input x: s = SpectralTokenizer(x) (B, d); GSKR retrieves the top-k bank
prototypes Sg (B, k, d) by cosine similarity (cosine_topk over the client's copy of
the server bank); a forward hook on the named layer takes its output as tokens r and
fuses Sg in:

- spatial mode (CNN/UNet features (B, d, h, w)): Z = ECA(r, Sg) is aligned position
  by position with r and fused back to d channels, r + W_z Z + W_c c, with the private
  suffix prompts c (mean of the p prompts) broadcast; the rest of the network runs
  unchanged on a tensor of the same shape;
- sequence mode (token backbones (B, L, d)): r' = [Z W_z ‖ r ‖ c] (PSP: prefix Z,
  tokens, p suffix prompts), so the next layers see L + L + p tokens.

Ablation switches (the paper's): gskr=False uses the mean bank embedding instead of
retrieval; eca=False uses FiLM conditioning on mean(Sg) instead of cross-attention;
psp=False drops the suffix prompts and keeps the token count (r + W_z Z). The
SPAlign loss ||s - mean(Sg)||^2 is `alignment_loss()` (scale it by lambda; 0 = off).
"""
import torch
from torch import nn

from ..ops import cosine_topk, spalign_loss
from .eca_fusion import ECAFusion
from .spectral_tokenizer import SpectralTokenizer


class FiLM(nn.Module):
    """The no-ECA ablation: r * (1 + gamma(p)) + beta(p), p = mean of the prototypes."""

    def __init__(self, dim):
        super().__init__()
        self.to_gamma_beta = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.to_gamma_beta.weight)
        nn.init.zeros_(self.to_gamma_beta.bias)

    def forward(self, r, protos):
        gamma, beta = self.to_gamma_beta(protos.mean(1)).unsqueeze(1).chunk(2, dim=-1)
        return r * gamma + beta  # the residual r is added by the adapter


class OmniFMAdapter(nn.Module):
    """Wraps `backbone`; fuses spectral prototypes at `layer` (a name from named_modules).

    Args:
        backbone: any nn.Module; its forward output is the adapter's output.
        layer: name of the module whose output holds the tokens.
        dim: channel/token width d at that layer.
        in_channels: channels of the input images (for the spectral tokenizer).
        mode: "spatial" (B, d, h, w) or "sequence" (B, L, d).
        size, mix_dim, hidden_dim: SpectralTokenizer settings.
        topk: prototypes retrieved per image (paper default 2).
        n_suffix: private suffix prompts p.
    """

    PRIVATE = ("suffix",)  # parameter names the adapter keeps private (PSP prompts)

    def __init__(self, backbone, layer, dim, in_channels=3, *, mode="spatial", size=8, mix_dim=16,
                 hidden_dim=64, topk=2, n_suffix=4, gskr=True, eca=True, psp=True):
        super().__init__()
        if mode not in ("spatial", "sequence"):
            raise ValueError(f"mode: expected 'spatial' or 'sequence', got {mode!r}")
        modules = dict(backbone.named_modules())
        if layer not in modules:
            raise ValueError(f"layer: {layer!r} is not a module of the backbone")
        self.backbone, self.layer, self.mode, self.topk = backbone, layer, mode, topk
        self.gskr, self.psp = gskr, psp
        self.tokenizer = SpectralTokenizer(in_channels, size, mix_dim, hidden_dim, dim)
        self.fusion = ECAFusion(dim, dim) if eca else FiLM(dim)
        self.proj = nn.Linear(dim, dim, bias=False)  # W_z
        nn.init.zeros_(self.proj.weight)  # start as the unchanged backbone
        self.suffix = nn.Parameter(torch.zeros(n_suffix, dim)) if psp else None
        self.register_buffer("bank", torch.zeros(0, dim), persistent=False)
        self._counts = torch.zeros(0, dtype=torch.int64)
        self._retrieved = []  # training retrievals' indices not yet in _counts
        self._state = None  # (s, Sg) while a forward runs, read by the hook
        self._last = (None, None)  # (s, Sg) of the last forward, for alignment_loss
        self._handle = modules[layer].register_forward_hook(self._fuse)

    # -- bank ---------------------------------------------------------------
    def set_bank(self, bank):
        """Install the client's copy of the server bank (M, d); resets retrieval counts."""
        self.bank = bank.detach().to(self.bank.device, self.bank.dtype).clone()
        self._counts = torch.zeros(self.bank.shape[0], dtype=torch.int64)
        self._retrieved = []

    @property
    def retrieval_counts(self):
        """(M,) int64: how often each bank row was retrieved in training since set_bank."""
        if self._retrieved:  # one bincount when read (once a round), not one per step
            idx = torch.cat(self._retrieved).cpu()
            self._retrieved = []
            self._counts = self._counts + torch.bincount(idx, minlength=self._counts.shape[0])
        return self._counts

    def retrieve(self, s):
        """(B, k, d) prototypes for tokens s (B, d); None when the bank is empty."""
        M = self.bank.shape[0]
        if M == 0:
            return None
        if not self.gskr:
            return self.bank.mean(0).expand(s.shape[0], 1, -1)
        _, idx = cosine_topk(s.detach(), self.bank, min(self.topk, M))
        if self.training:
            self._retrieved.append(idx.flatten())
        return self.bank[idx]

    # -- forward ------------------------------------------------------------
    def forward(self, x):
        s = self.tokenizer(x)
        self._state = (s, self.retrieve(s))
        try:
            return self.backbone(x)
        finally:
            self._last = self._state
            self._state = None

    def _fuse(self, module, inputs, output):
        if self._state is None or self._state[1] is None:
            return output
        if isinstance(output, tuple):  # layers that return (hidden, extras), e.g. older transformers blocks
            return (self._fuse(module, inputs, output[0]), *output[1:])
        protos = self._state[1].to(output.dtype)
        if self.mode == "spatial":
            return self._fuse_spatial(output, protos)
        if isinstance(self.fusion, ECAFusion):  # W_z folded into the k values
            if self.psp:  # [prefix Z W_z^T | tokens | suffix prompts] as one op
                return self.fusion.prefix(output, protos, self.proj.weight, self.suffix)
            z = self.fusion(output, protos, out_weight=self.proj.weight)
        else:
            z = self.proj(self.fusion(output, protos))
        if self.psp:  # sequence PSP: [prefix Z | tokens | suffix prompts]
            return torch.cat([z, output, self.suffix.expand(output.shape[0], -1, -1)], dim=1)
        return output + z

    def _fuse_spatial(self, output, protos):
        """output + Z W_z^T + c at every position of the (B, d, h, w) feature map."""
        # The suffix term (mean of the prompts, at every position) rides on the values
        # with W_z: A (V W_z^T + c) = Z W_z^T + c as each row of A sums to 1.
        c = self.suffix.mean(0) if self.psp else None
        tokens = output.flatten(2)  # (B, d, h*w): channel-first tokens, a view
        if isinstance(self.fusion, ECAFusion):  # one op in this layout, W_z and c in the k values
            fused = self.fusion.residual(tokens, protos, out_weight=self.proj.weight, out_bias=c)
        else:
            z = self.proj(self.fusion(tokens.transpose(1, 2), protos))
            fused = tokens + (z if c is None else z + c).transpose(1, 2)
        fused = fused.reshape(output.shape)
        # Hand the next layer the memory format it had: a channels-last input would
        # switch every later convolution (and its backward) to other, here slower, kernels.
        return fused.contiguous() if output.is_contiguous() else fused

    def alignment_loss(self):
        """SPAlign of the last forward: ||s - mean_k Sg||^2 averaged over the batch."""
        s, protos = self._last
        if protos is None:
            return torch.zeros((), device=self.bank.device)
        return spalign_loss(s, protos.detach())

    def spectral_tokens(self, x):
        """Spectral tokens (B, d) of x, without the backbone (for bank uploads)."""
        return self.tokenizer(x)
