"""Latent regularisation against a frozen 2D image VAE (CV-VAE's compatibility term).

The 3D latent of a video should stay in the latent space of an image VAE (SD 2.1, SD3, ...), so
that its frames decode as images. Latent frame 0 covers video frame 0; latent frame k >= 1 covers
frames ``1 + (k - 1) t .. k t`` (t = the time factor).

* ``side='decoder'`` (the paper's choice): decode every latent frame with the frozen image
  decoder and compare (L1) with video frame 0 and, for each later latent frame, one frame drawn at
  random from its group of t frames.
* ``side='encoder'``: encode those frames with the frozen image encoder (latent mean) and compare
  (L1) with the 3D latent.

Videos are NCTHW in [-1, 1]; latents unscaled. The image VAE is read from a local diffusers
``AutoencoderKL`` folder or ``.safetensors`` file, never downloaded, and run by
:class:`videovae.models.cvvae.ImageVAE` (the image VAE's numbers, no diffusers needed).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from videovae.metrics import psnr
from videovae.models.cvvae import ImageVAE, load_image_vae

SIDES = ("decoder", "encoder")


def group_frames(latent_frames: int, time_factor: int, generator: torch.Generator | None = None,
                 random: bool = True) -> list[int]:
    """Video frame matched with each latent frame: 0, then one frame of each group of
    ``time_factor`` (drawn at random, or the group's last frame when ``random`` is False)."""
    picks = [0]
    for k in range(1, latent_frames):
        offset = int(torch.randint(time_factor, (1,), generator=generator)) if random else time_factor - 1
        picks.append(1 + (k - 1) * time_factor + offset)
    return picks


def _frames(x: Tensor, index: list[int]) -> Tensor:
    """(N, C, T, H, W) and T' frame indices -> (N * T', C, H, W), batch-major."""
    return x[:, :, index].transpose(1, 2).flatten(0, 1)


class CompatibilityLoss(nn.Module):
    """``weight * L1`` between the 3D model's latent and the image VAE (see the module docstring)."""

    def __init__(self, image_vae: ImageVAE, weight: float, side: str = "decoder"):
        super().__init__()
        if side not in SIDES:
            raise ValueError(f"compatibility side must be one of {SIDES}, got {side!r}")
        self.image_vae = image_vae.eval().requires_grad_(False)
        self.weight = weight
        self.side = side

    @classmethod
    def from_path(cls, path: str, weight: float, side: str = "decoder") -> CompatibilityLoss:
        return cls(ImageVAE(load_image_vae(path)), weight, side)

    def train(self, mode: bool = True) -> CompatibilityLoss:
        super().train(mode)
        self.image_vae.eval()  # frozen: always in eval mode
        return self

    def check_model(self, model: nn.Module) -> None:
        """Raise a clear error unless the model's latent fits the image VAE."""
        if model.latent_channels != self.image_vae.latent_channels or model.space_factor != 8:
            raise ValueError(
                f"the image VAE ({self.image_vae.latent_channels} latent channels, 8x spatial) does not fit "
                f"the model ({model.latent_channels} channels, {model.space_factor}x)"
            )

    def forward(self, model: nn.Module, x: Tensor, posterior) -> dict[str, Tensor]:
        z = posterior.mean
        index = group_frames(z.shape[2], model.time_factor)
        latents = _frames(z, list(range(z.shape[2]))).float()
        if self.side == "decoder":
            images = self.image_vae.decode(latents)
            loss = (images - _frames(x, index).float()).abs().mean()
        else:
            with torch.no_grad():
                target = self.image_vae.encode(_frames(x, index).float())
            loss = (latents - target).abs().mean()
        return {"compat": self.weight * loss}

    @torch.no_grad()
    def compatibility_psnr(self, model: nn.Module, x: Tensor) -> float:
        """PSNR (dB) of the image-VAE-decoded posterior-mean latents against the matching frames
        (frame 0 and the last frame of each group): the compatibility figure."""
        z = model.encode(x).mean
        index = group_frames(z.shape[2], model.time_factor, random=False)
        images = self.image_vae.decode(_frames(z, list(range(z.shape[2]))).float()).clamp(-1, 1)
        return float(psnr(_frames(x, index).float().unsqueeze(2), images.unsqueeze(2)).clamp(max=100).mean())
