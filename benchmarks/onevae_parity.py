"""Parity of ``videovae.models.onevae`` with diffusers' ``AutoencoderKLWan`` (not a test).

Builds an AutoencoderKLWan (the reduced test layout, or with ``--full`` the released Wan 2.1
layout: 96 x [1, 2, 4, 4], z=16), randomises every weight (RMS gammas included), converts it with
``convert_wan`` and prints the max |difference| of the posterior mean and of the decoded video
(ours clamped to [-1, 1] like diffusers) for: the whole clip, diffusers' chunk schedule through our
cache (encode 1, 4, 4 frames; decode one latent at a time), and our engine (chunked, tiled). Then
our own exactness: chunked vs whole clip and tiled vs untiled. fp32, CPU.

Usage::

    python benchmarks/onevae_parity.py [--full] [--frames 9] [--size 64x96] [--video PATH]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F

from videovae.layers import CausalCache
from videovae.models.onevae import convert_wan

SMALL = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
         "temperal_downsample": [False, True, True], "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}


def randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim > 1:
                p.copy_(0.5 * noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * noise)


def clip(frames: int, height: int, width: int, video: str | None) -> torch.Tensor:
    if video:
        from videovae.io import read_video

        data, _ = read_video(video, max_frames=frames)
    else:
        from videovae.synthetic import synthetic_video

        data = synthetic_video(frames, 270, 480, seed=3)
    x = data.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)
    return F.interpolate(x, size=(height, width), mode="area").unsqueeze(0).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the released Wan 2.1 layout (126.9 M parameters)")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", default="64x96", help="HxW, multiples of 8")
    parser.add_argument("--video", default=None, help="real frames from this video (default: synthetic)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKLWan

    height, width = (int(v) for v in args.size.split("x"))
    reference = AutoencoderKLWan(**({} if args.full else SMALL)).eval()
    randomise(reference, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp, safe_serialization=True)
        ours = convert_wan(tmp)
    x = clip(args.frames, height, width, args.video)
    rows: list[tuple[str, float, float]] = []

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        assert a.shape == b.shape, (a.shape, b.shape)
        return (a.float() - b.float()).abs().max().item()

    with torch.no_grad():
        mean = reference.encode(x).latent_dist.mean
        video = reference.decode(mean).sample
        ours_mean = ours.encode(x).mean
        ours_video = ours.decode(mean)
        rows.append(("whole clip", diff(ours_mean, mean), diff(ours_video.clamp(-1, 1), video)))
        cache, parts = CausalCache(), []
        for a in range(0, args.frames, 4):
            lo, hi = (0, 1) if a == 0 else (a - 3, a + 1)
            m, cache = ours.encode_chunk(x[:, :, lo:hi], cache)
            parts.append(m)
        chunk_mean = ours.posterior(torch.cat(parts, dim=2)).mean
        cache, frames = CausalCache(), []
        for i in range(mean.shape[2]):
            y, cache = ours.decode_chunk(mean[:, :, i : i + 1], cache)
            frames.append(y)
        rows.append(("diffusers schedule (1,4,4.. / 1 latent)", diff(chunk_mean, mean),
                     diff(torch.cat(frames, dim=2).clamp(-1, 1), video)))
        tile = 32 if (height > 32 or width > 32) else 16
        for options in (dict(chunk_frames=4), dict(chunk_frames=4, tile=tile), dict(chunk_frames=0, tile=tile)):
            result = ours.encode_video(x, **options)
            dec = ours.decode_video(mean, result.geometry, **options)
            rows.append((f"engine {options}", diff(result.mean, mean), diff(dec.clamp(-1, 1), video)))
        print(f"layout: {'Wan 2.1 (full)' if args.full else 'reduced'}; clip {tuple(x.shape)}; "
              f"|mean| max {mean.abs().max().item():.3f}; decoded values inside [-1, 1]: "
              f"{(ours_video.abs() <= 1).float().mean().item():.1%}")
        print(f"{'vs diffusers AutoencoderKLWan':<48} {'mean':>10} {'video':>10}")
        for name, a, b in rows:
            print(f"{name:<48} {a:>10.2e} {b:>10.2e}")
        print(f"{'ours: chunked/tiled vs our whole clip':<48} {'mean':>10} {'video':>10}")
        for options in (dict(chunk_frames=4), dict(chunk_frames=8, tile=tile)):
            a = diff(ours.encode_video(x, **options).mean, ours_mean)
            b = diff(ours.decode_video(ours_mean, **options), ours.decode(ours_mean))
            print(f"{str(options):<48} {a:>10.2e} {b:>10.2e}")


if __name__ == "__main__":
    main()
