"""Run an exported streaming decoder (see :mod:`videovae.deploy.export`) chunk by chunk.

    from videovae.deploy.runtime import OnnxDecoder
    frames = OnnxDecoder("out.onnx").decode(latents)   # (1, z, T', h, w) -> (1, 3, T, H, W)

``OnnxDecoder`` needs ``onnxruntime`` (the ``export`` extra: ``pip install 'videovae[export]'``);
it is imported only when one is created. ``TorchExportDecoder`` runs the ``.pt2`` programs of
``videovae export --format torch-export`` with PyTorch alone.

Latents are raw (unscaled), any length T' >= 1: the first chunk takes 1 + k latents, every later
one k (the exported chunk length). A clip whose length does not fit is padded at the end with
copies of its last latent and the extra frames dropped; the decoder is causal, so earlier frames
do not change. Frames come back float32 NCTHW in [-1, 1] (not clamped), 1 + (T' - 1) * t of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from videovae.deploy.export import DTYPES, ExportError, StreamSpec, read_sidecar

RUNTIMES = ("onnx", "torch-export")


class StreamingDecoder:
    """Common chunking of the runtimes: subclasses run one graph (``_first`` / ``_step``)."""

    runtime = ""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta, self.spec = read_sidecar(path)
        if self.meta["runtime"] != self.runtime:
            raise ExportError(f"{path}: exported for {self.meta['runtime']}, not {self.runtime}")
        self.first_path = self.path.with_name(self.meta["graphs"]["first"]["file"])
        if not self.first_path.exists():
            raise ExportError(f"{path}: the first-chunk graph {self.first_path.name} is missing beside it")

    def _first(self, latents: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def _step(self, latents: Tensor, state: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def check_latents(self, latents: Tensor) -> None:
        """Raise a clear error unless ``latents`` is (1, z, T' >= 1, h, w) of the exported size."""
        spec = self.spec
        if latents.ndim != 5 or latents.shape[0] != 1 or latents.shape[2] < 1:
            raise ExportError(f"expected latents (1, {spec.latent_channels}, T, h, w), got {tuple(latents.shape)}")
        if latents.shape[1] != spec.latent_channels:
            raise ExportError(
                f"latents have {latents.shape[1]} channels; the exported decoder takes {spec.latent_channels}"
            )
        if tuple(latents.shape[3:]) != (spec.latent_height, spec.latent_width):
            raise ExportError(
                f"latents are {latents.shape[3]}x{latents.shape[4]}; the decoder was exported for "
                f"{spec.latent_height}x{spec.latent_width} latents ({spec.height}x{spec.width} frames): export again"
            )

    def iter_decode(self, latents: Tensor) -> Iterator[Tensor]:
        """Yield float32 (1, 3, t, H, W) chunks of the decoded clip, in order."""
        self.check_latents(latents)
        spec = self.spec
        k, tf = spec.chunk_latents, spec.time_factor
        total = latents.shape[2]
        steps = max(1, -(-(total - 1) // k))  # ceil, and at least the first chunk's k latents
        padded = 1 + steps * k
        if padded > total:
            latents = torch.cat([latents, latents[:, :, -1:].expand(-1, -1, padded - total, -1, -1)], dim=2)
        latents = latents.to(DTYPES[spec.dtype])
        remaining = 1 + (total - 1) * tf
        frames, *state = self._first(latents[:, :, : 1 + k])
        for start in range(1 + k, padded + 1, k):
            keep = min(frames.shape[2], remaining)
            yield frames[:, :, :keep].float()
            remaining -= keep
            if remaining <= 0 or start >= padded:
                return
            frames, *state = self._step(latents[:, :, start : start + k], state)

    def decode(self, latents: Tensor) -> Tensor:
        """latents (1, z, T', h, w) -> frames (1, 3, 1 + (T' - 1) t, H, W), float32 in [-1, 1]."""
        return torch.cat(list(self.iter_decode(latents)), dim=2)

    # Single chunks, for callers that stream latents as they arrive.
    def first(self, latents: Tensor) -> tuple[Tensor, list[Tensor]]:
        """One first chunk (1, z, 1 + k, h, w) -> (frames, state)."""
        self._check_chunk(latents, 1 + self.spec.chunk_latents)
        frames, *state = self._first(latents.to(DTYPES[self.spec.dtype]))
        return frames, state

    def step(self, latents: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """One later chunk (1, z, k, h, w) and the state -> (frames, new state)."""
        self._check_chunk(latents, self.spec.chunk_latents)
        if len(state) != len(self.spec.state):
            raise ExportError(f"expected {len(self.spec.state)} state tensors, got {len(state)}")
        frames, *state = self._step(latents.to(DTYPES[self.spec.dtype]), state)
        return frames, state

    def _check_chunk(self, latents: Tensor, length: int) -> None:
        self.check_latents(latents)
        if latents.shape[2] != length:
            raise ExportError(f"expected a chunk of {length} latent frames, got {latents.shape[2]}")


class OnnxDecoder(StreamingDecoder):
    """An ONNX export run by onnxruntime (CPU execution provider unless ``providers`` says otherwise)."""

    runtime = "onnx"

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
        super().__init__(path)
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self._first_session = ort.InferenceSession(str(self.first_path), options, providers=providers)
        self._step_session = ort.InferenceSession(str(self.path), options, providers=providers)
        graphs = self.meta["graphs"]
        self._first_io = graphs["first"]["inputs"], graphs["first"]["outputs"]
        self._step_io = graphs["step"]["inputs"], graphs["step"]["outputs"]

    @staticmethod
    def _run(session, io: tuple[list[str], list[str]], inputs: list[Tensor]) -> list[Tensor]:
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(io[0], inputs, strict=True)}
        return [torch.from_numpy(a) for a in session.run(io[1], feeds)]

    def _first(self, latents: Tensor) -> list[Tensor]:
        return self._run(self._first_session, self._first_io, [latents])

    def _step(self, latents: Tensor, state: list[Tensor]) -> list[Tensor]:
        return self._run(self._step_session, self._step_io, [latents, *state])


class TorchExportDecoder(StreamingDecoder):
    """A ``torch.export`` (``.pt2``) export, run as PyTorch modules (``torch.export.load(...).module()``)."""

    runtime = "torch-export"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        super().__init__(path)
        self.device = torch.device(device)
        self._first_module = torch.export.load(str(self.first_path)).module().to(self.device)
        self._step_module = torch.export.load(str(self.path)).module().to(self.device)

    @torch.no_grad()
    def _first(self, latents: Tensor) -> list[Tensor]:
        return list(self._first_module(latents.to(self.device)))

    @torch.no_grad()
    def _step(self, latents: Tensor, state: list[Tensor]) -> list[Tensor]:
        return list(self._step_module(latents.to(self.device), *state))


def import_onnxruntime():
    """onnxruntime, or an error that names the extra providing it."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "the ONNX runtime needs the onnxruntime package: pip install 'videovae[export]'"
        ) from err
    return onnxruntime


def open_decoder(path: str | os.PathLike, runtime: str) -> StreamingDecoder:
    """The exported decoder at ``path`` (the file given to ``videovae export -o``) for ``runtime``."""
    if runtime == "onnx":
        return OnnxDecoder(path)
    if runtime == "torch-export":
        return TorchExportDecoder(path)
    raise ExportError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")


def check_latent_file_matches(meta, spec: StreamSpec, path: str) -> None:
    """A clear error unless the latent file's model (family, config, weights) is the exported one
    (or, for a turbo pair's decoder, the pair's teacher checkpoint)."""
    from videovae.latents import check_model_matches
    from videovae.models import build_model

    family, config, digest = spec.family, spec.config, spec.weights_sha256
    if spec.latent_source is not None:  # a turbo pair's decoder: the teacher's latents
        family, config, digest = (spec.latent_source[k] for k in ("family", "config", "weights_sha256"))
    with torch.device("meta"):  # only the family and config are needed
        model = build_model(family, config)
    check_model_matches(meta, model, digest, path)


def decode_latents_to_frames(
    latent: Tensor, meta, decoder: StreamingDecoder, path: str = "latents"
) -> Iterator[Tensor]:
    """Latents and their :class:`videovae.latents.LatentMeta` (as loaded from ``path``) -> uint8
    (t, H, W, 3) RGB frame chunks of the original geometry, like ``videovae decode``."""
    from videovae.engine import _cropped_frames

    check_latent_file_matches(meta, decoder.spec, path)
    return _cropped_frames(decoder.iter_decode(latent.float()), meta.geometry)


def decode_latent_file(latent_path: str | os.PathLike, decoder: StreamingDecoder) -> Iterator[Tensor]:
    """Decode a latent file (:func:`videovae.latents.load_latents`) with an exported decoder:
    yields uint8 (t, H, W, 3) RGB frame chunks of the original geometry, like ``videovae decode``."""
    from videovae.latents import load_latents

    latent, meta = load_latents(latent_path)
    return decode_latents_to_frames(latent, meta, decoder, os.fspath(latent_path))
