"""Streaming, tiled inference: encode and decode clips of any length in bounded memory.

Time is processed in chunks that carry the causal caches (:class:`videovae.layers.CausalCache`):
the first chunk holds frame 0 plus ``chunk_frames`` frames, every later chunk ``chunk_frames``
frames (a multiple of the model's time factor), so each chunk maps to whole latent frames. Space
is processed in tiles laid on the latent grid, for the full-resolution, convolution-only parts of
the model (the encoder's down levels, the decoder's up levels); the latent-resolution parts (mid
blocks with attention) are small and run untiled, so attention always sees the whole frame. Each
tile is run with a *halo* of extra context around its core, and neighbouring tiles are blended
with linear feather weights over a band of ``2 * ramp`` latent pixels centred on their common edge.

Exactness (fp32): for models whose ``config.exactly_streamable`` holds, chunked output equals
whole-clip output. For models whose ``config.halo_tiling_exact`` holds (no per-tile statistics in
the tiled parts, e.g. RMSNorm), the halo covers the receptive field and tiled output equals
untiled output; models with GroupNorm get the same halo, and differ only through per-tile
normalisation statistics.

Tile order: streams advance all tiles one chunk at a time (every tile keeps its own causal caches);
the whole-clip entry points run each tile through the whole clip before the next, so only one
tile's caches are alive and tiling never adds cache memory. Both orders give the same numbers.

Padding: frames are added at the end (copies of the last frame) up to ``1 + k * t_down`` and
rows/columns at the bottom/right (replicate) up to multiples of the spatial factor. The
:class:`VideoGeometry` records both so that decoding crops back to the original size.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from videovae.kernels import blend_tile_, normalize_canvas, to_uint8_frames
from videovae.layers import CausalCache, NormSync

DEFAULT_CHUNK_FRAMES = 16
DEFAULT_TILE = 256
TILE_NORMS = ("tile", "exact")


class MemoryBudgetError(ValueError):
    """The requested size cannot be processed within the memory budget."""


@dataclass(frozen=True)
class EngineOptions:
    """How to cut work into chunks and tiles.

    chunk_frames: frames per time chunk after the first frame (multiple of the time factor);
        0 runs the whole clip at once.
    tile: tile size in pixels (multiple of the spatial factor); 0 disables tiling.
    ramp: half-width, in latent pixels, of the feather band between tiles (None: tile/16 latents,
        at least 1).
    halo: extra context in latent pixels around each tile core (None: the receptive field of the
        tiled part plus the ramp).
    tile_norm: GroupNorm statistics of tiled models: ``tile`` normalises each tile with its own
        statistics (one run of the tiled part; approximate), ``exact`` exchanges whole-frame
        statistics between tiles (see :class:`videovae.layers.NormSync`) so that tiled equals
        untiled, at the cost of one extra run of the tiled part per GroupNorm layer in it.
    tiling: ``halo`` (the engine above) or ``official``: the model's own windowed tiling, as its
        official code does it (temporal windows sharing one frame, no cache across them, spatial
        tiles cross-faded; the whole clip is held in memory). Window and tile sizes come from the
        model's config (the official defaults); ``chunk_frames`` and ``tile`` are not used. Only
        models with ``official_encode`` / ``official_decode`` support it.
    official_frames, official_decode_latents, official_tile, official_overlap: with
        ``tiling='official'``, each overrides one value of the config's official tiling: encode
        windows of ``1 + official_frames`` frames, decode windows of ``1 + official_decode_latents``
        latents, tiles of ``official_tile`` pixels, the overlap ratio (0 = untiled). None keeps it.
    compile: ``none`` (eager, the definition of correct), or a ``torch.compile`` mode for the
        per-chunk decode step: ``default``, or ``reduce-overhead`` (CUDA graphs on CUDA; outputs and
        caches are copied out of the graph's buffers after each step). Chunks of one length reuse
        one compiled graph, so the streaming loop compiles twice (first chunk, steady state).
    tile_order: which loop is outer when tiling: ``chunk`` (every tile advances one chunk at a
        time; memory is bounded in the clip's length, and every tile's causal caches stay alive),
        ``tile`` (each tile runs through the whole clip before the next starts: only one tile's
        caches are alive, so tiled never holds more cache than untiled, but the whole input or
        output of the tiled part is held, and exact tile norms that need statistics from all tiles
        of a chunk are not possible), or ``auto``: ``tile`` for the whole-clip entry points
        (``encode_tensor``, ``decode_tensor``, ``tokenize_tensor``, ``detokenize_tensor``, which hold
        the whole clip anyway) unless tile norms are exchanged, ``chunk`` for the streams (the CLI
        resolves ``auto`` per clip with :func:`stream_tile_order`). Both orders give the same result.
    """

    chunk_frames: int = DEFAULT_CHUNK_FRAMES
    tile: int = 0
    ramp: int | None = None
    halo: int | None = None
    tile_norm: str = "tile"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    progress: bool = False
    tiling: str = "halo"
    official_frames: int | None = None
    official_decode_latents: int | None = None
    official_tile: int | None = None
    official_overlap: float | None = None
    compile: str = "none"
    tile_order: str = "auto"

    def official_tiling(self, model):
        """The model's official tiling with these options' overrides applied."""
        return model.official_tiling_for(
            frames=self.official_frames,
            decode_latents=self.official_decode_latents,
            tile=self.official_tile,
            overlap=self.official_overlap,
        )


TILINGS = ("halo", "official")
COMPILE_MODES = ("none", "default", "reduce-overhead")
TILE_ORDERS = ("auto", "chunk", "tile")


@dataclass
class VideoGeometry:
    """Original and padded clip size, recorded in latent files to crop decodes back."""

    frames: int
    height: int
    width: int
    padded_frames: int
    padded_height: int
    padded_width: int
    pad_mode: str = "replicate"

    def to_dict(self) -> dict:
        return asdict(self)


def padded_length(frames: int, time_factor: int) -> int:
    return 1 + math.ceil((frames - 1) / time_factor) * time_factor


def check_options(model, opts: EngineOptions) -> None:
    tf, sf = model.time_factor, model.space_factor
    if opts.tiling not in TILINGS:
        raise ValueError(f"tiling must be one of {TILINGS}, got {opts.tiling!r}")
    if opts.tiling == "official" and not hasattr(model, "official_encode"):
        raise ValueError(f"{model.family} models have no official tiling (use tiling='halo')")
    if opts.compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {opts.compile!r}")
    if opts.compile != "none" and opts.tiling == "official":
        raise ValueError("compile applies to the chunked decode step (tiling='halo'), not to official tiling")
    if opts.tile_norm not in TILE_NORMS:
        raise ValueError(f"tile_norm must be one of {TILE_NORMS}, got {opts.tile_norm!r}")
    if opts.tile_order not in TILE_ORDERS:
        raise ValueError(f"tile_order must be one of {TILE_ORDERS}, got {opts.tile_order!r}")
    if opts.tile_order == "tile" and exchanges_tile_norms(model, opts):
        raise ValueError("tile_norm='exact' exchanges statistics between the tiles of each chunk: "
                         f"use tile_order='chunk' (or 'auto') with {model.family} models")
    if opts.chunk_frames < 0 or opts.chunk_frames % tf:
        raise ValueError(f"chunk_frames={opts.chunk_frames} must be 0 or a positive multiple of {tf}")
    if opts.tile < 0 or opts.tile % sf:
        raise ValueError(f"tile={opts.tile} must be 0 or a positive multiple of {sf} pixels")
    if opts.tile and opts.tile // sf < 2:
        raise ValueError(f"tile={opts.tile} is too small: at least {2 * sf} pixels")


# --- spatial tiles ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """One tile along one axis, in latent pixels: run on [ext0, ext1), keep [keep0, keep1), own
    the core [core0, core1) (cores partition the axis)."""

    core0: int
    core1: int
    ext0: int
    ext1: int
    keep0: int
    keep1: int
    ramp_before: int
    ramp_after: int


def tile_spans(size: int, core: int, halo: int, ramp: int) -> list[Span]:
    """Split ``size`` latent pixels into near-equal cores of at most ``core``; each tile keeps its
    core plus ``ramp`` on interior sides (the feather band) and runs on the core plus ``halo``."""
    count = max(1, math.ceil(size / core))
    bounds = [round(i * size / count) for i in range(count + 1)]
    spans = []
    for i in range(count):
        c0, c1 = bounds[i], bounds[i + 1]
        before = ramp if i > 0 else 0
        after = ramp if i < count - 1 else 0
        spans.append(
            Span(
                core0=c0,
                core1=c1,
                ext0=max(0, c0 - halo),
                ext1=min(size, c1 + halo),
                keep0=c0 - before,
                keep1=c1 + after,
                ramp_before=2 * before,
                ramp_after=2 * after,
            )
        )
    return spans


@dataclass
class TilePlan:
    rows: list[Span]
    cols: list[Span]

    def __iter__(self) -> Iterator[tuple[Span, Span]]:
        for r in self.rows:
            for c in self.cols:
                yield r, c

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)


def default_ramp(core: int) -> int:
    """Blend ramp (latent pixels) of tiles whose core is ``core`` latent pixels wide."""
    return max(1, core // 16)


def plan_tiles(model, lat_h: int, lat_w: int, opts: EngineOptions, *, encoder: bool) -> TilePlan | None:
    if not opts.tile:
        return None
    core = opts.tile // model.space_factor
    if lat_h <= core and lat_w <= core:
        return None
    ramp = opts.ramp if opts.ramp is not None else default_ramp(core)
    if ramp * 2 > core:
        raise ValueError(f"ramp {ramp} is too wide for tiles of {core} latent pixels")
    if opts.halo is not None:
        halo = opts.halo
    else:
        radius = model.encoder_receptive_radius() if encoder else model.decoder_receptive_radius()
        halo = math.ceil(radius) + ramp
    if halo < ramp:
        raise ValueError(f"halo {halo} must be at least the ramp {ramp}")
    return TilePlan(tile_spans(lat_h, core, halo, ramp), tile_spans(lat_w, core, halo, ramp))


def _tile_input(x: Tensor, r: Span, c: Span, scale: int) -> Tensor:
    """The tile's extended region of ``x`` (``scale`` pixels per latent pixel), contiguous."""
    return x[..., r.ext0 * scale : r.ext1 * scale, c.ext0 * scale : c.ext1 * scale].contiguous()


def _core_region(r: Span, c: Span) -> tuple[int, int, int, int, int, int]:
    """The tile's size and its core inside it, in latent pixels (see :class:`NormSync`)."""
    tile = (r.ext1 - r.ext0, c.ext1 - c.ext0)
    return (*tile, r.core0 - r.ext0, r.core1 - r.ext0, c.core0 - c.ext0, c.core1 - c.ext0)


class _Canvas:
    """Feather-weighted sum of the tiles of one chunk (float32) and the sum of their weights."""

    def __init__(self, plan: TilePlan, scale: int):
        self.plan = plan
        self.scale = scale
        self.sum: Tensor | None = None
        self.weights: Tensor | None = None

    def add(self, y_tile: Tensor, r: Span, c: Span) -> None:
        """Blend the kept part of ``y_tile`` (the output of tile ``(r, c)``, NCTHW) into the canvas."""
        s = self.scale
        if self.sum is None:
            n, ch, t = y_tile.shape[:3]
            h, w = self.plan.rows[-1].keep1 * s, self.plan.cols[-1].keep1 * s
            self.sum = torch.zeros(n, ch, t, h, w, device=y_tile.device, dtype=torch.float32)
            self.weights = torch.zeros(h, w, device=y_tile.device, dtype=torch.float32)
        kept = y_tile[
            ..., (r.keep0 - r.ext0) * s : (r.keep1 - r.ext0) * s, (c.keep0 - c.ext0) * s : (c.keep1 - c.ext0) * s
        ]
        blend_tile_(
            self.sum, self.weights, kept, r.keep0 * s, c.keep0 * s,
            r.ramp_before * s, r.ramp_after * s, c.ramp_before * s, c.ramp_after * s,
        )

    def result(self, dtype: torch.dtype) -> Tensor:
        return normalize_canvas(self.sum, self.weights).to(dtype)


def _run_tiled(
    fn, x: Tensor, plan: TilePlan | None, caches: list, in_scale: int, out_scale: int, sync_norms: bool = False
) -> Tensor:
    """Apply ``fn(x_tile, cache) -> (y_tile, cache)`` tile by tile to one chunk and blend into one
    canvas (chunk-major order: every tile's cache stays alive between chunks).

    ``in_scale``/``out_scale``: pixels per latent pixel of the input/output (8 and 1 for the
    encoder, 1 and 8 for the decoder). With ``sync_norms``, statistics passes run first, on forked
    caches so that the causal state advances once: pass k fixes the k-th GroupNorm layer."""
    if plan is None:
        y, caches[0] = fn(x, caches[0])
        return y
    stats = None
    exact_layers = 0
    while sync_norms:
        sums: dict = {}
        for index, (r, c) in enumerate(plan):
            fn(_tile_input(x, r, c, in_scale), caches[index].fork(NormSync(sums, stats, True, _core_region(r, c))))
        exact_layers += 1
        stats = NormSync.finalize(sums, exact_layers)
        if exact_layers >= len(sums):
            break
    canvas = _Canvas(plan, out_scale)
    for index, (r, c) in enumerate(plan):
        if stats is not None:
            caches[index].norm_sync = NormSync({}, stats, False, _core_region(r, c))
        y_tile, caches[index] = fn(_tile_input(x, r, c, in_scale), caches[index])
        caches[index].norm_sync = None
        canvas.add(y_tile, r, c)
        del y_tile  # the next tile runs without this one's output held
    return canvas.result(x.dtype)


def _run_tiles_over_clip(
    fn, inputs: list[Tensor], plan: TilePlan, in_scale: int, out_scale: int, opts: EngineOptions, desc: str
) -> list[Tensor]:
    """Tile-major order: each tile runs through every chunk of ``inputs`` with its own cache before
    the next tile starts, so only one tile's causal caches are alive at a time. Tile inputs are cut
    from ``inputs`` (any device) and moved to the options' device and dtype. Returns the blended output of
    each chunk, equal to :func:`_run_tiled` chunk by chunk (each tile does the same computations
    and the tiles are blended in the same order)."""
    canvases = [_Canvas(plan, out_scale) for _ in inputs]
    progress = _progress(opts, desc, unit="tile", total=len(plan))
    for r, c in plan:
        cache = CausalCache()  # a fresh cache equals None on the first chunk
        for x, canvas in zip(inputs, canvases, strict=True):
            y_tile, cache = fn(_tile_input(x, r, c, in_scale).to(opts.device, opts.dtype), cache)
            canvas.add(y_tile, r, c)
            del y_tile
        del cache
        progress.update(1)
    progress.close()
    return [canvas.result(opts.dtype) for canvas in canvases]


def _new_caches(opts: EngineOptions, plan: TilePlan | None) -> tuple[list, CausalCache | None]:
    """One cache per tile for the tiled part, one for the untiled latent-resolution part. Whole-clip
    mode uses None, except for tiles, which always carry a cache (a fresh cache is equivalent to
    None on the first chunk, and it carries the norm statistics)."""
    streaming = bool(opts.chunk_frames)
    if plan is None:
        return [CausalCache() if streaming else None], CausalCache() if streaming else None
    return [CausalCache() for _ in range(len(plan))], CausalCache() if streaming else None


def exchanges_tile_norms(model, opts: EngineOptions) -> bool:
    """Whether tiles exchange GroupNorm statistics chunk by chunk (which needs chunk order)."""
    return opts.tile_norm == "exact" and not model.config.halo_tiling_exact


def _whole_clip_options(model, **options) -> EngineOptions:
    """Options of a whole-clip entry point: ``tile_order='auto'`` becomes ``tile`` (the clip is
    held anyway, and one tile's caches at a time is the smaller peak) unless tile norms are
    exchanged between the tiles of each chunk, which needs ``chunk``."""
    opts = EngineOptions(**options)
    if opts.tile_order == "auto":
        opts = replace(opts, tile_order="chunk" if exchanges_tile_norms(model, opts) else "tile")
    return opts


# --- encode ----------------------------------------------------------------------------------------


def _frames_to_model(frames: Iterable[Tensor], device: str, dtype: torch.dtype) -> Iterator[Tensor]:
    """uint8 (t, H, W, 3) RGB chunks -> float (1, 3, t, H, W) chunks in [-1, 1]."""
    for chunk in frames:
        if chunk.dtype != torch.uint8 or chunk.ndim != 4 or chunk.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (t, H, W, 3), got {chunk.dtype} {tuple(chunk.shape)}")
        yield chunk.to(device).permute(3, 0, 1, 2).unsqueeze(0).to(dtype) / 127.5 - 1.0


class _ChunkSource:
    """Regroups float (1, 3, t, H, W) chunks in [-1, 1] into model chunks: padded to the spatial
    factor, the first chunk ``1 + chunk_frames`` long, then ``chunk_frames``, the last padded in
    time with copies of its last frame. ``geometry`` is complete once iteration ends."""

    def __init__(self, chunks: Iterable[Tensor], chunk_frames: int, time_factor: int, space_factor: int):
        self.chunks = chunks
        self.chunk_frames = chunk_frames
        self.time_factor = time_factor
        self.space_factor = space_factor
        self.geometry: VideoGeometry | None = None

    def _pad_space(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % self.space_factor, -w % self.space_factor
        if ph or pw:
            x = F.pad(x[0], (0, pw, 0, ph), mode="replicate").unsqueeze(0)
        return x

    def __iter__(self) -> Iterator[Tensor]:
        total = 0
        size: tuple[int, int] | None = None
        buffered: list[Tensor] = []
        buffered_len = 0
        want = 1 + self.chunk_frames if self.chunk_frames else None
        last_frame = None
        for chunk in self.chunks:
            if chunk.ndim != 5 or chunk.shape[:2] != (1, 3):
                raise ValueError(f"expected (1, 3, t, H, W) chunks, got {tuple(chunk.shape)}")
            if chunk.shape[2] == 0:
                continue
            if size is None:
                size = tuple(chunk.shape[-2:])
            elif tuple(chunk.shape[-2:]) != size:
                raise ValueError(f"frame size changed mid-stream: {tuple(chunk.shape[-2:])} vs {size}")
            total += chunk.shape[2]
            buffered.append(self._pad_space(chunk))
            buffered_len += chunk.shape[2]
            while want is not None and buffered_len >= want:
                x = torch.cat(buffered, dim=2) if len(buffered) > 1 else buffered[0]
                out, rest = x[:, :, :want], x[:, :, want:]
                last_frame = out[:, :, -1:]
                yield out
                buffered, buffered_len = ([rest], rest.shape[2]) if rest.shape[2] else ([], 0)
                want = self.chunk_frames
        if size is None:
            raise ValueError("the video has no frames")
        padded_total = padded_length(total, self.time_factor)
        missing = padded_total - total
        if buffered or missing:
            x = torch.cat(buffered, dim=2) if buffered else None
            if missing:
                last = x[:, :, -1:] if x is not None else last_frame
                tail = last.expand(-1, -1, missing, -1, -1)
                x = tail if x is None else torch.cat([x, tail], dim=2)
            yield x
        sf = self.space_factor
        self.geometry = VideoGeometry(
            frames=total,
            height=size[0],
            width=size[1],
            padded_frames=padded_total,
            padded_height=size[0] + (-size[0] % sf),
            padded_width=size[1] + (-size[1] % sf),
        )


@dataclass
class EncodeResult:
    """Posterior moments of a clip: ``mean`` / ``logvar`` (1, z, T', h, w), and the geometry."""

    mean: Tensor
    logvar: Tensor
    geometry: VideoGeometry

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise


@torch.no_grad()
def encode_chunks(model, chunks: Iterable[Tensor], opts: EngineOptions | None = None) -> EncodeResult:
    """Encode a stream of float (1, 3, t, H, W) chunks in [-1, 1] of one clip.

    Any frame count and size are accepted: the clip is padded (replicate) and the geometry is
    recorded. Only one chunk is held at a time (with ``tile_order='tile'`` and tiling, the whole
    clip); the latent is returned whole (float32, CPU)."""
    opts = opts or EngineOptions()
    check_options(model, opts)
    official = opts.tiling == "official"
    source = _ChunkSource(chunks, 0 if official else opts.chunk_frames, model.time_factor, model.space_factor)
    if official:
        (x,) = list(source)  # chunk_frames=0: the whole padded clip in one piece
        tiling = opts.official_tiling(model)
        posterior = model.posterior(model.official_encode(x.to(opts.device, opts.dtype), tiling).float().cpu())
        return EncodeResult(posterior.mean, posterior.logvar, source.geometry)
    moments: list[Tensor] = []
    head_cache = CausalCache() if opts.chunk_frames else None
    progress = _progress(opts, "encode", unit="chunk")
    for features in _encoder_features(model, source, opts):
        chunk_moments, head_cache = model.encode_head(features, head_cache)
        moments.append(chunk_moments.float().cpu())
        del features, chunk_moments
        progress.update(1)
    progress.close()
    posterior = model.posterior(torch.cat(moments, dim=2))
    return EncodeResult(posterior.mean, posterior.logvar, source.geometry)


def _encoder_features(model, source: Iterable[Tensor], opts: EngineOptions) -> Iterator[Tensor]:
    """The encoder body's output for each chunk of ``source``, tiled as the options say."""
    sf = model.space_factor
    if opts.tile_order == "tile":
        inputs = list(source)
        plan = plan_tiles(model, inputs[0].shape[-2] // sf, inputs[0].shape[-1] // sf, opts, encoder=True)
        if plan is not None:
            features = _run_tiles_over_clip(model.encode_body, inputs, plan, sf, 1, opts, "encode tiles")
            del inputs
            while features:
                yield features.pop(0)
            return
        source = inputs
    plan = tile_caches = None
    for x in source:
        if tile_caches is None:
            plan = plan_tiles(model, x.shape[-2] // sf, x.shape[-1] // sf, opts, encoder=True)
            tile_caches, _ = _new_caches(opts, plan)
        x = x.to(opts.device, opts.dtype)
        yield _run_tiled(model.encode_body, x, plan, tile_caches, sf, 1, exchanges_tile_norms(model, opts))
        del x  # drop this chunk before the source assembles the next one


def encode_frames(model, frames: Iterable[Tensor], opts: EngineOptions | None = None) -> EncodeResult:
    """Encode a stream of uint8 (t, H, W, 3) RGB frame chunks (e.g. ``VideoReader.iter_chunks``)."""
    opts = opts or EngineOptions()
    return encode_chunks(model, _frames_to_model(frames, opts.device, opts.dtype), opts)


def encode_tensor(model, video: Tensor, **options) -> EncodeResult:
    """Encode a (1, 3, T, H, W) clip in [-1, 1] (any T, H, W) through the engine; returns the
    posterior moments (1, z, T', h, w) of the padded clip and its geometry."""
    return encode_chunks(model, [video], _whole_clip_options(model, **options))


def _chunk_bounds(length: int, chunk: int, first_extra: int = 1) -> list[tuple[int, int]]:
    """[(start, end)] cutting ``length`` into a first chunk of ``first_extra + chunk`` and then
    chunks of ``chunk`` (``chunk == 0``: one chunk)."""
    if not chunk:
        return [(0, length)]
    bounds = [(0, min(length, first_extra + chunk))]
    while bounds[-1][1] < length:
        start = bounds[-1][1]
        bounds.append((start, min(length, start + chunk)))
    return bounds


# --- decode ----------------------------------------------------------------------------------------


def default_chunk_frames(model, device: str) -> int:
    """Frames per chunk when the user names none: on CUDA one latent frame (``time_factor`` video
    frames), so decode memory stays that of a streaming decoder while the GPU remains busy; on the
    CPU :data:`DEFAULT_CHUNK_FRAMES`, where longer chunks cost no time and fewer calls less overhead."""
    return model.time_factor if str(device).startswith("cuda") else DEFAULT_CHUNK_FRAMES


def latent_chunk_frames(model, opts: EngineOptions) -> int:
    """Latent frames per decode chunk matching ``chunk_frames`` video frames."""
    return opts.chunk_frames // model.time_factor if opts.chunk_frames else 0


def decode_chunks(model, z: Tensor, opts: EngineOptions | None = None) -> Iterator[Tensor]:
    """Decode unscaled latents (1, z, T', h, w) chunk by chunk; yields float32 NCTHW chunks in
    [-1, 1] (not clamped) of the padded clip, in order, on ``opts.device``. With tiling and
    ``tile_order='tile'`` the whole clip is decoded (tile by tile) before the first chunk is yielded.

    Gradients are off inside each step only (not across the yields, which would switch them off in
    the caller too), and no ``torch.no_grad()`` generator wrapper is used: it keeps the last yielded
    chunk alive while the next one is computed."""
    opts = opts or EngineOptions()
    check_options(model, opts)
    if z.ndim != 5 or z.shape[0] != 1 or z.shape[1] != model.latent_channels:
        raise ValueError(f"expected latents (1, {model.latent_channels}, T, h, w), got {tuple(z.shape)}")
    sf = model.space_factor
    if opts.tiling == "official":
        tiling = opts.official_tiling(model)
        with torch.no_grad():
            whole = model.official_decode(z.to(opts.device, opts.dtype), tiling).float()
        yield whole
        return
    plan = plan_tiles(model, z.shape[-2], z.shape[-1], opts, encoder=False)
    bounds = _chunk_bounds(z.shape[2], latent_chunk_frames(model, opts))
    stem, body = decode_steps(model, opts.compile)
    if plan is not None and opts.tile_order == "tile":
        chunks = _decode_tiles_over_clip(model, z, bounds, plan, stem, body, opts)
        while chunks:
            chunk = chunks.pop(0).float()
            yield chunk
            del chunk
        return
    tile_caches, stem_cache = _new_caches(opts, plan)
    progress = _progress(opts, "decode", unit="chunk", total=len(bounds))
    for a, b in bounds:
        with torch.no_grad():
            features, stem_cache = stem(z[:, :, a:b].to(opts.device, opts.dtype), stem_cache)
            chunk = _run_tiled(body, features, plan, tile_caches, 1, sf, exchanges_tile_norms(model, opts)).float()
        del features  # only the caches carry over: the next chunk starts with nothing else held
        yield chunk
        del chunk
        progress.update(1)
    progress.close()


def _decode_tiles_over_clip(model, z: Tensor, bounds, plan: TilePlan, stem, body, opts: EngineOptions) -> list[Tensor]:
    """Tile-major decode: the untiled stem runs chunk by chunk over the whole clip first (its
    latent-resolution features are kept), then each tile runs through all chunks."""
    with torch.no_grad():
        stem_cache = CausalCache() if opts.chunk_frames else None
        features = []
        for a, b in bounds:
            f, stem_cache = stem(z[:, :, a:b].to(opts.device, opts.dtype), stem_cache)
            features.append(f)
        del stem_cache, f
        return _run_tiles_over_clip(body, features, plan, 1, model.space_factor, opts, "decode tiles")


def decode_steps(model, mode: str = "none"):
    """``(stem, body)``: ``fn(x, cache) -> (y, cache)`` callables for ``model.decode_stem`` and
    ``model.decode_body``, eager (``none``) or compiled with ``torch.compile(mode=mode)``.

    The compiled functions are those of the model's class, shared by every instance and cached by
    ``torch.compile`` itself (keyed by guards on the module and the shapes), so a second clip reuses
    the compiled code and no reference to the model is kept."""
    if mode == "none":
        return model.decode_stem, model.decode_body
    cls = type(model)
    return (functools.partial(_compiled(cls.decode_stem, mode), model),
            functools.partial(_compiled(cls.decode_body, mode), model))


@functools.cache
def _compiled(fn, mode: str):
    compiled = torch.compile(fn, mode=mode, dynamic=False)
    if mode != "reduce-overhead":
        return compiled

    def step(model, x: Tensor, cache):
        # CUDA graphs replay into static buffers: start a new step, copy out what outlives it
        torch.compiler.cudagraph_mark_step_begin()
        y, cache = compiled(model, x, cache)
        if cache is not None:
            cache = CausalCache({k: v.clone() for k, v in cache.frames.items()}, cache.norm_sync)
        return y.clone(), cache

    return step


def decode_tensor(model, z: Tensor, geometry: VideoGeometry | None = None, **options) -> Tensor:
    """Decode latents through the engine to one float32 NCTHW clip in [-1, 1] (not clamped),
    cropped to ``geometry`` when given."""
    opts = _whole_clip_options(model, **options)
    out = torch.cat([c.cpu() for c in decode_chunks(model, z, opts)], dim=2)
    if geometry is not None:
        out = out[:, :, : geometry.frames, : geometry.height, : geometry.width]
    return out


def decode_frames(model, z: Tensor, geometry: VideoGeometry, opts: EngineOptions | None = None) -> Iterator[Tensor]:
    """Decode to uint8 RGB frame chunks (t, H, W, 3) on the CPU, cropped to the original
    geometry: padding frames are never yielded. Memory stays bounded by one chunk."""
    return _cropped_frames(decode_chunks(model, z, opts), geometry)


def _cropped_frames(chunks: Iterable[Tensor], geometry: VideoGeometry) -> Iterator[Tensor]:
    """float (1, 3, t, H', W') chunks of the padded clip -> uint8 (t, H, W, 3) chunks of the original."""
    emitted = 0
    for chunk in chunks:
        keep = min(chunk.shape[2], geometry.frames - emitted)
        if keep <= 0:
            break
        frames = to_uint8_frames(chunk[:, :, :keep, : geometry.height, : geometry.width])[0]
        emitted += keep
        yield frames.cpu()


# --- tokens (models with a discrete head, e.g. OneVAE) ------------------------------------------------


@dataclass
class TokenizeResult:
    """Token indices of a clip (the model's ``Tokens``) and its geometry."""

    tokens: object
    geometry: VideoGeometry


def _check_token_options(model, opts: EngineOptions) -> None:
    check_options(model, opts)
    if opts.tiling != "halo":
        raise ValueError("tokens support tiling='halo' only")
    if opts.tile and model.config.first_frame_boost:
        raise ValueError("first_frame_boost models tokenise untiled (tile=0): frame 0's hi-res branch "
                         "runs on the whole frame")


@torch.no_grad()
def tokenize_chunks(model, chunks: Iterable[Tensor], opts: EngineOptions | None = None) -> TokenizeResult:
    """Tokenise a stream of float (1, 3, t, H, W) chunks in [-1, 1] of one clip (padded as for
    :func:`encode_chunks`). The quantiser is pointwise, so without first-frame boost this is
    :func:`encode_chunks` (chunked and tiled) followed by quantising the mean; with it, the chunks
    run untiled and the first chunk also yields frame 0's hi-res latent."""
    opts = opts or EngineOptions()
    _check_token_options(model, opts)
    if not model.config.first_frame_boost:
        result = encode_chunks(model, chunks, opts)
        _, indices = model.quantise(result.mean.to(opts.device, opts.dtype))
        return TokenizeResult(model.make_tokens(indices.cpu(), None), result.geometry)
    source = _ChunkSource(chunks, opts.chunk_frames, model.time_factor, model.space_factor)
    cache = CausalCache() if opts.chunk_frames else None
    means, first = [], None
    for x in source:
        moments, chunk_first, cache = model.encode_chunk_parts(x.to(opts.device, opts.dtype), cache)
        means.append(moments[:, : model.latent_channels])
        if chunk_first is not None:
            first = chunk_first
    mean = torch.cat(means, dim=2)[:, :, 1:]  # frame 0 is tokenised at high resolution only
    _, indices = model.quantise(mean)
    _, first_indices = model.quantise(first)
    return TokenizeResult(model.make_tokens(indices.cpu(), first_indices.cpu()), source.geometry)


def tokenize_frames(model, frames: Iterable[Tensor], opts: EngineOptions | None = None) -> TokenizeResult:
    """Tokenise a stream of uint8 (t, H, W, 3) RGB frame chunks (e.g. ``VideoReader.iter_chunks``)."""
    opts = opts or EngineOptions()
    return tokenize_chunks(model, _frames_to_model(frames, opts.device, opts.dtype), opts)


def tokenize_tensor(model, video: Tensor, **options) -> TokenizeResult:
    """Tokenise a (1, 3, T, H, W) clip in [-1, 1] (any T, H, W) through the engine."""
    return tokenize_chunks(model, [video], _whole_clip_options(model, **options))


def detokenize_chunks(model, tokens, opts: EngineOptions | None = None) -> Iterator[Tensor]:
    """Decode tokens chunk by chunk; yields float32 NCTHW chunks in [-1, 1] (not clamped) of the
    padded clip, in order. Without first-frame boost the dequantised latents go through
    :func:`decode_chunks` (chunked and tiled); with it, chunks run untiled and the first one
    carries frame 0's hi-res latent."""
    opts = opts or EngineOptions()
    _check_token_options(model, opts)
    with torch.no_grad():
        z, z_first = model.tokens_to_latents(tokens.to(opts.device))
    if z_first is None:
        yield from decode_chunks(model, z.float().cpu(), opts)
        return
    cache = CausalCache() if opts.chunk_frames else None
    step = latent_chunk_frames(model, opts)
    # chunk bounds over the latent stream [slot, rest...]: the slot is latent 0
    for a, b in _chunk_bounds(1 + z.shape[2], step):
        first = z_first.to(opts.dtype) if a == 0 else None
        rest = z[:, :, max(a - 1, 0) : b - 1].to(opts.dtype)
        with torch.no_grad():
            y, cache = model.decode_parts_chunk(rest, cache, first)
            y = y.float()
        yield y
        del y


def detokenize_frames(model, tokens, geometry: VideoGeometry, opts: EngineOptions | None = None) -> Iterator[Tensor]:
    """Decode tokens to uint8 RGB frame chunks (t, H, W, 3) on the CPU, cropped to ``geometry``."""
    return _cropped_frames(detokenize_chunks(model, tokens, opts), geometry)


def detokenize_tensor(model, tokens, geometry: VideoGeometry | None = None, **options) -> Tensor:
    """Decode tokens through the engine to one float32 NCTHW clip in [-1, 1] (not clamped), cropped
    to ``geometry`` when given."""
    opts = _whole_clip_options(model, **options)
    out = torch.cat([c.cpu() for c in detokenize_chunks(model, tokens, opts)], dim=2)
    if geometry is not None:
        out = out[:, :, : geometry.frames, : geometry.height, : geometry.width]
    return out


# --- memory budget -----------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}


def parse_size(text: str) -> int:
    """'1.5G', '800M', '2GB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"cannot read memory size {text!r} (use e.g. 800M or 2G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


# Working tensors per conv block in the plain count (input, normalised copy, padded copy, conv
# output, residual sum). Inference now writes the norm into the padded input and sums in place; the
# measured factors below absorb the difference, so the count stays as calibrated.
_LIVE_TENSORS = 5
# Measured peak over the estimate below, per family: on the CPU in fp32, the largest factor
# ``(peak RSS growth - caches - weights) / activations`` (``peak_parts``) over whole-clip, chunked
# and tiled encode and decode runs, plus 10% (``python benchmarks/calibrate_memory.py``): causal-vae,
# cv-vae and onevae from their small presets at 360x640 (set before the norm-into-padded-input change
# lowered peaks, so conservative: tiny now measures 2.66); od-vae from ``od-vae`` at 9x192x320
# (largest 1.38, chunked decode), whose caches and weights the parts already count in full.
MEMORY_FACTORS = {"causal-vae": 4.5, "cv-vae": 3.4, "onevae": 7.5, "od-vae": 1.5}
# Families not measured take the largest factor.
_FALLBACK_MEMORY_FACTOR = max(MEMORY_FACTORS.values())
# Frames a caller holds besides the chunk (the CLI reads 16-frame uint8 chunks and converts them).
IO_FRAMES = 16


def _require_memory_model(model) -> None:
    if not hasattr(model.config, "channel_mult"):
        raise MemoryBudgetError(f"--max-memory has no memory model for {model.family} models yet; choose "
                                "--chunk-frames and --tile instead")


@dataclass(frozen=True)
class PeakParts:
    """The parts of a planned peak, in bytes: ``activations`` (tile or latent-resolution
    activations and the output canvas, before the family's factor), every tile's ``caches``, the
    ``weights`` and the caller's frame buffers (``io``)."""

    activations: int
    caches: int
    weights: int
    io: int

    def total(self, factor: float) -> int:
        return int(factor * self.activations) + self.caches + self.weights + self.io


def peak_parts(
    model, chunk_frames: int, tile_h: int, tile_w: int, dtype: torch.dtype, frame_h: int, frame_w: int,
    cache_per_pixel: float | None = None,
) -> PeakParts:
    """The parts of :func:`estimate_peak_bytes` (same arguments), unscaled. Tiled plans are
    costed in chunk order (every tile's caches alive), the order of the streams it plans for."""
    _require_memory_model(model)
    cfg = model.config
    item = torch.empty((), dtype=dtype).element_size()
    frames = 1 + chunk_frames
    levels = len(cfg.channel_mult)
    peak = 0
    t, h, w = frames, tile_h, tile_w
    for i in range(levels):
        channels = cfg.base_channels * cfg.channel_mult[i]
        peak = max(peak, _LIVE_TENSORS * channels * t * h * w * item)
        if i < levels - 1:
            h, w = h // 2, w // 2
            if cfg.temporal_down[i]:
                t = 1 + (t - 1) // 2
    latent_pixels = (frame_h // model.space_factor) * (frame_w // model.space_factor)
    untiled = _LIVE_TENSORS * cfg.base_channels * cfg.channel_mult[-1] * t * latent_pixels * item
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    canvas = 3 * frames * frame_h * frame_w * 4 * 2  # float32 canvas of the whole frame + its uint8/normalised copy
    io = IO_FRAMES * frame_h * frame_w * 3 * 5  # uint8 frames and their float32 copy
    if cache_per_pixel is None:
        cache_per_pixel = cache_bytes_per_pixel(model, dtype)
    # every tile's causal state lives at once, halos included
    overlap = _tile_extent_pixels(model, tile_h, tile_w, frame_h, frame_w) / (tile_h * tile_w)
    caches = int(cache_per_pixel * frame_h * frame_w * overlap)
    return PeakParts(max(peak, untiled) + canvas, caches, weights, io)


def _tile_extent_pixels(model, tile_h: int, tile_w: int, frame_h: int, frame_w: int) -> int:
    """Video pixels of one tile's extended region (core plus default halo, within the frame)."""
    if (tile_h, tile_w) == (frame_h, frame_w):
        return tile_h * tile_w
    sf = model.space_factor
    radius = max(model.encoder_receptive_radius(), model.decoder_receptive_radius())
    halo = (math.ceil(radius) + default_ramp(min(tile_h, tile_w) // sf)) * sf
    return min(tile_h + 2 * halo, frame_h) * min(tile_w + 2 * halo, frame_w)


def tile_order_held_bytes(
    model, frames: int, tile_h: int, tile_w: int, dtype: torch.dtype, frame_h: int, frame_w: int,
    cache_per_pixel: float | None = None,
) -> dict[str, int]:
    """What each tile order holds besides one chunk's work, in bytes, for a tiled stream of
    ``frames`` video frames of ``frame_h`` x ``frame_w`` pixels on ``tile_h`` x ``tile_w`` tiles:
    ``chunk`` keeps every tile's causal caches alive, halos included (they do not depend on the
    chunk length); ``tile`` keeps one tile's caches but holds the whole clip: float32 RGB of every
    frame (the decode canvases, or the encoder's input) and its latent-resolution features."""
    _require_memory_model(model)
    if cache_per_pixel is None:
        cache_per_pixel = cache_bytes_per_pixel(model, dtype)
    all_tiles = peak_parts(model, 0, tile_h, tile_w, dtype, frame_h, frame_w, cache_per_pixel).caches
    one_tile = cache_per_pixel * _tile_extent_pixels(model, tile_h, tile_w, frame_h, frame_w)
    item = torch.empty((), dtype=dtype).element_size()
    sf, cfg = model.space_factor, model.config
    latent_frames = (frames - 1) // model.time_factor + 1
    features = latent_frames * cfg.base_channels * cfg.channel_mult[-1] * (frame_h // sf) * (frame_w // sf) * item
    return {"chunk": all_tiles, "tile": int(one_tile + frames * 3 * frame_h * frame_w * 4 + features)}


def stream_tile_order(
    model, frames: int | None, tile_h: int, tile_w: int, dtype: torch.dtype, frame_h: int, frame_w: int,
    cache_per_pixel: float | None = None,
) -> str:
    """The tile order (``chunk`` or ``tile``) that holds less (:func:`tile_order_held_bytes`) for a
    tiled stream of ``frames`` video frames; both orders give the same values. Chunk order when the
    frame count is unknown or the family has no memory model (the clip's length bounds nothing
    then)."""
    if frames is None or not hasattr(model.config, "channel_mult"):
        return "chunk"
    held = tile_order_held_bytes(model, frames, tile_h, tile_w, dtype, frame_h, frame_w, cache_per_pixel)
    return "tile" if held["tile"] < held["chunk"] else "chunk"


def estimate_peak_bytes(
    model, chunk_frames: int, tile_h: int, tile_w: int, dtype: torch.dtype, frame_h: int, frame_w: int,
    cache_per_pixel: float | None = None, tile_order: str = "chunk", frames: int | None = None,
) -> int:
    """Peak memory of encoding or decoding one chunk of ``1 + chunk_frames`` video frames: the tiled
    part on a ``tile_h`` x ``tile_w`` tile, the untiled latent-resolution part (mid blocks with
    attention) on the whole ``frame_h`` x ``frame_w`` frame and the output canvas, scaled by the
    family's measured :data:`MEMORY_FACTORS`, plus every tile's causal state
    (``cache_per_pixel``: :func:`cache_bytes_per_pixel`, measured when not given), the weights and
    the caller's frame buffers. Tiles are costed in chunk order; ``tile_order='tile'`` costs a
    clip of ``frames`` video frames run tile by tile instead (one tile's caches, the clip held)."""
    parts = peak_parts(model, chunk_frames, tile_h, tile_w, dtype, frame_h, frame_w, cache_per_pixel)
    total = parts.total(MEMORY_FACTORS.get(model.family, _FALLBACK_MEMORY_FACTOR))
    if tile_order == "tile" and (tile_h, tile_w) != (frame_h, frame_w):
        if frames is None:
            raise ValueError("tile order holds the whole clip: its frame count is needed")
        held = tile_order_held_bytes(model, frames, tile_h, tile_w, dtype, frame_h, frame_w, cache_per_pixel)
        total += held["tile"] - held["chunk"]
    return total


@torch.no_grad()
def cache_bytes_per_pixel(model, dtype: torch.dtype) -> float:
    """Bytes of causal state (:class:`CausalCache`) per video pixel that encoding or decoding (the
    larger) carries from one chunk to the next, measured by running two small chunks. All tiles'
    caches live at once, so this part of the peak does not shrink with the tile size."""
    param = next(model.parameters())
    tf, sf = model.time_factor, model.space_factor
    size = 8 * sf
    scale = torch.empty((), dtype=dtype).element_size() / param.element_size()  # run in the model's dtype
    dtype = param.dtype
    video = torch.zeros(1, 3, 1 + tf, size, size, device=param.device, dtype=dtype)
    cache = CausalCache()
    for chunk in (video, video[:, :, :tf]):
        features, cache = model.encode_body(chunk, cache)
        _, cache = model.encode_head(features, cache)
    encode = cache.nbytes()
    latent = torch.zeros(1, model.latent_channels, 2, 8, 8, device=param.device, dtype=dtype)
    cache = CausalCache()
    for chunk in (latent, latent[:, :, :1]):
        features, cache = model.decode_stem(chunk, cache)
        _, cache = model.decode_body(features, cache)
    return max(encode, cache.nbytes()) * scale / (size * size)


def available_memory_bytes(device: str) -> int | None:
    """Memory free for this process: ``MemAvailable`` of ``/proc/meminfo`` on the CPU (None where
    there is no such file), the free device memory on CUDA."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def plan_for_budget(
    model, height: int, width: int, budget: int, dtype: torch.dtype, frames: int | None = None,
    tile_order: str = "chunk",
) -> tuple[int, int]:
    """Pick (chunk_frames, tile) for a clip of ``height`` x ``width`` pixels within ``budget``
    bytes: the largest chunk, untiled if possible, else the largest tile that fits. Tiled plans are
    costed in ``tile_order``; ``auto`` costs the order :func:`stream_tile_order` will pick for a
    clip of ``frames`` video frames (chunk order when the length is unknown)."""
    if tile_order not in TILE_ORDERS:
        raise ValueError(f"tile_order must be one of {TILE_ORDERS}, got {tile_order!r}")
    tf, sf = model.time_factor, model.space_factor
    tiles = [0] + [t for t in (1024, 768, 512, 384, 256, 192, 128, 96, 64) if t % sf == 0 and t < max(height, width)]
    chunks = [c * tf for c in (8, 4, 2, 1)]
    _require_memory_model(model)
    need = None
    per_pixel = cache_bytes_per_pixel(model, dtype)  # measured once for all candidate plans
    orders = {"chunk": ["chunk"], "tile": ["tile"], "auto": ["chunk", "tile"] if frames is not None else ["chunk"]}
    for tile in tiles:
        th, tw = (height, width) if tile == 0 else (min(tile, height), min(tile, width))
        th, tw = th + (-th % sf), tw + (-tw % sf)
        for chunk in chunks:
            estimate = min(estimate_peak_bytes(model, chunk, th, tw, dtype, height, width, per_pixel,
                                               tile_order=order, frames=frames) for order in orders[tile_order])
            if estimate <= budget:
                return chunk, tile
            need = estimate if need is None else min(need, estimate)
    raise MemoryBudgetError(
        f"{height}x{width} video does not fit a memory budget of {budget / 2**20:.0f} MiB "
        f"(the leanest chunk and tile sizes need about {need / 2**20:.0f} MiB: --max-memory "
        f"{math.ceil(need / 2**29) / 2:g}G)"
    )


def _progress(opts: EngineOptions, desc: str, unit: str, total: int | None = None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not opts.progress, leave=False)
