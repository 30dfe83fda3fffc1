"""Training losses of the VAE and the discriminator.

All videos are NCTHW in [-1, 1]. Every function returns scalars; :class:`VAELoss` returns the total
plus a dict of detached terms for logging (``recon``, ``lpips``, ``kl``, ``gan``, ``gan_weight``, and
whatever a model-specific hook adds).

Model-specific terms: a model may define ``training_losses(x, recon, posterior) -> dict[str, Tensor]``
(already weighted scalars), or a function can be registered for its family in :data:`EXTRA_LOSSES`;
each returned term is added to the total and logged under its name. The latent regularisation
against a frozen image VAE (``loss.compat_weight > 0``, :mod:`train.compat`) is added the same way,
as the term ``compat``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LossConfig

# family name -> fn(model, x, recon, posterior) -> {name: weighted scalar}
EXTRA_LOSSES: dict[str, Callable[..., dict[str, Tensor]]] = {}


def recon_loss(x: Tensor, recon: Tensor, kind: str = "l1", eps: float = 1e-3) -> Tensor:
    """Mean L1, squared (``mse``, the loss PSNR measures) or Charbonnier (sqrt(d^2 + eps^2) - eps) distance."""
    d = recon.float() - x.float()
    if kind == "l1":
        return d.abs().mean()
    if kind == "mse":
        return d.pow(2).mean()
    if kind == "charbonnier":
        return (d.pow(2) + eps * eps).sqrt().sub(eps).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}; use l1, mse or charbonnier")


def kl_loss(posterior) -> Tensor:
    """KL to N(0, I) summed over the latent, averaged over the batch."""
    return posterior.kl().mean()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """||grad nll|| / ||grad g_loss|| at the decoder's last layer (Esser et al., taming), detached."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


def model_terms(model: nn.Module, x: Tensor, recon: Tensor, posterior) -> dict[str, Tensor]:
    """The model-specific hook (see the module docstring); ``{}`` for plain VAEs."""
    hook = getattr(model, "training_losses", None)
    if callable(hook):
        return dict(hook(x, recon, posterior))
    fn = EXTRA_LOSSES.get(getattr(model, "family", ""))
    return dict(fn(model, x, recon, posterior)) if fn is not None else {}


class VAELoss(nn.Module):
    """Generator-side loss: recon + lpips + kl + adaptive-weighted hinge GAN + model terms."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.lpips = None
        if cfg.lpips_weight > 0:
            from .lpips import LPIPS

            self.lpips = LPIPS.from_files(cfg.lpips_vgg, cfg.lpips_lin)
        self.compat = None
        if cfg.compat_weight > 0:
            from .compat import CompatibilityLoss

            self.compat = CompatibilityLoss.from_path(cfg.image_vae, cfg.compat_weight, cfg.compat_side)

    def nll(self, x: Tensor, recon: Tensor, terms: dict[str, Tensor] | None = None) -> Tensor:
        """Weighted reconstruction (+ LPIPS) loss; fills ``terms`` with the unweighted parts."""
        from .lpips import lpips_video

        cfg = self.cfg
        rec = recon_loss(x, recon, cfg.recon, cfg.charbonnier_eps)
        out = cfg.recon_weight * rec
        if terms is not None:
            terms["recon"] = rec
        if self.lpips is not None:
            lp = lpips_video(self.lpips, x.float(), recon.float())
            out = out + cfg.lpips_weight * lp
            if terms is not None:
                terms["lpips"] = lp
        return out

    def forward(self, model: nn.Module, x: Tensor, recon: Tensor, posterior, disc: nn.Module | None,
                replay: Callable[[], tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, dict[str, float]]:
        """``disc`` is None before ``disc_start``. ``replay()`` re-runs only the decoder's last layer on
        its (detached) input and returns ``(recon_again, last_layer_weight)``: the adaptive GAN weight
        takes its gradient norms on that small separate graph, so the main graph (and any hooks a
        training engine put on its outputs) sees exactly one backward. Returns (total, terms)."""
        terms: dict[str, Tensor] = {}
        total = self.nll(x, recon, terms)
        return self._finish(model, x, recon, posterior, disc, replay, total, terms)

    def joint(self, model: nn.Module, x: Tensor, out, disc: nn.Module | None,
              replay: Callable[[], tuple[Tensor, Tensor]] | None, discrete_weight: float
              ) -> tuple[Tensor, dict[str, float]]:
        """The joint continuous/discrete objective of OneVAE on one encoding (``out``: the model's
        ``JointOutput`` with ``recon``, ``recon_discrete``, ``posterior``):
        ``continuous_weight * nll(recon) + discrete_weight * nll(recon_discrete) + KL + GAN``. The GAN
        term (and its adaptive weight, through ``replay``) acts on the discrete reconstruction, the
        path it is meant to sharpen; the model decodes it last so ``replay`` sees its decoder input.
        Terms of the discrete path are logged with a ``_discrete`` suffix."""
        terms: dict[str, Tensor] = {}
        discrete: dict[str, Tensor] = {}
        total = self.cfg.continuous_weight * self.nll(x, out.recon, terms)
        total = total + discrete_weight * self.nll(x, out.recon_discrete, discrete)
        terms.update({f"{k}_discrete": v for k, v in discrete.items()})
        terms["discrete_weight"] = torch.tensor(float(discrete_weight))
        return self._finish(model, x, out.recon_discrete, out.posterior, disc, replay, total, terms)

    def _finish(self, model: nn.Module, x: Tensor, recon: Tensor, posterior, disc: nn.Module | None,
                replay, total: Tensor, terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Add KL, the adaptive-weighted GAN term on ``recon`` and the model-specific terms."""
        cfg = self.cfg
        kl = kl_loss(posterior)
        terms["kl"] = kl
        total = total + cfg.kl_weight * kl
        if disc is not None and cfg.disc_weight > 0:
            g = hinge_g_loss(disc(recon))
            if replay is not None:
                again, weight = replay()
                w = adaptive_weight(self.nll(x, again), hinge_g_loss(disc(again)), weight, cfg.adaptive_weight_max)
            else:
                w = torch.tensor(1.0)
            terms["gan"] = g
            terms["gan_weight"] = w
            total = total + cfg.disc_weight * w * g
        extra = model_terms(model, x, recon, posterior)
        if self.compat is not None:
            extra.update(self.compat(model, x, posterior))
        for name, value in extra.items():
            terms[name] = value
            total = total + value
        terms["total"] = total
        return total, {k: float(v.detach()) for k, v in terms.items()}


def discrete_weight_at(cfg: LossConfig, step: int) -> float:
    """The discrete path's weight at optimizer step ``step``: ``discrete_weight``, ramped linearly
    from 0 over ``discrete_ramp_steps`` (progressive continuous -> discrete training)."""
    if cfg.discrete_ramp_steps <= 0:
        return cfg.discrete_weight
    return cfg.discrete_weight * min(1.0, step / cfg.discrete_ramp_steps)


def disc_loss(disc: nn.Module, x: Tensor, recon: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Hinge loss of the discriminator on real ``x`` vs detached ``recon`` (one forward over both, so a
    training engine sees one forward per backward; the discriminator has no batch statistics)."""
    real, fake = disc(torch.cat([x.detach(), recon.detach().to(x.dtype)])).chunk(2)
    loss = hinge_d_loss(real, fake)
    return loss, {"d_loss": float(loss.detach()), "logits_real": float(real.detach().mean()),
                  "logits_fake": float(fake.detach().mean())}
