"""Export a decoder for streaming runtimes (ONNX, ``torch.export``).

A causal decoder streams latents chunk by chunk, carrying its causal state (the frames each
causal conv keeps, see :class:`videovae.layers.CausalCache`) from one chunk to the next. Runtimes
cannot hold a Python cache object, so the export turns that state into explicit tensors:

* ``first`` graph: ``latents`` (1, z, 1 + k, h, w) -> ``frames`` (1, 3, 1 + k t, H, W), then the
  state tensors ``state.<i>`` in the order of :attr:`StreamSpec.state`;
* ``step`` graph: ``latents`` (1, z, k, h, w), ``state.<i>`` ... -> ``frames`` (1, 3, k t, H, W),
  then the new state ``new_state.<i>`` in the same order.

Two graphs, because the first chunk really differs (it is not a zero-state step): frame 0 is not
time-upsampled (1 + k latents give 1 + k t frames), and conv time padding at clip start is a
replicate of frame 0 in the OD-VAE/CV-VAE-style families. :func:`zero_state_matches_first`
measures this for a given model rather than assuming it.

Latents are the model's raw (unscaled) latents, frames NCTHW float in [-1, 1] (not clamped).
Shapes are fixed at export time (chunk length, latent height and width). The state tensor order,
names and shapes are recorded in a JSON sidecar next to the exported file (see :func:`export_decoder`).

Any family with ``decode_chunk(z, cache)`` exports: ``turbo-vaed``, ``causal-vae``, ``od-vae``,
``cv-vae``, ``onevae`` (its continuous path). A ``turbo-pair`` (``videovae distill``'s output)
exports its turbo decoder; the sidecar then records the teacher checkpoint as ``latent_source``,
so the runtime decodes the teacher's latent files and refuses others.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from videovae.checkpoint import model_digest
from videovae.fileutil import atomic_path
from videovae.layers import CausalCache
from videovae.models.turbo_vaed import TurboPair

EXPORT_FORMAT = "videovae-export"
EXPORT_VERSION = 1
FORMATS = ("onnx", "torch-export")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ONNX_OPSET = 17


class ExportError(ValueError):
    """A model or request that cannot be exported as asked."""


@dataclass(frozen=True)
class StateTensor:
    """One tensor of causal state: the cache key it comes from (module path) and its shape."""

    key: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StreamSpec:
    """Everything a runtime needs to stream an exported decoder.

    ``state``: the state tensors in graph order. ``markers``: cache keys that only record "the clip
    has started" (0-d flags of first-chunk-aware upsamplers); the step graph has them baked in.
    """

    family: str
    config: dict[str, Any]
    weights_sha256: str
    dtype: str
    chunk_latents: int
    latent_channels: int
    latent_height: int
    latent_width: int
    time_factor: int
    space_factor: int
    out_channels: int
    state: tuple[StateTensor, ...]
    markers: tuple[str, ...]
    # whose latent files this decoder takes (family, config, weights_sha256) when not the exported
    # model's own: a turbo pair's teacher
    latent_source: dict[str, Any] | None = None

    @property
    def height(self) -> int:
        return self.latent_height * self.space_factor

    @property
    def width(self) -> int:
        return self.latent_width * self.space_factor

    def state_names(self, prefix: str = "state") -> list[str]:
        return [f"{prefix}.{i}" for i in range(len(self.state))]

    def first_io(self) -> tuple[list[str], list[str]]:
        """Input and output names of the ``first`` graph."""
        return ["latents"], ["frames", *self.state_names()]

    def step_io(self) -> tuple[list[str], list[str]]:
        """Input and output names of the ``step`` graph."""
        return ["latents", *self.state_names()], ["frames", *self.state_names("new_state")]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = [
            {"name": n, "key": s.key, "shape": list(s.shape)}
            for n, s in zip(self.state_names(), self.state, strict=True)
        ]
        data["markers"] = list(self.markers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamSpec:
        data = dict(data)
        data["state"] = tuple(StateTensor(s["key"], tuple(s["shape"])) for s in data["state"])
        data["markers"] = tuple(data["markers"])
        data.setdefault("latent_source", None)
        return cls(**data)


class FirstChunk(nn.Module):
    """``first`` graph: latents (1, z, 1 + k, h, w) -> (frames, *state)."""

    def __init__(self, model: nn.Module, spec: StreamSpec):
        super().__init__()
        self.model = model
        self.keys = [s.key for s in spec.state]

    def forward(self, latents: Tensor) -> tuple[Tensor, ...]:
        frames, cache = self.model.decode_chunk(latents, CausalCache())
        return (frames, *(cache.frames[k] for k in self.keys))


class StepChunk(nn.Module):
    """``step`` graph: (latents (1, z, k, h, w), *state) -> (frames, *new_state)."""

    def __init__(self, model: nn.Module, spec: StreamSpec):
        super().__init__()
        self.model = model
        self.keys = [s.key for s in spec.state]
        self.markers = list(spec.markers)

    def forward(self, latents: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        frames = dict(zip(self.keys, state, strict=True))
        # the marker values are never read: their presence says "not the first chunk"
        frames.update({k: latents.new_ones(()) for k in self.markers})
        out, cache = self.model.decode_chunk(latents, CausalCache(frames))
        return (out, *(cache.frames[k] for k in self.keys))


def stream_spec(model: nn.Module, chunk_latents: int, latent_height: int, latent_width: int,
                latent_source: dict[str, Any] | None = None) -> StreamSpec:
    """Discover the causal state by running the model once (a first chunk and one step) on zeros
    with a :class:`CausalCache`; the state must have the same keys and shapes after both."""
    if not hasattr(model, "decode_chunk"):
        raise ExportError(f"{type(model).__name__} has no decode_chunk: not a streaming decoder")
    if chunk_latents < 1:
        raise ExportError(f"chunk_latents must be >= 1, got {chunk_latents}")
    if latent_height < 1 or latent_width < 1:
        raise ExportError(f"latent size must be positive, got {latent_height}x{latent_width}")
    if not model.config.exactly_streamable:
        raise ExportError(
            f"{model.family} with this config is not exactly streamable (chunked decode differs from whole-clip "
            "decode); export a streaming variant (e.g. a *-stream preset)"
        )
    param = next(model.parameters())
    z = model.latent_channels
    shape = (1, z, chunk_latents, latent_height, latent_width)
    with torch.no_grad():
        cache = CausalCache()
        first = param.new_zeros((1, z, 1 + chunk_latents, latent_height, latent_width))
        frames, cache = model.decode_chunk(first, cache)
        after_first = {k: tuple(v.shape) for k, v in cache.frames.items()}
        _, cache = model.decode_chunk(param.new_zeros(shape), cache)
        after_step = {k: tuple(v.shape) for k, v in cache.frames.items()}
    if after_first != after_step:
        changed = sorted(k for k in set(after_first) | set(after_step) if after_first.get(k) != after_step.get(k))
        raise ExportError(
            f"the causal state changes shape between chunks ({', '.join(changed)}): state that grows with the "
            "clip or depends on the chunk length cannot be exported with fixed shapes"
        )
    state = tuple(StateTensor(k, s) for k, s in after_step.items() if len(s) > 0)
    markers = tuple(k for k, s in after_step.items() if len(s) == 0)
    return StreamSpec(
        family=model.family,
        config=model.config.to_dict(),
        weights_sha256=model_digest(model),
        dtype=str(param.dtype).removeprefix("torch."),
        chunk_latents=chunk_latents,
        latent_channels=z,
        latent_height=latent_height,
        latent_width=latent_width,
        time_factor=model.time_factor,
        space_factor=model.space_factor,
        out_channels=frames.shape[1],
        state=state,
        markers=markers,
        latent_source=latent_source,
    )


@torch.no_grad()
def zero_state_matches_first(model: nn.Module, spec: StreamSpec) -> float:
    """How far a ``step`` on all-zero state is from the ``first`` chunk, on random latents:
    max |frames[first][1:] - frames[step on latents 1..k]|, over the frames both produce. 0.0
    would mean one graph could serve both (never the case when the frame counts differ, which
    this still measures on the overlapping frames); returns ``inf`` if the step fails."""
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    k, h, w = spec.chunk_latents, spec.latent_height, spec.latent_width
    z = torch.randn(1, spec.latent_channels, 1 + k, h, w, generator=g).to(param)
    first = FirstChunk(model, spec)(z)[0]
    zeros = [param.new_zeros(s.shape) for s in spec.state]
    try:
        step = StepChunk(model, spec)(z[:, :, 1:], *zeros)[0]
    except (RuntimeError, ValueError):
        return float("inf")
    n = min(first.shape[2], step.shape[2])
    return (first[:, :, -n:].float() - step[:, :, -n:].float()).abs().max().item()


def sample_inputs(
    spec: StreamSpec, device: torch.device | str = "cpu"
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Example inputs of the ``first`` and ``step`` graphs (random latents, zero state)."""
    dtype = DTYPES[spec.dtype]
    g = torch.Generator().manual_seed(0)
    k, z, h, w = spec.chunk_latents, spec.latent_channels, spec.latent_height, spec.latent_width
    first = (torch.randn(1, z, 1 + k, h, w, generator=g).to(device, dtype),)
    step = (torch.randn(1, z, k, h, w, generator=g).to(device, dtype),
            *(torch.zeros(s.shape, device=device, dtype=dtype) for s in spec.state))
    return first, step


def graph_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``out.onnx`` -> (``out.onnx`` the step graph, ``out.first.onnx`` the first graph,
    ``out.onnx.json`` the sidecar)."""
    path = Path(path)
    return path, path.with_name(f"{path.stem}.first{path.suffix}"), path.with_name(f"{path.name}.json")


def _upsample_nearest_exact2d(g, x, output_size, scale_factors):
    """ONNX ``Resize`` for ``F.interpolate(mode="nearest-exact")`` (Wan/OneVAE upsamplers), which the
    TorchScript exporter lacks: source pixel ``floor((dst + 0.5) / scale)`` is ONNX's nearest mode
    with ``floor`` rounding and ``tf_half_pixel_for_nn`` coordinates (``asymmetric`` for integer
    factors, where both agree)."""
    from torch.onnx import symbolic_helper as sh

    factors = None if sh._is_none(scale_factors) else sh._maybe_get_const(scale_factors, "fs")
    if factors is None or sh._is_value(factors):
        sizes = sh._get_tensor_sizes(x)[2:]
        out = sh._maybe_get_const(output_size, "is")
        if sh._is_value(out) or None in sizes:
            raise ExportError("nearest-exact upsampling needs static scale factors or sizes to export to ONNX")
        factors = [o / s for o, s in zip(out, sizes, strict=True)]
    scales = g.op("Constant", value_t=torch.tensor([1.0, 1.0, *factors], dtype=torch.float32))
    roi = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    # for integer factors floor(dst / f) == floor((dst + 0.5) / f): the non-deprecated asymmetric mode
    coords = "asymmetric" if all(float(f).is_integer() for f in factors) else "tf_half_pixel_for_nn"
    return g.op("Resize", x, roi, scales, mode_s="nearest", coordinate_transformation_mode_s=coords,
                nearest_mode_s="floor")


def _export_onnx(module: nn.Module, inputs: tuple[Tensor, ...], names: tuple[list[str], list[str]], out: Path) -> None:
    torch.onnx.register_custom_op_symbolic("aten::_upsample_nearest_exact2d", _upsample_nearest_exact2d, ONNX_OPSET)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        # Shapes are fixed by design (one chunk length, one frame size): the tracer's warnings
        # about shape-dependent Python branches, and unfoldable strided slices, are expected.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        # The TorchScript-based exporter: it needs no onnxscript and runs offline.
        torch.onnx.export(
            module, inputs, str(tmp), input_names=names[0], output_names=names[1], opset_version=ONNX_OPSET,
            dynamo=False, do_constant_folding=True,
        )


def _export_torch(module: nn.Module, inputs: tuple[Tensor, ...], out: Path) -> None:
    program = torch.export.export(module, inputs, strict=False)
    with atomic_path(out) as tmp:
        torch.export.save(program, str(tmp))


def export_decoder(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str,
    chunk_latents: int,
    height: int,
    width: int,
    dtype: str = "float32",
) -> StreamSpec:
    """Export ``model``'s streaming decoder for frames of ``height`` x ``width`` pixels (multiples of
    the space factor), ``chunk_latents`` latents per step. Writes atomically the step graph to
    ``path``, the first graph beside it (:func:`graph_paths`) and the JSON sidecar ``<path>.json``
    (format, family, config, weights digest, dtype, chunk length, state names/keys/shapes, graph
    files, input/output names); returns the :class:`StreamSpec`."""
    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    sf = model.space_factor
    if height <= 0 or width <= 0 or height % sf or width % sf:
        raise ExportError(f"size {height}x{width} must be a positive multiple of {sf} (the model's space factor)")
    step_path, first_path, sidecar = graph_paths(path)
    if not step_path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {step_path.parent}")
    digest = model_digest(model)  # of the weights as given, before any cast
    latent_source = None
    if isinstance(model, TurboPair):  # export the decoder; latents stay the teacher's
        latent_source = asdict(model.latent_identity())
        model = copy.deepcopy(model.student)
        model._videovae_digest = digest
    if next(model.parameters()).dtype != DTYPES[dtype]:
        model = copy.deepcopy(model).to(DTYPES[dtype])  # never cast the caller's model
        model._videovae_digest = digest
    model.eval()
    spec = stream_spec(model, chunk_latents, height // sf, width // sf, latent_source)
    first_inputs, step_inputs = sample_inputs(spec, next(model.parameters()).device)
    first, step = FirstChunk(model, spec), StepChunk(model, spec)
    with torch.no_grad():
        if format == "onnx":
            _export_onnx(first, first_inputs, spec.first_io(), first_path)
            _export_onnx(step, step_inputs, spec.step_io(), step_path)
        else:
            _export_torch(first, first_inputs, first_path)
            _export_torch(step, step_inputs, step_path)
    first_in, first_out = spec.first_io()
    step_in, step_out = spec.step_io()
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "runtime": format,
        "graphs": {
            "first": {"file": first_path.name, "inputs": first_in, "outputs": first_out},
            "step": {"file": step_path.name, "inputs": step_in, "outputs": step_out},
        },
        "spec": spec.to_dict(),
    }
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return spec


def read_sidecar(path: str | os.PathLike) -> tuple[dict[str, Any], StreamSpec]:
    """The sidecar of an exported decoder (``path`` is the step graph, as given to ``-o``)."""
    _, _, sidecar = graph_paths(path)
    if not Path(path).exists():
        raise ExportError(f"{path}: no such exported decoder")
    if not sidecar.exists():
        raise ExportError(f"{path}: no sidecar {sidecar.name} beside it (export with `videovae export`)")
    meta = json.loads(sidecar.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{sidecar}: not a videovae export sidecar")
    if meta.get("format_version", 0) > EXPORT_VERSION:
        raise ExportError(f"{sidecar}: export format version {meta['format_version']} is newer than this videovae")
    return meta, StreamSpec.from_dict(meta["spec"])
