"""The ``videovae`` command line.

Every command reports bad input as one line ``videovae: error: ...`` on stderr and exits with
status 1; outputs are written atomically, so a failed command leaves no partial file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from videovae import __version__
from videovae.checkpoint import CheckpointError, load_checkpoint, model_digest, read_metadata, save_checkpoint
from videovae.engine import (
    COMPILE_MODES,
    DEFAULT_CHUNK_FRAMES,
    TILE_ORDERS,
    TILINGS,
    EngineOptions,
    MemoryBudgetError,
    available_memory_bytes,
    decode_frames,
    default_chunk_frames,
    detokenize_frames,
    encode_frames,
    estimate_peak_bytes,
    exchanges_tile_norms,
    parse_size,
    plan_for_budget,
    stream_tile_order,
    tokenize_frames,
)
from videovae.fileutil import atomic_path
from videovae.io import VideoIOError, VideoReader, VideoWriter, probe
from videovae.latents import (
    METADATA_KEY,
    LatentFileError,
    LatentMeta,
    check_model_matches,
    latent_identity,
    load_latents,
    save_latents,
)
from videovae.models import PRESETS, from_preset
from videovae.models.turbo_vaed import TEACHERS as TURBO_TEACHERS
from videovae.models.turbo_vaed import teacher_parameter_ratio
from videovae.shipped import DEFAULT_MODEL, SHIPPED, resolve_weights, shipped_name_of
from videovae.tokens import TOKEN_FORMAT, TokenFileError, TokenMeta, load_tokens, save_tokens, token_stats
from videovae.tokens import check_model_matches as check_tokens_match

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
READ_CHUNK = 16
WEIGHTS_HELP = f"checkpoint, or a shipped model's name (default: the shipped model {DEFAULT_MODEL})"

USER_ERRORS = (VideoIOError, CheckpointError, LatentFileError, TokenFileError, MemoryBudgetError, ValueError,
               FileNotFoundError, TypeError)


class CLIError(ValueError):
    """An error worth one line to the user."""


# --- shared helpers ---------------------------------------------------------------------------------


def _add_engine_flags(p: argparse.ArgumentParser, frames: bool = True) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--chunk-frames", type=int, default=None,
                   help=f"video frames per time chunk after the first (default: {DEFAULT_CHUNK_FRAMES} on the CPU, "
                        "one latent frame on CUDA; 0 = whole clip)")
    g.add_argument("--tile", type=int, default=None, help="spatial tile size in pixels (default 0 = no tiling)")
    g.add_argument("--tile-norm", default="tile", choices=["tile", "exact"],
                   help="GroupNorm statistics when tiling: per tile (fast) or whole-frame (exact, slower)")
    g.add_argument("--tile-order", default="auto", choices=TILE_ORDERS,
                   help="when tiling: advance all tiles chunk by chunk (memory bounded in clip length; every "
                        "tile keeps its caches), or run each tile through the whole clip (one tile's caches "
                        "alive; the whole clip is held); auto (default): the one with the smaller planned "
                        "peak for this clip. Same values either way")
    g.add_argument("--max-memory", default=None, help="memory budget, e.g. 2G: picks chunk length and tile size")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype")
    g.add_argument("--tiling", default="halo", choices=TILINGS,
                   help="halo: cache-carrying chunks and halo tiles (default); official: the model's own windowed "
                        "tiling with the official sizes stored in its config (whole clip in memory); then "
                        "--chunk-frames, --decode-latents, --tile and --tile-overlap each override one size")
    g.add_argument("--decode-latents", type=int, default=None,
                   help="--tiling official: latents per decode window after the first (0 = no windows)")
    g.add_argument("--tile-overlap", type=float, default=None, help="--tiling official: tile overlap ratio")
    g.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile the per-chunk decode step (reduce-overhead: CUDA graphs); none = eager")
    if frames:
        g.add_argument("--max-frames", type=int, default=None, help="read at most this many frames")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _engine_options(args, model, height: int, width: int, frames: int | None) -> EngineOptions:
    """Engine options from the flags for a clip of ``frames`` video frames (None: unknown) of
    ``height`` x ``width`` pixels."""
    dtype = DTYPES[args.dtype]
    if getattr(args, "tiling", "halo") == "official":
        if args.compile != "none":
            raise CLIError("--compile applies to the chunked decode step, not to --tiling official")
        if args.max_memory is not None:
            raise CLIError("--max-memory plans halo tiling; it cannot be combined with --tiling official")
        return EngineOptions(
            device=args.device,
            dtype=dtype,
            progress=not args.quiet,
            tiling="official",
            official_frames=args.chunk_frames,
            official_decode_latents=args.decode_latents,
            official_tile=args.tile,
            official_overlap=args.tile_overlap,
        )
    if args.decode_latents is not None or args.tile_overlap is not None:
        raise CLIError("--decode-latents and --tile-overlap only apply with --tiling official")
    chunk, tile = args.chunk_frames, args.tile
    if args.max_memory is not None:
        budget = parse_size(args.max_memory)
        # exact tile norms are exchanged between the tiles of each chunk: chunk order only
        exact_norms = args.tile_norm == "exact" and not model.config.halo_tiling_exact
        auto_chunk, auto_tile = plan_for_budget(model, height, width, budget, dtype, frames=frames,
                                                tile_order="chunk" if exact_norms else args.tile_order)
        chunk = auto_chunk if chunk is None else chunk
        tile = auto_tile if tile is None else tile
    opts = EngineOptions(
        chunk_frames=default_chunk_frames(model, args.device) if chunk is None else chunk,
        tile=0 if tile is None else tile,
        tile_norm=args.tile_norm,
        tile_order="chunk" if args.tile_order == "auto" else args.tile_order,
        device=args.device,
        dtype=dtype,
        progress=not args.quiet,
        tiling=getattr(args, "tiling", "halo"),
        compile=args.compile,
    )
    if args.tile_order == "auto" and opts.tile and opts.chunk_frames and not exchanges_tile_norms(model, opts):
        th, tw = min(opts.tile, height), min(opts.tile, width)
        opts = dataclasses.replace(opts, tile_order=stream_tile_order(model, frames, th, tw, dtype, height, width))
    if args.max_memory is None:
        _check_fits_memory(model, opts, height, width, frames)
    return opts


def _check_fits_memory(model, opts: EngineOptions, height: int, width: int, frames: int | None) -> None:
    """Without ``--max-memory``: refuse, before starting, a run whose planned peak exceeds the memory
    available (instead of being killed half-way), naming the ``--max-memory`` that would fit."""
    chunk, tile = opts.chunk_frames, opts.tile
    th, tw = (height, width) if tile == 0 else (min(tile, height), min(tile, width))
    if chunk == 0 or not hasattr(model.config, "channel_mult"):
        return  # whole clip: its length is not known here; no memory model for this family
    if tile and opts.tile_order == "tile" and frames is None:
        return  # the clip this order holds has no known length
    available = available_memory_bytes(opts.device)
    if available is None:
        return
    need = estimate_peak_bytes(model, chunk, th, tw, opts.dtype, height, width, tile_order=opts.tile_order,
                               frames=frames)
    if need > available:
        tiles = f" and {tile} px tiles ({opts.tile_order} order)" if tile else ""
        raise CLIError(f"{width}x{height} frames in chunks of {chunk} frames{tiles} need about {need / 2**30:.1f} GiB, "
                       f"but {available / 2**30:.1f} GiB are available: pass --max-memory "
                       f"{max(0.5, available * 0.8 / 2**30):.1f}G to plan chunks and tiles that fit")


def _tiling_record(opts: EngineOptions, model) -> dict:
    """How a latent file was made: the halo chunk/tile sizes, or the official sizes used."""
    if opts.tiling == "official":
        return {"tiling": "official", "official_tiling": dataclasses.asdict(opts.official_tiling(model))}
    return {"chunk_frames": opts.chunk_frames, "tile": opts.tile, "tiling": opts.tiling}


def _load_model(args, weights: str | None = None):
    """The model of ``--weights`` (a checkpoint or a shipped model's name), else of ``weights``, else
    the default shipped model; says once which shipped model it uses."""
    path, shipped = resolve_weights(args.weights if args.weights is not None else weights)
    if shipped is not None and not args.quiet:
        print(f"videovae: using the shipped model {shipped} ({path})", file=sys.stderr)
    return load_checkpoint(path, device=args.device, dtype=DTYPES[args.dtype])


def _check_output_parent(path: str) -> None:
    parent = Path(path.rstrip("/")).resolve().parent
    if not parent.is_dir():
        raise CLIError(f"{path}: output folder {parent} does not exist")


def _counted(chunks: Iterator[torch.Tensor], progress) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        progress.update(chunk.shape[0])
        yield chunk


def _frame_progress(args, desc: str, total: int | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=args.quiet, leave=False)


def _stream_file(args, model, path: str, run):
    """Read ``path`` chunk by chunk (with a progress bar) into ``run(model, frame_chunks, opts)``
    (``encode_frames`` or ``tokenize_frames``); returns (its result, the VideoInfo, the options)."""
    info = probe(path)
    total = info.num_frames if args.max_frames is None or info.num_frames is None else min(
        info.num_frames, args.max_frames)
    opts = _engine_options(args, model, info.height, info.width, total)
    with VideoReader(path, max_frames=args.max_frames) as reader, _frame_progress(args, "read", total) as bar:
        result = run(model, _counted(reader.iter_chunks(READ_CHUNK), bar), opts)
    return result, info, opts


def _file_record(opts: EngineOptions, model, digest: str) -> dict:
    """The ``extra`` metadata of a latent or token file: how it was made, and the shipped model."""
    extra = _tiling_record(opts, model)
    shipped = shipped_name_of(digest)
    if shipped is not None:
        extra["shipped_model"] = shipped
    return extra


def _encode_file(args, model, path: str, sample: bool, seed: int | None):
    """Stream ``path`` through the encoder; returns (latent, LatentMeta)."""
    result, info, opts = _stream_file(args, model, path, encode_frames)
    if sample:
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        latent = result.sample(generator)
    else:
        latent = result.mean
    digest = model_digest(model)
    extra = _file_record(opts, model, digest)
    source = latent_identity(model, digest)  # a turbo pair writes its teacher's latents
    meta = LatentMeta(
        family=source.family,
        config=source.config,
        weights_sha256=source.weights_sha256,
        scaling_factor=model.config.scaling_factor,
        shift_factor=model.config.shift_factor,
        fps=info.fps,
        geometry=result.geometry,
        dtype="float32",
        sampled=sample,
        source=os.path.basename(path),
        extra=extra,
    )
    return latent, meta


def _require_quantiser(args, model) -> None:
    if getattr(model, "quantizer", None) is None:
        weights = args.weights if args.weights is not None else f"the shipped model {DEFAULT_MODEL}"
        raise CLIError(f"--discrete needs a model with a quantiser (a OneVAE token model); {weights} "
                       f"({model.family}) has none")


def _tokenize_file(args, model, path: str) -> tuple[dict[str, torch.Tensor], TokenMeta]:
    """Stream ``path`` through the encoder and the quantiser; returns (token tensors, TokenMeta)."""
    _require_quantiser(args, model)
    result, info, opts = _stream_file(args, model, path, tokenize_frames)
    tensors = {"tokens": result.tokens.rest}
    if result.tokens.first is not None:
        tensors["first_tokens"] = result.tokens.first
    q = model.quantizer
    digest = model_digest(model)
    extra = _file_record(opts, model, digest)
    source_bytes: int | None = os.path.getsize(path)
    if info.num_frames and result.geometry.frames < info.num_frames:
        # only the first frames were encoded (--max-frames): their share of the file, for a fair bpp
        source_bytes = round(source_bytes * result.geometry.frames / info.num_frames)
        extra["source_bytes_prorated_from"] = {"bytes": os.path.getsize(path), "frames": info.num_frames}
    elif info.num_frames is None and args.max_frames is not None and result.geometry.frames >= args.max_frames:
        source_bytes = None  # a truncated read of a file whose frame count the container does not state
    meta = TokenMeta(
        family=model.family,
        config=model.config.to_dict(),
        weights_sha256=digest,
        levels=q.levels,
        groups=q.groups,
        bound=q.bound,
        first_frame=result.tokens.first is not None,
        time_factor=model.time_factor,
        space_factor=model.space_factor,
        fps=info.fps,
        geometry=result.geometry,
        source=os.path.basename(path),
        source_bytes=source_bytes,
        extra=extra,
    )
    return tensors, meta


def _file_format(path: str) -> str | None:
    """The ``format`` recorded in a videovae safetensors file (checkpoint, latents or tokens), else None."""
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        return json.loads(raw).get("format") if raw else None
    except (SafetensorError, OSError, ValueError, AttributeError):
        return None


def _decode_to_writer(args, model, latent: torch.Tensor, meta: LatentMeta, out: str, on_frames=None) -> int:
    g = meta.geometry
    opts = _engine_options(args, model, g.padded_height, g.padded_width, g.frames)
    return _write_frames(args, decode_frames(model, latent, g, opts), g.frames, meta.fps, out, on_frames)


def _detokenize_to_writer(args, model, tensors: dict[str, torch.Tensor], meta: TokenMeta, out: str,
                          on_frames=None) -> int:
    g = meta.geometry
    opts = _engine_options(args, model, g.padded_height, g.padded_width, g.frames)
    first = tensors.get("first_tokens")
    tokens = model.make_tokens(tensors["tokens"].long(), None if first is None else first.long())
    return _write_frames(args, detokenize_frames(model, tokens, g, opts), g.frames, meta.fps, out, on_frames)


def _write_frames(args, chunks: Iterator[torch.Tensor], total: int, fps: float, out: str, on_frames=None) -> int:
    written = 0
    with VideoWriter(out, fps, crf=args.crf) as writer, _frame_progress(args, "decode", total) as bar:
        for frames in chunks:
            writer.write(frames)
            if on_frames is not None:
                on_frames(frames)
            written += frames.shape[0]
            bar.update(frames.shape[0])
    return written


# --- commands ---------------------------------------------------------------------------------------


def cmd_init(args) -> None:
    from videovae.models import cvvae
    from videovae.models.odvae import inflate_image_vae, load_image_vae, widen_latent

    torch.manual_seed(args.seed)
    if (args.model is None) == (args.from_checkpoint is None):
        raise CLIError("init needs exactly one of --model PRESET and --from-checkpoint W.safetensors")
    if args.from_image_vae and args.model is None:
        raise CLIError("--from-image-vae needs --model (the 3D preset to inflate into)")
    if args.from_checkpoint and args.widen_latent is None:
        raise CLIError("--from-checkpoint is only used with --widen-latent N")
    _check_output_parent(args.output)
    extra = {"preset": args.model, "seed": args.seed}
    if args.from_checkpoint:
        model = load_checkpoint(args.from_checkpoint)
        extra = {"widened_from": os.path.basename(args.from_checkpoint), "seed": args.seed}
    elif args.from_image_vae:
        family, config = PRESETS[args.model] if args.model in PRESETS else (None, None)
        if family == "od-vae":
            init = args.init or "tail"
            model = inflate_image_vae(load_image_vae(args.from_image_vae), config, init=init)
        elif family == "cv-vae":
            if args.init is not None:
                raise CLIError("--init applies to od-vae presets; cv-vae kernels go to the slot that sees the "
                               "current frame")
            init = "current-frame"
            model = cvvae.inflate_image_vae(cvvae.load_image_vae(args.from_image_vae), config)
        else:
            raise CLIError(f"--from-image-vae inflates into an od-vae or cv-vae preset, not {args.model!r}")
        extra.update(image_vae=os.path.basename(args.from_image_vae.rstrip("/")), init=init)
    else:
        model = from_preset(args.model)
    if args.widen_latent is not None:
        model = widen_latent(model, args.widen_latent, seed=args.seed)
        extra["widen_latent"] = args.widen_latent
    digest = save_checkpoint(args.output, model, dtype=DTYPES[args.dtype] if args.dtype else None, extra=extra)
    params = model.num_parameters()
    name = args.model or model.family
    print(f"wrote {args.output}: {name}, z={model.latent_channels}, {params['total']:,} parameters, "
          f"sha256 {digest[:12]}")


def cmd_convert(args) -> None:
    from videovae.models import cvvae, odvae, onevae

    converters = {"od-vae-official": odvae.convert_official, "cv-vae-official": cvvae.convert_official,
                  "wan2.1": onevae.convert_wan, "onevae-official": onevae.convert_official}
    _check_output_parent(args.output)
    config = None
    if args.fsq_levels is not None:
        if args.from_format != "onevae-official":
            raise CLIError("--fsq-levels applies to --from onevae-official (official checkpoints do not store them)")
        try:
            levels = tuple(int(v) for v in args.fsq_levels.split(","))
        except ValueError:
            raise CLIError(f"--fsq-levels: expected comma-separated integers, got {args.fsq_levels!r}") from None
        config = {"fsq_levels": levels}
    model = converters[args.from_format](args.src, prefer_ema=not args.no_ema, config=config)
    extra = {"converted_from": args.from_format, "source": os.path.basename(args.src.rstrip("/"))}
    digest = save_checkpoint(args.output, model, dtype=DTYPES[args.dtype] if args.dtype else None, extra=extra)
    params = model.num_parameters()
    print(f"wrote {args.output}: {args.from_format} -> {model.family}, {params['total']:,} parameters, "
          f"sha256 {digest[:12]}")


def cmd_encode(args) -> None:
    _check_output_parent(args.output)
    if args.discrete and args.sample:
        raise CLIError("--discrete quantises the posterior mean; it cannot be combined with --sample")
    model = _load_model(args)
    if args.discrete:
        tensors, tmeta = _tokenize_file(args, model, args.input)
        save_tokens(args.output, tensors, tmeta)
        g = tmeta.geometry
        if not args.quiet:
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
            print(f"wrote {args.output}: {shapes} from {g.frames} frames {g.width}x{g.height}")
        return
    latent, meta = _encode_file(args, model, args.input, args.sample, args.seed)
    save_latents(args.output, latent, meta)
    g = meta.geometry
    if not args.quiet:
        print(f"wrote {args.output}: latent {tuple(latent.shape)} from {g.frames} frames {g.width}x{g.height}")


def cmd_decode(args) -> None:
    _check_output_parent(args.output)
    if (args.runtime is None) != (args.exported is None):
        raise CLIError("--runtime and --exported go together (the exported decoder and the runtime to run it)")
    if _file_format(args.input) == TOKEN_FORMAT:
        if args.runtime is not None:
            raise CLIError("--runtime decodes latent files; token files decode with the PyTorch model")
        tensors, meta = load_tokens(args.input)
        model = _load_model(args, _shipped_or_error(args, meta.extra, "tokens"))
        check_tokens_match(meta, model, model_digest(model), args.input)
        n = _detokenize_to_writer(args, model, tensors, meta, args.output)
    elif args.runtime is not None:
        n, meta = _decode_exported(args)
    else:
        latent, meta = load_latents(args.input)
        model = _load_model(args, _shipped_or_error(args, meta.extra, "latents"))
        check_model_matches(meta, model, model_digest(model), args.input)
        n = _decode_to_writer(args, model, latent, meta, args.output)
    if not args.quiet:
        print(f"wrote {args.output}: {n} frames {meta.geometry.width}x{meta.geometry.height} @ {meta.fps:g} fps")


def _decode_exported(args) -> tuple[int, LatentMeta]:
    """``decode --runtime R --exported F``: stream the latent file through the exported decoder
    (its own chunk length; the engine flags do not apply)."""
    from videovae.deploy.runtime import decode_latents_to_frames, open_decoder

    try:
        decoder = open_decoder(args.exported, args.runtime)
    except ImportError as err:
        raise CLIError(str(err)) from None
    if args.weights is not None:
        path, _ = resolve_weights(args.weights)
        digest = read_metadata(path).get("weights_sha256")
        if digest != decoder.spec.weights_sha256:
            raise CLIError(f"{args.exported} was exported from other weights than {args.weights}")
    latent, meta = load_latents(args.input)
    frames = decode_latents_to_frames(latent, meta, decoder, args.input)
    return _write_frames(args, frames, meta.geometry.frames, meta.fps, args.output), meta


def cmd_export(args) -> None:
    from videovae.deploy.export import export_decoder, graph_paths

    _check_output_parent(args.output)
    model = _load_model(args)
    spec = export_decoder(model, args.output, format=args.format, chunk_latents=args.chunk_latents,
                          height=args.height, width=args.width, dtype=args.export_dtype)
    if not args.quiet:
        step, first, sidecar = graph_paths(args.output)
        print(f"wrote {step} (step: {spec.chunk_latents} latents -> {spec.chunk_latents * spec.time_factor} frames), "
              f"{first} (first chunk: {1 + spec.chunk_latents} latents), {sidecar}; {spec.family} "
              f"{spec.width}x{spec.height} {spec.dtype}, {len(spec.state)} state tensors")


def _shipped_or_error(args, extra: dict, what: str) -> str | None:
    """The shipped model named in a latent/token file's metadata; an error when neither it nor
    ``--weights`` says which model decodes the file."""
    shipped = extra.get("shipped_model")
    if args.weights is None and shipped is None:
        raise CLIError(f"{args.input}: these {what} were not made by a shipped model; pass the encoder's "
                       "checkpoint with --weights")
    return shipped


def cmd_roundtrip(args) -> None:
    from videovae.metrics import MetricAccumulator

    for path in (args.output, args.latents, args.metrics, args.preview):
        if path:
            _check_output_parent(path)
    model = _load_model(args)
    if args.discrete:
        tensors, meta = _tokenize_file(args, model, args.input)
        if args.latents:
            save_tokens(args.latents, tensors, meta)
        latent = tensors["tokens"]
    else:
        latent, meta = _encode_file(args, model, args.input, False, None)
        if args.latents:
            save_latents(args.latents, latent, meta)
    accumulator = MetricAccumulator()
    preview = _PreviewCollector(meta.geometry.frames, count=4) if args.preview else None
    with VideoReader(args.input, max_frames=args.max_frames) as reader:
        originals = _rechunk(reader.iter_chunks(READ_CHUNK))

        def compare(frames: torch.Tensor) -> None:
            original = originals.take(frames.shape[0])
            accumulator.update(original, frames)
            if preview is not None:
                preview.add(original, frames)

        if args.discrete:
            _detokenize_to_writer(args, model, tensors, meta, args.output, on_frames=compare)
        else:
            _decode_to_writer(args, model, latent, meta, args.output, on_frames=compare)
    metrics = accumulator.result()
    weights = args.weights if args.weights is not None else f"shipped:{DEFAULT_MODEL}"
    metrics.update(input=args.input, output=args.output, weights=weights, latent_shape=list(latent.shape),
                   discrete=args.discrete)
    if args.discrete:
        metrics["tokens"] = token_stats(tensors, meta)
    if args.metrics:
        with atomic_path(args.metrics) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2))
    if preview is not None:
        preview.save(args.preview)
    print(f"{args.input} -> {args.output}: {metrics['frames']} frames, PSNR {metrics['psnr']:.2f} dB, "
          f"SSIM {metrics['ssim']:.4f}, flicker {metrics['flicker']:.4f}")


class _rechunk:
    """Serve frames from a chunk iterator in pieces of any requested length."""

    def __init__(self, chunks: Iterator[torch.Tensor]):
        self.chunks = chunks
        self.buffer: torch.Tensor | None = None

    def take(self, n: int) -> torch.Tensor:
        parts = []
        while n > 0:
            if self.buffer is None or self.buffer.shape[0] == 0:
                self.buffer = next(self.chunks)
            part, self.buffer = self.buffer[:n], self.buffer[n:]
            parts.append(part)
            n -= part.shape[0]
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class _PreviewCollector:
    """Keeps a few evenly spaced (original, reconstruction) frames for a side-by-side PNG."""

    def __init__(self, total: int, count: int):
        self.wanted = sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(min(count, total))})
        self.seen = 0
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, original: torch.Tensor, reconstruction: torch.Tensor) -> None:
        for i in range(original.shape[0]):
            if self.seen + i in self.wanted:
                self.rows.append((original[i].clone(), reconstruction[i].clone()))
        self.seen += original.shape[0]

    def save(self, path: str) -> None:
        from videovae.io import write_png

        rows = []
        for original, reconstruction in self.rows:
            error = (original.float() - reconstruction.float()).abs().mean(dim=-1, keepdim=True)
            error_map = (error * 4).clamp(0, 255).to(torch.uint8).expand(-1, -1, 3)
            rows.append(torch.cat([original, reconstruction, error_map], dim=1))
        write_png(path, torch.cat(rows, dim=0))


def cmd_info(args) -> None:
    path = args.file
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such file")
    if path.endswith(".safetensors") and _file_format(path) == TOKEN_FORMAT:
        _print_token_info(path)
        return
    if path.endswith(".safetensors"):
        try:
            meta = read_metadata(path)
        except CheckpointError:
            latent, lmeta = load_latents(path)
            g = lmeta.geometry
            print(f"{path}: videovae latents {tuple(latent.shape)} {latent.dtype}")
            shipped = lmeta.extra.get("shipped_model")
            print(f"  model: {lmeta.family}, weights sha256 {lmeta.weights_sha256[:12]}"
                  + (f" (shipped model {shipped})" if shipped else ""))
            print(f"  video: {g.frames} frames {g.width}x{g.height} @ {lmeta.fps:g} fps "
                  f"(padded to {g.padded_frames} x {g.padded_width}x{g.padded_height}, {g.pad_mode})")
            print(f"  scaling {lmeta.scaling_factor:g}, shift {lmeta.shift_factor:g}, sampled: {lmeta.sampled}")
            return
        model = load_checkpoint(path)
        params = model.num_parameters()
        print(f"{path}: videovae checkpoint, family {meta['family']}, weights sha256 {meta['weights_sha256'][:12]}")
        print(f"  compression {model.time_factor}x{model.space_factor}x{model.space_factor}, "
              f"{model.latent_channels} latent channels, parameters: encoder {params['encoder']:,}, "
              f"decoder {params['decoder']:,}")
        print(f"  exactly streamable: {model.config.exactly_streamable}, "
              f"halo tiling exact: {model.config.halo_tiling_exact}")
        if model.family == "turbo-pair":
            cfg = model.config
            print(f"  turbo pair: the encoder of a {cfg.teacher_family} teacher (weights sha256 "
                  f"{cfg.teacher_weights_sha256[:12]}) and a turbo decoder; decodes that teacher's latent files")
        print("  config: " + json.dumps(meta["config"], sort_keys=True))
        return
    info = probe(path)
    frames = "unknown" if info.num_frames is None else str(info.num_frames)
    print(f"{path}: video {info.width}x{info.height}, {frames} frames @ {info.fps:g} fps, "
          f"{info.codec} {info.pix_fmt}")


def _print_token_info(path: str) -> None:
    tensors, meta = load_tokens(path)
    g = meta.geometry
    stats = token_stats(tensors, meta)
    shapes = ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" for k, v in tensors.items())
    print(f"{path}: videovae tokens {shapes}")
    shipped = meta.extra.get("shipped_model")
    print(f"  model: {meta.family}, weights sha256 {meta.weights_sha256[:12]}"
          + (f" (shipped model {shipped})" if shipped else ""))
    print(f"  FSQ levels {list(meta.levels)} ({stats['bits_per_token']:.2f} bits/token), "
          f"{meta.groups} token(s) per latent position, bound {meta.bound}, "
          f"first-frame tokens: {'yes (2x resolution)' if meta.first_frame else 'no'}")
    print(f"  video: {g.frames} frames {g.width}x{g.height} @ {meta.fps:g} fps "
          f"(padded to {g.padded_frames} x {g.padded_width}x{g.padded_height}, {g.pad_mode})")
    print(f"  {stats['tokens']:,} tokens, {stats['tokens_per_second']:,.0f} tokens/s of video")
    line = (f"  bits per pixel: raw {stats['raw_bpp']:.5f}, {stats['compressor']} {stats['compressed_bpp']:.5f}")
    if stats["source_bpp"] is not None:
        line += f", input file {meta.source} {stats['source_bpp']:.5f}"
    print(line)


def cmd_models(args) -> None:
    print(f"{'preset':<20} {'family':<12} {'compression':<12} {'z':>3} {'encoder':>12} {'decoder':>12}  notes")
    for name, (family, cfg) in PRESETS.items():
        with torch.device("meta"):  # shapes only: counting parameters needs no memory
            model = from_preset(name)
        params = model.num_parameters()
        notes = []
        notes.append("exact streaming" if cfg.exactly_streamable else "approximate streaming")
        if cfg.halo_tiling_exact:
            notes.append("exact halo tiling")
        if hasattr(model, "official_encode"):
            notes.append("official tiling")
        if getattr(cfg, "discrete", False):
            notes.append(f"{cfg.fsq_groups} FSQ token(s) of {math.prod(cfg.fsq_levels)} codes per position"
                         + (", first-frame tokens at 2x" if cfg.first_frame_boost else ""))
        if name in TURBO_TEACHERS:
            notes.append(f"decoder-only, {teacher_parameter_ratio(name):.1%} of {TURBO_TEACHERS[name]}'s decoder")
        if name in SHIPPED:
            notes.append("shipped weights (default model)" if name == DEFAULT_MODEL else
                         f"shipped weights, paired with {TURBO_TEACHERS[name]}'s encoder" if name in TURBO_TEACHERS
                         else "shipped weights")
        comp = f"{cfg.time_factor}x{cfg.space_factor}x{cfg.space_factor}"
        print(f"{name:<20} {family:<12} {comp:<12} {cfg.latent_channels:>3} {params['encoder']:>12,} "
              f"{params['decoder']:>12,}  {', '.join(notes)}")


def cmd_bench(args) -> None:
    from videovae.bench import run_bench

    run_bench(args)


def cmd_train(args) -> None:
    from videovae.train.vae import run

    summary = run(args)
    print(f"trained to step {summary['step']} ({summary['samples_per_s']:.2f} samples/s); "
          f"exported {summary['export']}; resume checkpoint {summary['checkpoint']}")


def cmd_distill(args) -> None:
    from videovae.train.distill import run

    summary = run(args)
    val = summary["val"]
    scores = ""
    if val:
        scores = (f"; held-out PSNR student {val['psnr']:.2f} dB, teacher {val['teacher_psnr']:.2f} dB, "
                  f"student vs teacher {val['psnr_vs_teacher']:.2f} dB")
    print(f"distilled to step {summary['step']} ({summary['samples_per_s']:.2f} samples/s){scores}; "
          f"exported {summary['export']}; resume checkpoint {summary['checkpoint']}")


# --- parser ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="videovae", description="Causal 3D video VAEs: encode, decode, measure.")
    parser.add_argument("--version", action="version", version=f"videovae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a freshly initialised checkpoint")
    p.add_argument("--model", default=None, help="preset name (see `videovae models`)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="store weights in this dtype")
    p.add_argument("--from-image-vae", default=None, metavar="PATH",
                   help="inflate a 2D SD-style AutoencoderKL (diffusers folder or .safetensors) into the --model "
                        "preset (od-vae or cv-vae)")
    p.add_argument("--init", default=None, choices=("tail", "center"),
                   help="od-vae: temporal slot of the inflated 2D kernels (default tail: the current frame)")
    p.add_argument("--from-checkpoint", default=None, metavar="W.safetensors",
                   help="start from this trained checkpoint (with --widen-latent)")
    p.add_argument("--widen-latent", type=int, default=None, metavar="N",
                   help="widen the latent to N channels: old weights copied, new ones drawn with matching mean/std")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("convert", help="official weights -> videovae checkpoint")
    p.add_argument("src", help="official folder (config.json + weights) or weights file (.safetensors/.bin/.pt/.ckpt)")
    p.add_argument("--from", dest="from_format", required=True,
                   choices=("od-vae-official", "cv-vae-official", "wan2.1", "onevae-official"),
                   help="source format (wan2.1: Wan2.1_VAE.pth or a diffusers AutoencoderKLWan folder; "
                        "onevae-official: an official OneVAE Lightning checkpoint)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--no-ema", action="store_true", help="training checkpoints: use state_dict, not ema_state_dict")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="store weights in this dtype")
    p.add_argument("--fsq-levels", default=None,
                   help="onevae-official: FSQ levels of the checkpoint, e.g. 8,8,8,5,5,5 (the default: the released "
                        "models' levels; the groups are read from the weights)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("encode", help="video -> latent file (or token file with --discrete)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--sample", action="store_true", help="store a posterior sample instead of the mean")
    p.add_argument("--seed", type=int, default=None, help="seed of --sample")
    p.add_argument("--discrete", action="store_true",
                   help="write FSQ token indices (models with a quantiser, e.g. OneVAE) instead of latents")
    _add_engine_flags(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="latent or token file -> video (.mp4 H.264, .mkv lossless FFV1, or a PNG "
                                       "folder)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--weights", default=None,
                   help="the encoder's checkpoint or shipped model name (default: the shipped model named in the "
                        "latent file)")
    p.add_argument("--crf", type=int, default=18)
    p.add_argument("--runtime", default=None, choices=("onnx", "torch-export"),
                   help="decode with an exported decoder (see `videovae export`) in this runtime; needs --exported")
    p.add_argument("--exported", default=None, metavar="FILE",
                   help="the exported decoder (the -o of `videovae export`; its .first graph and .json sidecar "
                        "lie beside it)")
    _add_engine_flags(p, frames=False)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("export", help="export a decoder for streaming runtimes (ONNX, torch.export): a first-chunk "
                                       "and a step graph with the causal state as explicit tensors")
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--format", required=True, choices=("onnx", "torch-export"))
    p.add_argument("--chunk-latents", type=int, default=4, metavar="K",
                   help="latent frames per step (the first chunk takes 1 + K)")
    p.add_argument("--height", type=int, required=True, help="frame height in pixels (multiple of the space factor)")
    p.add_argument("--width", type=int, required=True, help="frame width in pixels")
    p.add_argument("--export-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the exported graphs")
    p.add_argument("-o", "--output", required=True,
                   help="step graph (e.g. out.onnx); the first-chunk graph (out.first.onnx) and the JSON sidecar "
                        "(out.onnx.json) are written beside it")
    p.add_argument("--quiet", action="store_true")
    # weights load in fp32 on the CPU; --export-dtype casts a copy
    p.set_defaults(func=cmd_export, device="cpu", dtype="float32")

    p = sub.add_parser("roundtrip", help="encode and decode a video, with metrics and a preview")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--weights", default=None, help=WEIGHTS_HELP)
    p.add_argument("--latents", default=None, help="also save the latents (tokens with --discrete) here")
    p.add_argument("--discrete", action="store_true", help="go through the tokens (models with a quantiser)")
    p.add_argument("--metrics", default=None, help="write PSNR/SSIM/flicker JSON here")
    p.add_argument("--preview", default=None, help="write a side-by-side PNG (original | reconstruction | error)")
    p.add_argument("--crf", type=int, default=18)
    _add_engine_flags(p)
    p.set_defaults(func=cmd_roundtrip)

    p = sub.add_parser("info", help="describe a video, checkpoint, latent or token file")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list the model presets")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="encode/decode speed and peak memory for several clip lengths")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="preset (default tiny)")
    src.add_argument("--weights", default=None)
    p.add_argument("--frames", default="17,65,257", help="comma-separated clip lengths")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.add_argument("--no-teacher", action="store_true",
                   help="turbo models: measure the turbo decoder alone (by default its teacher's decoder too)")
    _add_engine_flags(p, frames=False)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="train a VAE (single process; multi-GPU: deepspeed -m videovae.train.vae)")
    p.add_argument("--config", default=None, help="YAML training config (e.g. train/configs/tiny_demo.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/checkpoints/latest")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=2e-4")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="distil a turbo decoder from a frozen teacher VAE "
                                       "(multi-GPU: deepspeed -m videovae.train.distill)")
    p.add_argument("--config", default=None, help="YAML config (e.g. train/configs/distill_tiny.yaml)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (sets distill.teacher)")
    p.add_argument("--student", default=None, help="turbo-vaed preset (sets distill.student), e.g. turbo-od-vae")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/checkpoints/latest")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. distill.align_weight=0")
    p.set_defaults(func=cmd_distill)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, *USER_ERRORS) as err:
        print(f"videovae: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("videovae: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
