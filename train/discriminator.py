"""3D PatchGAN discriminator for videos.

Input: NCTHW video in [-1, 1]; output: ``(N, 1, t', h', w')`` patch logits. Strided (3, 4, 4) convolutions
(time halved by the first two, H and W by all but the last), GroupNorm (no BatchNorm, so the statistics
never depend on the data-parallel split) and LeakyReLU(0.2), like the 2D PatchGAN of taming/SD-VAE
extended to time.
"""

from __future__ import annotations

from torch import Tensor, nn


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if c % g == 0:
            return g
    return 1


class PatchDiscriminator3D(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 3):
        super().__init__()
        k = (3, 4, 4)
        blocks: list[nn.Module] = [nn.Conv3d(in_channels, channels, k, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            nc = channels * min(2**i, 8)
            s = 2 if i < layers else 1
            stride = (2 if i == 1 else 1, s, s)
            blocks += [nn.Conv3d(c, nc, k, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(_groups(nc), nc), nn.LeakyReLU(0.2)]
            c = nc
        blocks.append(nn.Conv3d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)
        self.apply(_init)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, T, H, W) in [-1, 1] (any T >= 1, H, W >= 2**layers * 2) -> (N, 1, t', h', w') logits."""
        return self.net(x)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv3d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
