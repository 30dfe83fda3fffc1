"""LPIPS (Zhang et al. 2018) with a VGG16 backbone, loaded only from local weight files.

Nothing is downloaded: the user gives two files, each a PyTorch state dict (``.pth``/``.pt``, loaded
with ``weights_only=True``) or a ``.safetensors`` file:

* ``vgg``: VGG16 convolution weights under torchvision's names ``features.{0,2,5,...,28}.{weight,bias}``
  (a full torchvision ``vgg16`` state dict works; classifier keys are ignored);
* ``lin``: the LPIPS linear heads ``lin{0..4}.model.1.weight`` (the ``vgg.pth`` of the lpips package).

Input: two ``(N, 3, H, W)`` images in ``[-1, 1]``; output: ``(N,)`` distances. :func:`lpips_video`
applies it per frame to NCTHW videos.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
_CHANNELS = (64, 128, 256, 512, 512)


class LPIPSWeightsError(FileNotFoundError):
    """Missing or unusable LPIPS weights (the message names the file)."""


def _load_state(path: str | os.PathLike | None, what: str) -> dict[str, Tensor]:
    if not path:
        raise LPIPSWeightsError(f"LPIPS needs local {what} weights; give the file path (nothing is downloaded)")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LPIPSWeightsError(f"LPIPS {what} weights not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load / safetensors raise many kinds
        raise LPIPSWeightsError(f"{path}: cannot read LPIPS {what} weights ({err})") from err
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"{path}: expected a state dict of tensors")
    return state


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance. ``LPIPS()`` has random weights (for tests); use :meth:`from_files`."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, vgg: str | os.PathLike | None, lin: str | os.PathLike | None) -> LPIPS:
        model = cls()
        vgg_state = {k: v for k, v in _load_state(vgg, "VGG16").items() if k.startswith("features.")}
        own = model.features.state_dict()
        feats = {k.removeprefix("features."): v for k, v in vgg_state.items()}
        missing = sorted(set(own) - set(feats))
        if missing:
            raise LPIPSWeightsError(f"{vgg}: not VGG16 feature weights (missing features.{missing[0]}, ...)")
        model.features.load_state_dict({k: feats[k] for k in own})
        lin_state = _load_state(lin, "linear-head")
        for i, conv in enumerate(model.lins):
            key = f"lin{i}.model.1.weight"
            if key not in lin_state:
                raise LPIPSWeightsError(f"{lin}: not LPIPS linear heads (missing {key})")
            conv.weight.data.copy_(lin_state[key].reshape(conv.weight.shape))
        return model

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always frozen, eval mode

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """a, b: (N, 3, H, W) in [-1, 1] -> (N,) perceptual distance."""
        h = torch.cat([a, b]).sub(self.shift).div(self.scale)
        total = 0.0
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == _TAPS[tap]:
                fa, fb = h.chunk(2)
                fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[tap]((fa - fb).pow(2)).mean(dim=(1, 2, 3))
                tap += 1
                if tap == len(_TAPS):
                    break
        return total


def lpips_video(net: LPIPS, x: Tensor, y: Tensor) -> Tensor:
    """Mean LPIPS over all frames of NCTHW videos in [-1, 1] (a scalar)."""
    n, c, t, h, w = x.shape
    fx = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    fy = y.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    return net(fx, fy).mean()
