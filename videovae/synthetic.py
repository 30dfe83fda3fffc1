"""Deterministic synthetic test videos.

The clips look roughly natural: a smooth coloured background texture (a sum of low-frequency
sinusoids plus a finer octave) that pans slowly, and 2-4 textured shapes (discs and rotating
rectangles with soft edges and their own stripes) moving along smooth Lissajous trajectories at
different speeds. Output frames are ``uint8 (T, H, W, 3)`` RGB tensors, the I/O layout of
:mod:`videovae.io`. The same arguments always give the same video, whether it is generated in one go
(:func:`synthetic_video`) or in chunks (:func:`synthetic_frames`).

Motion is defined in seconds (``fps`` sets the sampling), and spatial frequencies relative to the
frame size, so the clip looks alike at any resolution.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["camera_motion_video", "synthetic_frames", "synthetic_video", "write_synthetic_video"]


@dataclass(frozen=True)
class _Wave:
    kx: float  # radians per unit of normalised coordinate
    ky: float
    phase: float
    color: np.ndarray  # (3,) amplitude per RGB channel


@dataclass(frozen=True)
class _Shape:
    kind: str  # "disc" or "rect"
    center: np.ndarray  # (2,) rest position (x, y), normalised
    amp: np.ndarray  # (2,) trajectory amplitude
    omega: np.ndarray  # (2,) angular speed per second
    phase: np.ndarray  # (2,)
    size: float  # radius or half width, normalised
    aspect: float  # rect half height / half width
    spin: float  # rect rotation speed, radians per second
    base: np.ndarray  # (3,) mean colour 0..255
    stripe: np.ndarray  # (3,) stripe colour amplitude
    stripe_k: float
    stripe_angle: float


@dataclass(frozen=True)
class _Scene:
    height: int
    width: int
    fps: float
    mean: np.ndarray  # (3,)
    pan: np.ndarray  # (2,) background velocity, normalised units per second
    waves: tuple[_Wave, ...]
    shapes: tuple[_Shape, ...]


def _make_scene(height: int, width: int, seed: int, fps: float) -> _Scene:
    if height < 1 or width < 1:
        raise ValueError(f"synthetic video needs height, width >= 1, got {height}x{width}")
    if fps <= 0:
        raise ValueError(f"synthetic video needs fps > 0, got {fps}")
    rng = np.random.default_rng(seed)
    waves = []
    octaves = ((4, 2.0, 7.0, 36.0), (5, 12.0, 30.0, 12.0), (6, 40.0, 110.0, 5.0))  # count, k range, amplitude
    for octave, (count, kmin, kmax, amp) in enumerate(octaves):
        for _ in range(count):
            k = rng.uniform(kmin, kmax)
            ang = rng.uniform(0, 2 * np.pi)
            color = rng.uniform(0.3, 1.0, 3) * amp * (1.0 if octave else rng.uniform(0.6, 1.0))
            waves.append(_Wave(k * np.cos(ang), k * np.sin(ang), rng.uniform(0, 2 * np.pi), color))
    ang = rng.uniform(0, 2 * np.pi)
    pan = rng.uniform(0.02, 0.06) * np.array([np.cos(ang), np.sin(ang)])
    shapes = []
    for i in range(int(rng.integers(2, 5))):
        shapes.append(
            _Shape(
                kind="disc" if i % 2 == 0 else "rect",
                center=rng.uniform(0.3, 0.7, 2),
                amp=rng.uniform(0.1, 0.3, 2),
                omega=rng.uniform(0.3, 1.5, 2) * (1 + 0.5 * i),
                phase=rng.uniform(0, 2 * np.pi, 2),
                size=rng.uniform(0.08, 0.18),
                aspect=rng.uniform(0.5, 1.0),
                spin=rng.uniform(-0.8, 0.8),
                base=rng.uniform(40, 215, 3),
                stripe=rng.uniform(10, 40, 3),
                stripe_k=rng.uniform(30, 70),
                stripe_angle=rng.uniform(0, np.pi),
            )
        )
    return _Scene(height, width, float(fps), rng.uniform(100, 156, 3), pan, tuple(waves), tuple(shapes))


def _render(scene: _Scene, index: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Render frame ``index`` as float32 (H, W, 3) in 0..255 (before quantisation).

    ``x`` (W,) and ``y`` (H,) are the normalised pixel-centre coordinates. The background waves are
    separable (``sin(a + b) = sin a cos b + cos a sin b``), so it is one small matrix product per frame;
    each shape is only evaluated inside its bounding box.
    """
    t = index / scene.fps
    bx = x - scene.pan[0] * t
    by = y - scene.pan[1] * t
    kx = np.array([w.kx for w in scene.waves])
    ky = np.array([w.ky for w in scene.waves])
    ph = np.array([w.phase for w in scene.waves])
    colors = np.stack([w.color for w in scene.waves])  # (K, 3)
    ax = np.outer(kx, bx) + ph[:, None]  # (K, W)
    ay = np.outer(by, ky)  # (H, K)
    left = np.concatenate([np.cos(ay), np.sin(ay)], axis=1)  # (H, 2K)
    right = np.concatenate([np.sin(ax), np.cos(ax)], axis=0)  # (2K, W)
    img = np.empty((scene.height, scene.width, 3), np.float32)
    for c in range(3):
        weights = np.concatenate([colors[:, c], colors[:, c]])[:, None]
        img[..., c] = scene.mean[c] + left @ (weights * right)
    scale = max(scene.height, scene.width)
    edge = 1.5 / scale  # soft edge width, about 1.5 pixels
    for s in scene.shapes:
        cx, cy = s.center + s.amp * np.sin(s.omega * t + s.phase)
        reach = s.size * (np.sqrt(1 + s.aspect**2) if s.kind == "rect" else 1.0) + 12 * edge
        x0, x1 = np.searchsorted(x, [cx - reach, cx + reach])
        y0, y1 = np.searchsorted(y, [cy - reach, cy + reach])
        if x0 >= x1 or y0 >= y1:
            continue
        dx = (x[x0:x1] - cx)[None, :]
        dy = (y[y0:y1] - cy)[:, None]
        if s.kind == "disc":
            dist = np.sqrt(dx * dx + dy * dy) - s.size
            u, v = dx + 0 * dy, dy + 0 * dx
        else:
            rot = s.spin * t
            c, sn = np.cos(rot), np.sin(rot)
            u, v = c * dx + sn * dy, -sn * dx + c * dy
            dist = np.maximum(np.abs(u) - s.size, np.abs(v) - s.size * s.aspect)
        alpha = (1.0 / (1.0 + np.exp(np.clip(dist / edge, -30, 30)))).astype(np.float32)[..., None]
        sa = s.stripe_angle
        tex = np.sin(s.stripe_k * (np.cos(sa) * u + np.sin(sa) * v)).astype(np.float32)[..., None]
        fill = s.base.astype(np.float32) + tex * s.stripe.astype(np.float32)
        patch = img[y0:y1, x0:x1]
        patch += alpha * (fill - patch)
    return img


def synthetic_frames(
    num_frames: int, height: int, width: int, *, seed: int = 0, fps: float = 24.0, chunk_frames: int = 16
) -> Iterator[torch.Tensor]:
    """Yield the frames of :func:`synthetic_video` as ``uint8 (t, H, W, 3)`` chunks, ``t <= chunk_frames``.

    The concatenation of the chunks equals ``synthetic_video(num_frames, height, width, seed=seed,
    fps=fps)``; only one chunk is held at a time.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    scene = _make_scene(height, width, seed, fps)
    scale = float(max(height, width))
    x = (np.arange(width) + 0.5) / scale
    y = (np.arange(height) + 0.5) / scale
    for start in range(0, num_frames, chunk_frames):
        n = min(chunk_frames, num_frames - start)
        out = np.empty((n, height, width, 3), np.uint8)
        for j in range(n):
            img = _render(scene, start + j, x, y)
            out[j] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        yield torch.from_numpy(out)


def synthetic_video(
    num_frames: int, height: int, width: int, *, seed: int = 0, fps: float = 24.0
) -> torch.Tensor:
    """A deterministic, natural-looking clip: ``uint8 (T, H, W, 3)`` RGB, values 0..255.

    Same arguments -> identical output. ``fps`` only sets how far the content moves between frames
    (motion is defined per second).
    """
    chunks = list(synthetic_frames(num_frames, height, width, seed=seed, fps=fps, chunk_frames=64))
    if not chunks:
        return torch.empty((0, height, width, 3), dtype=torch.uint8)
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def write_synthetic_video(
    path: str | os.PathLike,
    num_frames: int,
    height: int,
    width: int,
    *,
    seed: int = 0,
    fps: float = 24.0,
    **writer_kw,
) -> str:
    """Render a synthetic clip chunk by chunk into ``path`` with :class:`videovae.io.VideoWriter`.

    ``writer_kw`` (``crf``, ``codec``) goes to the writer. Returns the output path.
    """
    from videovae.io import VideoWriter

    with VideoWriter(path, fps, **writer_kw) as writer:
        for chunk in synthetic_frames(num_frames, height, width, seed=seed, fps=fps):
            writer.write(chunk)
    return writer.path


def camera_motion_video(
    image: torch.Tensor, num_frames: int, height: int, width: int, *, seed: int = 0
) -> torch.Tensor:
    """A clip of a virtual camera moving over a photo: ``uint8 (T, height, width, 3)``.

    ``image`` is ``uint8 (H, W, 3)``. The camera pans between two random points, zooms (view scale
    0.45-0.95 of the photo's short side, start and end drawn separately), rotates up to +-12 degrees
    and ramps the brightness by up to +-15 %, all linearly in time with an ease-in-out profile, and
    samples bilinearly (so every frame is a smooth warp of real content with known motion). Same
    arguments -> identical output.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"camera_motion_video expects uint8 (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    rng = np.random.default_rng(seed)
    ih, iw = image.shape[:2]
    aspect = width / height
    # view half-extent in normalised image coordinates ([-1, 1] spans the image)
    scales = rng.uniform(0.45, 0.95, size=2)
    angles = np.deg2rad(rng.uniform(-12, 12, size=2))
    gains = 1.0 + rng.uniform(-0.15, 0.15, size=2)
    short = min(ih, iw)
    half_h = scales * short / ih  # (2,) half height of the view, in units of image half-height
    half_w = scales * short * aspect / iw
    room_x, room_y = np.clip(1 - half_w, 0, None), np.clip(1 - half_h, 0, None)
    cx = rng.uniform(-1, 1, size=2) * room_x
    cy = rng.uniform(-1, 1, size=2) * room_y
    src = image.permute(2, 0, 1).unsqueeze(0).float()
    ys = torch.linspace(-1, 1, height).view(height, 1).expand(height, width)
    xs = torch.linspace(-1, 1, width).view(1, width).expand(height, width)
    out = torch.empty((num_frames, height, width, 3), dtype=torch.uint8)
    for t in range(num_frames):
        a = 0.0 if num_frames == 1 else t / (num_frames - 1)
        a = 0.5 - 0.5 * np.cos(np.pi * a)  # ease in and out

        def lerp(v: np.ndarray, a: float = a) -> float:
            return float(v[0] + a * (v[1] - v[0]))

        ang, hw, hh = lerp(angles), lerp(half_w), lerp(half_h)
        # rotate the view in pixel units, then back to normalised coordinates
        u, v = xs * hw * iw, ys * hh * ih
        gx = (np.cos(ang) * u - np.sin(ang) * v) / iw + lerp(cx)
        gy = (np.sin(ang) * u + np.cos(ang) * v) / ih + lerp(cy)
        grid = torch.stack([gx, gy], dim=-1).unsqueeze(0).float()
        frame = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="reflection",
                                                align_corners=False)
        out[t] = (frame[0] * lerp(gains)).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return out
