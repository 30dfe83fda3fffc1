"""Video and image I/O.

Frames on the I/O side are ``uint8`` torch tensors shaped ``(T, H, W, 3)`` (RGB, values 0..255).
Inside the models videos are ``float`` tensors shaped ``(N, 3, T, H, W)`` with values in ``[-1, 1]``;
:func:`to_model_range` and :func:`from_model_range` convert between the two.

Reading uses PyAV (FFmpeg), so any container and pixel format FFmpeg decodes works; 8/10-bit,
alpha and grayscale sources are converted to 8-bit RGB (alpha is dropped). Writing picks the format
from the extension:

* ``.mp4``: H.264 (libx264, yuv420p, ``crf``); lossy, needs even width and height.
* ``.mkv``: FFV1 with the ``bgr0`` pixel format; lossless, the RGB round trip is bit-exact.
* a path with no extension or ending in ``/``: a folder of PNGs ``frame_000000.png``, ...

Every output is written atomically: into a temporary file (or folder) next to the destination,
renamed into place only when complete. Every bad input raises :class:`VideoIOError` naming the file.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from .fileutil import atomic_path, temp_beside

__all__ = [
    "VideoIOError",
    "VideoInfo",
    "VideoReader",
    "VideoWriter",
    "from_model_range",
    "probe",
    "read_image",
    "read_video",
    "to_model_range",
    "write_png",
    "write_video",
]

_AV_ERRORS: tuple[type[BaseException], ...] = (av.error.FFmpegError, OSError, EOFError)

# PyAV >= 17 converts pixel formats with swscale slice threads. In a process forked after the parent
# had decoded video (a DataLoader worker of the trainer), freeing such a scaler joins a thread that does
# not exist in the child and hangs for ever (seen with PyAV 18.1.1 / FFmpeg 8.1). One scaling thread
# avoids that; decoding keeps its threads, and converting to rgb24 is cheap next to decoding.
_TO_RGB_OPTIONS: dict[str, int] = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}

# codec name -> pixel format used for encoding
_CODECS: dict[str, str] = {
    "libx264": "yuv420p",
    "libx265": "yuv420p",
    "ffv1": "bgr0",
    "libx264rgb": "rgb24",
    "png": "rgb24",
}
_EXTENSIONS: dict[str, tuple[str, str]] = {  # extension -> (container format, default codec)
    ".mp4": ("mp4", "libx264"),
    ".mkv": ("matroska", "ffv1"),
}
_FRAME_NAME = "frame_{:06d}.png"
_FRAME_RE = re.compile(r"frame_\d{6}\.png")


class VideoIOError(ValueError):
    """A video or image could not be read or written; the message names the file."""


@dataclass(frozen=True)
class VideoInfo:
    """Metadata of the first video stream of a file.

    ``num_frames`` is the frame count stored in the container, ``None`` when the container does not
    record it (e.g. Matroska). ``fps`` is the average frame rate as a float.
    """

    path: str
    width: int
    height: int
    fps: float
    num_frames: int | None
    codec: str
    pix_fmt: str


def _check_input_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoIOError(f"{path}: file not found")
    if os.path.isdir(path):
        raise VideoIOError(f"{path}: is a directory, expected a video file")
    if os.path.getsize(path) == 0:
        raise VideoIOError(f"{path}: file is empty (0 bytes)")


def _open_input(path: str) -> tuple[av.container.InputContainer, av.VideoStream]:
    _check_input_file(path)
    try:
        container = av.open(path, mode="r")
    except _AV_ERRORS as e:
        raise VideoIOError(f"{path}: not a readable video ({e})") from e
    if not container.streams.video:
        container.close()
        raise VideoIOError(f"{path}: no video stream")
    return container, container.streams.video[0]


def _stream_fps(stream: av.VideoStream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    if stream.time_base:
        return float(1 / stream.time_base)
    return 0.0


def _stream_info(path: str, stream: av.VideoStream) -> VideoInfo:
    ctx = stream.codec_context
    fmt = ctx.format
    return VideoInfo(
        path=path,
        width=int(ctx.width),
        height=int(ctx.height),
        fps=_stream_fps(stream),
        num_frames=int(stream.frames) if stream.frames else None,
        codec=ctx.name,
        pix_fmt=fmt.name if fmt is not None else "unknown",
    )


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read the metadata of the first video stream of ``path`` without decoding.

    Raises :class:`VideoIOError` for a missing or empty file, a file FFmpeg cannot open, a file with
    no video stream, or a stream without a frame size.
    """
    path = os.fspath(path)
    container, stream = _open_input(path)
    try:
        info = _stream_info(path, stream)
    finally:
        container.close()
    if info.width <= 0 or info.height <= 0:
        raise VideoIOError(f"{path}: video stream has no frame size")
    return info


class VideoReader:
    """Streaming video reader (context manager).

    ``iter_chunks(n)`` yields ``uint8`` tensors shaped ``(t, H, W, 3)`` (RGB) with ``t <= n``; only one
    chunk is held at a time. A reader is single pass: iterate it once, or call :meth:`read_all`.
    ``max_frames`` stops after that many frames. ``frames_read`` counts the frames yielded so far.

    ``backend="decord"`` uses decord (optional dependency, ``pip install videovae[decord]``).
    Raises :class:`VideoIOError` for unreadable, corrupt or truncated files, and when no frame at all
    could be decoded.
    """

    def __init__(self, path: str | os.PathLike, backend: str = "pyav", max_frames: int | None = None):
        self.path = os.fspath(path)
        if backend not in ("pyav", "decord"):
            raise VideoIOError(f"{self.path}: unknown backend {backend!r}, expected 'pyav' or 'decord'")
        if max_frames is not None and max_frames < 1:
            raise VideoIOError(f"{self.path}: max_frames must be >= 1, got {max_frames}")
        self.backend = backend
        self.max_frames = max_frames
        self.frames_read = 0
        self._started = False
        self._container = None
        self._decord = None
        if backend == "pyav":
            self._container, stream = _open_input(self.path)
            stream.thread_type = "AUTO"
            self._stream = stream
            self.info = _stream_info(self.path, stream)
        else:
            self.info = self._open_decord()
        if self.info.width <= 0 or self.info.height <= 0:
            self.close()
            raise VideoIOError(f"{self.path}: video stream has no frame size")

    def _open_decord(self) -> VideoInfo:
        try:
            import decord
        except ImportError as e:
            raise VideoIOError(
                f"{self.path}: backend 'decord' is not installed; run `pip install videovae[decord]`"
            ) from e
        _check_input_file(self.path)
        try:
            self._decord = decord.VideoReader(self.path, num_threads=0)
            height, width = self._decord[0].shape[:2]
            fps = float(self._decord.get_avg_fps())
        except Exception as e:  # decord raises its own DECORDError and RuntimeError
            raise VideoIOError(f"{self.path}: decord cannot read this video ({e})") from e
        return VideoInfo(self.path, int(width), int(height), fps, len(self._decord), "unknown", "unknown")

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_chunks(1)

    def _frames_pyav(self) -> Iterator[np.ndarray]:
        w, h = self.info.width, self.info.height
        decoded = 0
        try:
            for frame in self._container.decode(self._stream):
                arr = frame.to_ndarray(format="rgb24", width=w, height=h, **_TO_RGB_OPTIONS)
                decoded += 1
                yield arr
        except _AV_ERRORS as e:
            raise VideoIOError(
                f"{self.path}: decoding failed after {decoded} frames, file corrupt or truncated ({e})"
            ) from e

    def _frames_decord(self) -> Iterator[np.ndarray]:
        n = len(self._decord)
        for i in range(n):
            try:
                arr = self._decord[i].asnumpy()
            except Exception as e:
                raise VideoIOError(f"{self.path}: decord failed at frame {i} ({e})") from e
            yield arr

    def iter_chunks(self, chunk_frames: int) -> Iterator[torch.Tensor]:
        """Yield ``uint8 (t, H, W, 3)`` RGB chunks with ``t <= chunk_frames``; the last may be shorter."""
        if chunk_frames < 1:
            raise VideoIOError(f"{self.path}: chunk_frames must be >= 1, got {chunk_frames}")
        if self._started:
            raise VideoIOError(f"{self.path}: reader already consumed (readers are single pass)")
        if self._container is None and self._decord is None:
            raise VideoIOError(f"{self.path}: reader is closed")
        self._started = True
        frames = self._frames_pyav() if self.backend == "pyav" else self._frames_decord()
        buf: list[np.ndarray] = []
        try:
            for arr in frames:
                buf.append(arr)
                if self.max_frames is not None and self.frames_read + len(buf) >= self.max_frames:
                    break
                if len(buf) == chunk_frames:
                    self.frames_read += len(buf)
                    yield torch.from_numpy(np.stack(buf))
                    buf = []
        finally:
            frames.close()
        if buf:
            self.frames_read += len(buf)
            yield torch.from_numpy(np.stack(buf))
        if self.frames_read == 0:
            raise VideoIOError(f"{self.path}: no frames decoded")

    def read_all(self) -> torch.Tensor:
        """Decode the whole clip (up to ``max_frames``) as ``uint8 (T, H, W, 3)`` RGB."""
        chunks = list(self.iter_chunks(64))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
        self._decord = None


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """Read a whole video: returns ``(frames uint8 (T, H, W, 3) RGB, fps)``."""
    with VideoReader(path, max_frames=max_frames) as reader:
        return reader.read_all(), reader.info.fps


def _to_fraction(fps: float | Fraction, path: str) -> Fraction:
    try:
        rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    except (TypeError, ValueError) as e:
        raise VideoIOError(f"{path}: invalid fps {fps!r}") from e
    if rate <= 0:
        raise VideoIOError(f"{path}: fps must be > 0, got {fps!r}")
    return rate


def _as_uint8_frames(frames, path: str) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise VideoIOError(f"{path}: frames must be uint8, got {frames.dtype}")
        arr = frames.detach().cpu().numpy()
    elif isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise VideoIOError(f"{path}: frames must be uint8, got {frames.dtype}")
        arr = frames
    else:
        raise VideoIOError(f"{path}: frames must be a uint8 torch.Tensor, got {type(frames).__name__}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise VideoIOError(f"{path}: frames must be shaped (T, H, W, 3), got {tuple(arr.shape)}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise VideoIOError(f"{path}: frames have an empty size {tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


class VideoWriter:
    """Atomic video writer (context manager).

    The format follows the extension of ``path``: ``.mp4`` -> H.264 (libx264, yuv420p, ``crf``),
    ``.mkv`` -> lossless FFV1 (``bgr0``, bit-exact RGB), no extension or a trailing ``/`` -> a folder of
    PNGs ``frame_000000.png``, ... Any other extension raises :class:`VideoIOError`. ``codec`` overrides
    the codec of a container (``libx264``, ``libx265``, ``libx264rgb``, ``ffv1``, ``png``).

    H.264/H.265 in yuv420p need an even width and height; odd sizes raise :class:`VideoIOError` (write
    ``.mkv`` or a PNG folder instead). An existing file is replaced; an existing folder is replaced only
    when it holds nothing but ``frame_*.png`` files.

    Frames go to a temporary file (or folder) next to the destination; :meth:`close` flushes the encoder
    and renames it into place. Leaving the ``with`` block with an exception, or calling :meth:`abort`,
    removes the temporary output. Closing with no frames written raises :class:`VideoIOError`.
    """

    def __init__(self, path: str | os.PathLike, fps: float, *, crf: int = 18, codec: str | None = None):
        raw = os.fspath(path)
        self.is_folder = raw.endswith(("/", os.sep)) or Path(raw).suffix == ""
        self.path = raw.rstrip("/" + os.sep) if self.is_folder else raw
        if not self.path:
            raise VideoIOError(f"{raw!r}: invalid output path")
        self.fps = _to_fraction(fps, self.path)
        self.crf = int(crf)
        self.frames_written = 0
        self._size: tuple[int, int] | None = None
        self._container = None
        self._stream = None
        self._tmp: str | None = None
        self._closed = False
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise VideoIOError(f"{self.path}: output directory {parent} does not exist")
        if self.is_folder:
            if codec not in (None, "png"):
                raise VideoIOError(f"{self.path}: a PNG folder cannot use codec {codec!r}")
            self.codec, self.pix_fmt, self._format = "png", "rgb24", None
            self._check_folder_replaceable()
            self._tmp = os.fspath(temp_beside(self.path, directory=True))
            return
        ext = Path(self.path).suffix.lower()
        if ext not in _EXTENSIONS:
            raise VideoIOError(
                f"{self.path}: unsupported extension {ext!r}; use .mp4, .mkv or a folder path for PNGs"
            )
        if os.path.isdir(self.path):
            raise VideoIOError(f"{self.path}: is a directory")
        self._format, default_codec = _EXTENSIONS[ext]
        self.codec = codec or default_codec
        if self.codec not in _CODECS:
            raise VideoIOError(
                f"{self.path}: unsupported codec {self.codec!r}, expected one of {sorted(_CODECS)}"
            )
        self.pix_fmt = _CODECS[self.codec]
        self._tmp = os.fspath(temp_beside(self.path))

    def _check_folder_replaceable(self) -> None:
        if os.path.isfile(self.path):
            raise VideoIOError(f"{self.path}: exists and is a file, expected a folder for PNG frames")
        if os.path.isdir(self.path):
            foreign = [n for n in os.listdir(self.path) if not _FRAME_RE.fullmatch(n)]
            if foreign:
                raise VideoIOError(
                    f"{self.path}: folder exists and holds other files than frame_*.png ({foreign[0]}), "
                    "refusing to replace it"
                )

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_stream(self, height: int, width: int) -> None:
        if self.pix_fmt == "yuv420p" and (height % 2 or width % 2):
            raise VideoIOError(
                f"{self.path}: {self.codec} (yuv420p) needs an even frame size, got {width}x{height}; "
                "write .mkv (lossless) or a PNG folder instead"
            )
        try:
            self._container = av.open(self._tmp, mode="w", format=self._format)
            stream = self._container.add_stream(self.codec, rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = width, height, self.pix_fmt
            stream.codec_context.time_base = 1 / self.fps
            if self.codec in ("libx264", "libx265", "libx264rgb"):
                stream.options = {"crf": str(self.crf)}
                if self.codec == "libx265":
                    stream.options["x265-params"] = "log-level=error"
        except _AV_ERRORS as e:
            raise VideoIOError(f"{self.path}: cannot open encoder {self.codec} ({e})") from e
        self._stream = stream

    def write(self, frames: torch.Tensor) -> None:
        """Append ``uint8 (t, H, W, 3)`` RGB frames; H and W must match the earlier writes."""
        if self._closed:
            raise VideoIOError(f"{self.path}: writer is closed")
        arr = _as_uint8_frames(frames, self.path)
        size = (arr.shape[1], arr.shape[2])
        if self._size is None:
            if not self.is_folder:
                self._open_stream(*size)
            self._size = size
        elif size != self._size:
            raise VideoIOError(
                f"{self.path}: frame size {size[1]}x{size[0]} differs from the earlier frames "
                f"{self._size[1]}x{self._size[0]}"
            )
        from PIL import Image

        for img in arr:
            if self.is_folder:
                Image.fromarray(img).save(
                    os.path.join(self._tmp, _FRAME_NAME.format(self.frames_written)), format="PNG"
                )
            else:
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts = self.frames_written
                try:
                    self._container.mux(self._stream.encode(frame))
                except _AV_ERRORS as e:
                    msg = f"{self.path}: encoding frame {self.frames_written} failed ({e})"
                    raise VideoIOError(msg) from e
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and move the output into place. Idempotent."""
        if self._closed:
            return
        if self.frames_written == 0:
            self.abort()
            raise VideoIOError(f"{self.path}: no frames written")
        try:
            if self.is_folder:
                self._check_folder_replaceable()
                if os.path.isdir(self.path):
                    shutil.rmtree(self.path)
            else:
                try:
                    self._container.mux(self._stream.encode())
                    self._container.close()
                except _AV_ERRORS as e:
                    raise VideoIOError(f"{self.path}: finalising the video failed ({e})") from e
                self._container = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        self._closed = True

    def abort(self) -> None:
        """Discard everything written so far; no output and no temporary file remain. Idempotent."""
        self._closed = True
        if self._container is not None:
            try:
                self._container.close()
            except _AV_ERRORS:
                pass
            self._container = None
        if self._tmp is not None:
            if os.path.isdir(self._tmp):
                shutil.rmtree(self._tmp, ignore_errors=True)
            elif os.path.exists(self._tmp):
                os.remove(self._tmp)
            self._tmp = None

    def __del__(self) -> None:
        if getattr(self, "_tmp", None) is not None:
            self.abort()


def write_video(path: str | os.PathLike, frames_uint8: torch.Tensor, fps: float, **kw) -> None:
    """Write ``uint8 (T, H, W, 3)`` RGB frames atomically; ``kw`` goes to :class:`VideoWriter`."""
    with VideoWriter(path, fps, **kw) as writer:
        writer.write(frames_uint8)


def to_model_range(frames_uint8: torch.Tensor) -> torch.Tensor:
    """``uint8 (T, H, W, 3)`` RGB -> ``float32 (1, 3, T, H, W)`` in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    if not isinstance(frames_uint8, torch.Tensor) or frames_uint8.dtype != torch.uint8:
        got = getattr(frames_uint8, "dtype", type(frames_uint8).__name__)
        raise ValueError(f"to_model_range expects a uint8 tensor, got {got}")
    if frames_uint8.ndim != 4 or frames_uint8.shape[-1] != 3:
        raise ValueError(f"to_model_range expects shape (T, H, W, 3), got {tuple(frames_uint8.shape)}")
    x = frames_uint8.permute(3, 0, 1, 2).unsqueeze(0).to(torch.float32)
    return (x / 127.5 - 1.0).contiguous()


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """``float (1, 3, T, H, W)`` in ``[-1, 1]`` -> ``uint8 (T, H, W, 3)`` RGB (clamped and rounded).

    A ``(3, T, H, W)`` tensor is accepted too.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"from_model_range expects a float tensor, got {got}")
    if x.ndim == 5:
        if x.shape[0] != 1:
            raise ValueError(f"from_model_range expects batch size 1, got shape {tuple(x.shape)}")
        x = x[0]
    if x.ndim != 4 or x.shape[0] != 3:
        raise ValueError(f"from_model_range expects shape (1, 3, T, H, W), got {tuple(x.shape)}")
    y = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return y.permute(1, 2, 3, 0).contiguous()


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image with Pillow as a one-frame video: ``uint8 (1, H, W, 3)`` RGB.

    EXIF orientation is applied; alpha is dropped, grayscale and palette images are expanded to RGB and
    16-bit images are reduced to 8 bits.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = os.fspath(path)
    _check_input_file(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.array(img, dtype=np.int64)
                scale = 65535 if img.mode.startswith("I;16") or arr.max() > 255 else 255
                arr = np.clip(np.round(arr * (255.0 / scale)), 0, 255).astype(np.uint8)
                arr = np.repeat(arr[..., None], 3, axis=-1)
            else:
                arr = np.array(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise VideoIOError(f"{path}: not a readable image ({e})") from e
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0)


def write_png(path: str | os.PathLike, image_uint8: torch.Tensor) -> None:
    """Write a ``uint8 (H, W, 3)`` RGB image (or ``(1, H, W, 3)``) as PNG, atomically."""
    from PIL import Image

    path = os.fspath(path)
    img = image_uint8
    if isinstance(img, (torch.Tensor, np.ndarray)) and img.ndim == 3:
        img = img[None]
    arr = _as_uint8_frames(img, path)
    if arr.shape[0] != 1:
        raise VideoIOError(f"{path}: write_png expects one image (H, W, 3), got {tuple(arr.shape)}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise VideoIOError(f"{path}: output directory {parent} does not exist")
    with atomic_path(path) as tmp:
        Image.fromarray(arr[0]).save(tmp, format="PNG")
