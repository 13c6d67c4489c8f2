"""Differential privacy of what leaves a hospital (`--dp-clip C --dp-noise sigma`).

Each round, before anything is sent, a participating client
- clips its update, the change of every shared floating-point tensor plus any strategy
  extra (SCAFFOLD's control-variate change), as one vector to L2 norm <= C, and adds
  Gaussian noise N(0, (sigma C)^2) to every coordinate (the Gaussian mechanism on the
  client's whole contribution: client-level DP, sensitivity C under add/remove of a
  client's data);
- clips each bank prototype to norm <= 1 (spectral tokens are unit vectors, so a
  class mean already is) and adds N(0, sigma^2) noise to it: a second Gaussian
  mechanism with the same noise multiplier;
- sends no retrieval counts (they describe its data and carry no noise), so with DP the
  bank neither records usage nor prunes by it.

Accounting: a client's privacy loss is the composition of two Gaussian mechanisms
(noise multiplier sigma) per round it took part in (a rejected upload still left the
hospital, so it counts), plus one for the prototypes every client sends to seed the
bank before round 0 (noised the same way); no amplification by sampling is claimed, since the
participants are drawn without replacement and known to the server. epsilon(delta) is
the largest over clients, from the RDP accountant of Google's `dp-accounting`
(never a hand-rolled formula). What is not covered: the number of samples each client
reports (aggregation weights), the training loss in the metrics, and the evaluation,
which in the simulation runs on the server.
"""
import dataclasses
import math

import torch


def _floating(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


class GaussianUploads:
    def __init__(self, clip, noise, delta):
        if not clip > 0:
            raise ValueError(f"dp_clip: expected a positive clipping norm, got {clip}")
        if noise < 0:
            raise ValueError(f"dp_noise: expected a noise multiplier >= 0, got {noise}")
        if not 0 < delta < 1:
            raise ValueError(f"dp_delta: expected a value in (0, 1), got {delta}")
        self.clip, self.noise, self.delta = clip, noise, delta

    def privatize(self, update, global_state, seed):
        """The update as it leaves the client: clipped, noised, without retrieval counts."""
        gen = torch.Generator().manual_seed(seed)
        names = [k for k, v in update.weights.items() if _floating(v)]
        flat_extra = _flat_extra(update.extra)
        extras = [k for k, v in flat_extra.items() if _floating(v)]
        change = [update.weights[k] - global_state[k] for k in names] + [flat_extra[k] for k in extras]
        norm = torch.sqrt(sum((c.double() ** 2).sum() for c in change)) if change else torch.zeros((), dtype=torch.float64)
        scale = min(1.0, self.clip / max(norm.item(), 1e-12))
        noisy = [c * scale + self.noise * self.clip * torch.randn(c.shape, generator=gen, dtype=c.dtype)
                 for c in change]
        weights = dict(update.weights)
        for k, c in zip(names, noisy):
            weights[k] = global_state[k] + c
        extra = _unflatten_extra(update.extra, dict(zip(extras, noisy[len(names):])))
        protos = None if update.bank_upload is None else self.privatize_prototypes(update.bank_upload, gen)
        return dataclasses.replace(update, weights=weights, extra=extra, bank_upload=protos, retrieval_counts=None)

    def privatize_prototypes(self, protos, generator):
        """Each prototype clipped to norm <= 1, plus N(0, sigma^2) noise (also the round-0
        seeding upload, which counts as one more mechanism: see epsilon)."""
        norms = protos.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return protos * (1.0 / norms).clamp(max=1.0) + self.noise * torch.randn(protos.shape, generator=generator,
                                                                                  dtype=protos.dtype)

    def epsilon(self, participations, seeded=False):
        """epsilon at self.delta for a client that took part in `participations` rounds
        (two mechanisms each) and, when seeded, sent its prototypes to seed the bank."""
        events = 2 * participations + int(seeded)
        if events == 0:
            return 0.0
        if self.noise == 0:
            return math.inf
        import dp_accounting

        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(self.noise), events)
        return float(accountant.get_epsilon(self.delta))  # a numpy scalar would not pass weights_only loading


def _flat_extra(extra):
    """{"delta_c": {name: tensor}} -> {"delta_c/name": tensor} (strategy extras are one level deep)."""
    out = {}
    for key, value in (extra or {}).items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _unflatten_extra(extra, replaced):
    out = {}
    for key, value in (extra or {}).items():
        if isinstance(value, dict):
            out[key] = {k: replaced.get(f"{key}/{k}", v) for k, v in value.items()}
        else:
            out[key] = replaced.get(key, value)
    return out
