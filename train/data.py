"""Training data: random clips from a folder (or list file) of videos and images.

Every sample is a float32 ``(3, T, S, S)`` tensor in ``[-1, 1]`` (a batch is NCTHW). Sample ``n`` of a
rank is a pure function of ``(seed, rank, n)``: which file, the start frame, the temporal stride
(1..max_stride), the crop (side drawn from [crop_scale_min, crop_scale_max] of the short side, random
position) — so resuming only needs the per-rank sample counter, whatever the number of DataLoader
workers.
Images are 1-frame clips; whether a batch is made of images is drawn per batch (``image_ratio``), so
every batch has one clip length. Videos are decoded with decord when it is installed (random access),
else with PyAV (sequential decode up to the last needed frame, with a small per-worker cache).
A file that fails to decode is logged with a warning and never used again by that worker; the
sample is redrawn from the other files.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from videovae.io import VideoIOError, VideoReader, probe, read_image

log = logging.getLogger("videovae.train")

VIDEO_EXTS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".gif"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_RETRIES = 16


class DataError(ValueError):
    """No usable training data (the message says where it looked)."""


def _kind(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def find_media(paths: list[str]) -> tuple[list[str], list[str]]:
    """Expand folders (recursively, sorted), ``.txt`` list files (one path per line, ``#`` comments,
    relative to the list's folder) and plain files into (videos, images)."""
    videos: list[str] = []
    images: list[str] = []

    def add(path: str, explicit: bool) -> None:
        kind = _kind(path)
        if kind == "video":
            videos.append(path)
        elif kind == "image":
            images.append(path)
        elif explicit:
            raise DataError(f"{path}: not a video or image file (known extensions: "
                            f"{', '.join(sorted(VIDEO_EXTS | IMAGE_EXTS))})")

    for entry in paths:
        if os.path.isdir(entry):
            for root, dirs, files in os.walk(entry):
                dirs.sort()
                for name in sorted(files):
                    if not name.startswith("."):
                        add(os.path.join(root, name), False)
        elif entry.endswith(".txt") and os.path.isfile(entry):
            base = os.path.dirname(os.path.abspath(entry))
            with open(entry, encoding="utf-8") as f:
                for line in f:
                    line = line.split("#", 1)[0].strip()
                    if line:
                        p = line if os.path.isabs(line) else os.path.join(base, line)
                        if not os.path.isfile(p):
                            raise DataError(f"{entry}: listed file not found: {p}")
                        add(p, True)
        elif os.path.isfile(entry):
            add(entry, True)
        else:
            raise DataError(f"{entry}: no such file or folder")
    return videos, images


def _decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def _random_resized_crop(frames: torch.Tensor, size: int, rng: np.random.Generator, scale_min: float,
                         scale_max: float) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, size, size) in [-1, 1] via a random square crop (side drawn
    from [scale_min, scale_max] of the short side) + resize."""
    t, h, w, _ = frames.shape
    short = min(h, w)
    side = max(1, int(round(short * rng.uniform(scale_min, scale_max))))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    crop = frames[:, y0:y0 + side, x0:x0 + side].permute(0, 3, 1, 2).float()  # (T, 3, s, s)
    if side != size:
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
    x = crop.permute(1, 0, 2, 3) / 127.5 - 1.0
    return x.clamp(-1.0, 1.0).contiguous()


def shrink_frames(frames: torch.Tensor, short_side: int) -> torch.Tensor:
    """Resize uint8 (T, H, W, 3) so min(H, W) <= short_side (no-op when already small or 0)."""
    t, h, w, _ = frames.shape
    if short_side <= 0 or min(h, w) <= short_side:
        return frames
    scale = short_side / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(nh, nw), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class ClipDataset(Dataset):
    """Random training clips; ``dataset[n]`` is sample ``n`` of this rank: ``float32 (3, T, S, S)``."""

    def __init__(self, paths: list[str], *, num_frames: int, size: int, max_stride: int = 1,
                 crop_scale_min: float = 1.0, crop_scale_max: float = 1.0, image_ratio: float = 0.0,
                 batch_size: int = 1, seed: int = 0, rank: int = 0, backend: str = "auto",
                 decode_short_side: int = 0, cache_mb: int = 256, max_video_frames: int = 2048):
        if not 0.0 < crop_scale_min <= crop_scale_max <= 1.0:
            raise ValueError(f"crop scales must satisfy 0 < min <= max <= 1, got min={crop_scale_min} "
                             f"max={crop_scale_max}")
        videos, images = find_media(paths)
        self.num_frames, self.size, self.max_stride = num_frames, size, max_stride
        self.crop_scale_min, self.crop_scale_max = crop_scale_min, crop_scale_max
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.decode_short_side, self.cache_bytes = decode_short_side, cache_mb * 2**20
        self.max_video_frames = max_video_frames
        if backend == "auto":
            backend = "decord" if _decord_available() else "pyav"
        elif backend == "decord" and not _decord_available():
            raise DataError("data.backend=decord but decord is not installed (pip install videovae[decord])")
        self.backend = backend
        self.videos: list[str] = []
        self.lengths: dict[str, int | None] = {}
        self.pixels: dict[str, int] = {}
        for path in videos:
            try:
                info = probe(path)
            except VideoIOError as err:
                log.warning("skipping unreadable video %s", err)
                continue
            self.videos.append(path)
            self.lengths[path] = info.num_frames
            h, w, s = info.height, info.width, decode_short_side
            if s > 0 and min(h, w) > s:
                h, w = round(h * s / min(h, w)), round(w * s / min(h, w))
            self.pixels[path] = h * w
        self.images = images
        if not self.videos and not self.images:
            raise DataError(f"no readable videos or images in {paths}")
        self.image_ratio = image_ratio if self.images else 0.0
        if not self.videos:
            self.image_ratio = 1.0
            if num_frames != 1:
                log.warning("no videos found: training on images only (1-frame clips), data.num_frames ignored")
        self.bad: set[str] = set()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return 2**62  # infinite stream; the sampler decides the indices

    def batch_is_images(self, n: int) -> bool:
        if self.image_ratio <= 0:
            return False
        if self.image_ratio >= 1:
            return True
        rng = np.random.default_rng([self.seed, self.rank, n // self.batch_size, 1])
        return bool(rng.random() < self.image_ratio)

    def __getitem__(self, n: int) -> torch.Tensor:
        images = self.batch_is_images(n)
        for attempt in range(_RETRIES):
            rng = np.random.default_rng([self.seed, self.rank, int(n), 0, attempt])
            pool = [p for p in (self.images if images else self.videos) if p not in self.bad]
            if not pool:
                break
            path = pool[int(rng.integers(len(pool)))]
            try:
                frames = self._read_image(path) if images else self._read_clip(path, rng)
            except (VideoIOError, RuntimeError, OSError, ValueError) as err:
                self.bad.add(path)
                self._cache.pop(path, None)
                log.warning("skipping %s: it failed to decode (%s)", path, err)
                continue
            return _random_resized_crop(frames, self.size, rng, self.crop_scale_min, self.crop_scale_max)
        raise DataError(f"no decodable {'images' if images else 'videos'} left (failed: {sorted(self.bad)})")

    # --- decoding -------------------------------------------------------------------------------------
    def _read_image(self, path: str) -> torch.Tensor:
        cached = self._cache.get(path)
        if cached is None:
            cached = self._remember(path, shrink_frames(read_image(path), self.decode_short_side))
        return cached

    def _remember(self, path: str, frames: torch.Tensor) -> torch.Tensor:
        nbytes = frames.numel()
        if nbytes <= self.cache_bytes:
            self._cache[path] = frames
            self._cache.move_to_end(path)
            while sum(v.numel() for v in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)
        return frames

    def _clip_indices(self, length: int, rng: np.random.Generator) -> list[int]:
        t = self.num_frames
        max_stride = max(1, min(self.max_stride, (length - 1) // max(1, t - 1) if t > 1 else 1))
        stride = int(rng.integers(1, max_stride + 1))
        span = (t - 1) * stride + 1
        start = int(rng.integers(0, max(1, length - span + 1)))
        return [min(start + i * stride, length - 1) for i in range(t)]  # short videos repeat the last frame

    def _read_clip(self, path: str, rng: np.random.Generator) -> torch.Tensor:
        if self.backend == "decord":
            return self._read_clip_decord(path, rng)
        frames = self._cache.get(path)
        if frames is None:
            limit = self.max_video_frames
            known = self.lengths.get(path)
            full = known is not None and min(known, limit) * 3 * self.pixels[path] <= self.cache_bytes
            if not full and known is not None:
                # too large to keep: decode only up to the clip's last frame
                idx = self._clip_indices(min(known, limit), rng)
                with VideoReader(path, max_frames=idx[-1] + 1) as reader:
                    part = shrink_frames(reader.read_all(), self.decode_short_side)
                return part[[min(i, part.shape[0] - 1) for i in idx]]
            with VideoReader(path, max_frames=limit) as reader:
                frames = self._remember(path, shrink_frames(reader.read_all(), self.decode_short_side))
        idx = self._clip_indices(frames.shape[0], rng)
        return frames[idx]

    def _read_clip_decord(self, path: str, rng: np.random.Generator) -> torch.Tensor:
        import decord

        try:
            vr = decord.VideoReader(path, num_threads=1)
            length = min(len(vr), self.max_video_frames)
            idx = self._clip_indices(length, rng)
            frames = torch.from_numpy(vr.get_batch(idx).asnumpy())
        except Exception as err:  # decord raises DECORDError / RuntimeError
            raise VideoIOError(f"{path}: decord cannot read this video ({err})") from err
        return shrink_frames(frames, self.decode_short_side)

    def validation_clips(self, count: int) -> list[torch.Tensor]:
        """A fixed set of ``count`` clips (same seed -> same clips), each ``(3, T, S, S)``."""
        saved = self.rank, self.seed
        self.rank, self.seed = 10**6, self.seed + 7919
        try:
            return [self[i * self.batch_size] for i in range(count)]
        finally:
            self.rank, self.seed = saved


class CounterSampler(Sampler[int]):
    """Yields sample indices ``start, start + 1, ...`` (an endless stream for one rank)."""

    def __init__(self, start: int = 0):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        n = self.start
        while True:
            yield n
            n += 1

    def __len__(self) -> int:
        return 2**62


def make_loader(dataset: ClipDataset, batch_size: int, start: int, num_workers: int) -> torch.utils.data.DataLoader:
    """DataLoader over samples ``start, start + 1, ...`` of this rank, in batches of ``batch_size``."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=CounterSampler(start),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        drop_last=True,
    )
