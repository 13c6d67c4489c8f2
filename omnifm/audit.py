"""Leakage audit: how much of a hospital's images can be rebuilt from what OmniFM lets
out of it (`omnifm audit leakage --run DIR`).

The attacker is the server (or anyone who sees the bank and the global model): it holds
the global spectral tokenizer and the bank's prototypes (class means of the clients'
spectral tokens, noised under --dp-noise), and public images of the same modalities
(here: the run's synthetic generator with another seed). It trains an inversion
network, spectral token -> image, on its public images and applies it to
1. the bank's prototypes: each is scored against its owner's training images (the mean
   over them, and the best single match, since an attacker hopes to reveal one image);
2. single-image spectral tokens of the clients' training images (never uploaded by
   OmniFM: the worst case, should a client ever send one).
Baseline: the attacker's mean public image scored the same way. Reconstructions are
scored with MONAI's PSNR and SSIM; a reconstruction that does not beat the mean image
reveals nothing the attacker did not know. Applies to image-input tasks (not VQA).
"""
import dataclasses
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from .fl import FLConfig, Simulation
from .fl.client import in_order, load_state
from .tasks import get_task


class Inverter(nn.Module):
    """Spectral token (B, d) -> image (B, C, H, W) in [0, 1]: a small MLP."""

    def __init__(self, dim, shape, hidden=512):
        super().__init__()
        self.shape = shape
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, shape[0] * shape[1] * shape[2]))

    def forward(self, tokens):
        return torch.sigmoid(self.net(tokens)).view(-1, *self.shape)


def _images(dataset):
    return torch.cat([x for x, _ in in_order(dataset)])


def _scores(recon, images):
    """PSNR and SSIM of each recon row against each image row: (R, N) tensors."""
    from monai.metrics import PSNRMetric, SSIMMetric

    win = min(7, images.shape[-1] // 2 * 2 - 1)
    r = recon.repeat_interleave(len(images), 0)
    x = images.repeat(len(recon), 1, 1, 1)
    psnr = PSNRMetric(max_val=1.0, reduction="none")(r, x).view(len(recon), len(images))
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=win, reduction="none")(r, x).view(len(recon), -1)
    return psnr, ssim


def leakage(run_dir, *, public=512, steps=400, seed=0, max_images=64):
    """{target: {"recon"/"mean_image": {"psnr", "ssim", "psnr_best", "ssim_best"}}} for a
    finished run directory holding an omnifm run (config.json, omnifm/checkpoint.pt)."""
    with open(os.path.join(run_dir, "config.json")) as fh:
        saved = json.load(fh)
    if "omnifm" not in saved.pop("strategies"):
        raise ValueError(f"run: {run_dir} has no omnifm run (only OmniFM uploads prototypes)")
    cfg = dataclasses.replace(FLConfig(**saved), strategy="omnifm")
    if cfg.task == "vqa":
        raise ValueError("run: the audit rebuilds images; the vqa task's inputs are image + question")
    sim = Simulation(cfg, os.path.join(run_dir, "omnifm"), progress=False, log=lambda message: None)
    sim.resume()
    load_state(sim.model, sim.global_state, sim.clients[0].local_state)  # the tokenizer is shared
    sim.model.eval()
    tokens = lambda x: sim.model.spectral_tokens(x)  # noqa: E731

    # the attacker's public images: the same generator, another seed
    public_cfg = dataclasses.replace(cfg, seed=cfg.seed + 10_007, samples_per_client=max(2, public // cfg.clients))
    pub = torch.cat([_images(p.train) for p in get_task(cfg.task, public_cfg).federation()])[:public]
    torch.manual_seed(seed)
    with torch.no_grad():
        pub_tokens = tokens(pub)
    inverter = Inverter(pub_tokens.shape[1], tuple(pub.shape[1:]))
    opt = torch.optim.Adam(inverter.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(pub), (min(64, len(pub)),), generator=g)
        loss = F.mse_loss(inverter(pub_tokens[idx]), pub[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean_image = pub.mean(0, keepdim=True)

    results = {"prototypes": {"recon": [], "mean_image": []}, "single tokens": {"recon": [], "mean_image": []}}
    with torch.no_grad():
        for c in sim.clients:
            images = _images(c.train)[:max_images]
            entries = sim.bank.entries[sim.bank.owners == c.cid]
            for target, recon in (("prototypes", inverter(entries) if len(entries) else None),
                                  ("single tokens", inverter(tokens(images)))):
                if recon is None:
                    continue
                for name, guess in (("recon", recon), ("mean_image", mean_image)):
                    psnr, ssim = _scores(guess, images)
                    if target == "single tokens" and name == "recon":  # each token against its own image
                        psnr, ssim = psnr.diagonal()[:, None], ssim.diagonal()[:, None]
                    results[target][name].append((psnr, ssim))
    out = {}
    for target, per in results.items():
        out[target] = {}
        for name, pairs in per.items():
            if not pairs:
                continue
            psnr = torch.cat([p.flatten() for p, _ in pairs])
            ssim = torch.cat([s.flatten() for _, s in pairs])
            best_psnr = torch.cat([p.max(1).values for p, _ in pairs])
            best_ssim = torch.cat([s.max(1).values for _, s in pairs])
            out[target][name] = {"psnr": psnr.mean().item(), "ssim": ssim.mean().item(),
                                 "psnr_best": best_psnr.mean().item(), "ssim_best": best_ssim.mean().item()}
    out["dp"] = {"clip": cfg.dp_clip, "noise": cfg.dp_noise}
    return out


def table(result, title):
    lines = [title, "", "| what the attacker inverts | guess | PSNR (dB) | SSIM | best-match PSNR | best-match SSIM |",
             "|---|---|---|---|---|---|"]
    for target in ("prototypes", "single tokens"):
        for name, label in (("recon", "inversion network"), ("mean_image", "mean public image (baseline)")):
            m = result[target].get(name)
            if not m:
                continue
            best = (f"{m['psnr_best']:.2f} | {m['ssim_best']:.3f}" if target == "prototypes"
                    else "– | –")  # a single token is scored against its own image only
            lines.append(f"| {target} | {label} | {m['psnr']:.2f} | {m['ssim']:.3f} | {best} |")
    return "\n".join(lines)
