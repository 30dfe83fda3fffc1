"""Train a videovae model (VAE + 3D PatchGAN discriminator) with DeepSpeed.

Single process (world size 1, DeepSpeed engines all the same)::

    videovae train --config train/configs/tiny_demo.yaml data.paths=[clips/] max_steps=500
    python -m videovae.train.vae --config C.yaml [key=value ...] [--resume]

Several processes / nodes (on a CPU-only machine add ``DS_ACCELERATOR=cpu``)::

    deepspeed --num_gpus 2 --module videovae.train.vae --config C.yaml [key=value ...] [--resume]

Multi-node runs need ``run_dir`` on a shared file system (every rank writes its optimizer shard and
RNG state into the checkpoint folder).

A run folder holds ``config.yaml`` (the resolved config), ``log.jsonl`` (every logged term and every
validation), ``val.csv``, ``previews/step_N.png`` (original | reconstruction rows of the first
validation clip), ``checkpoints/step_N/`` (DeepSpeed checkpoints of both engines with EMA, counters
and per-rank RNG states; ``checkpoints/latest`` names the newest complete one) and ``vae.safetensors``
(the EMA VAE as a videovae checkpoint that ``videovae encode/decode/roundtrip --weights`` load).
Videos are NCTHW float in [-1, 1] throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib.util
import json
import logging
import math
import os
import pickle
import random
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from videovae.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from videovae.fileutil import atomic_path
from videovae.io import from_model_range, write_png
from videovae.metrics import drift_figures, psnr, ssim
from videovae.models import from_preset
from videovae.quantizers import CodebookUsage

from .config import (
    ConfigError,
    TrainConfig,
    check_against_model,
    config_from_dict,
    deepspeed_config,
    load_config,
    save_config,
)
from .data import ClipDataset, make_loader
from .discriminator import PatchDiscriminator3D
from .losses import VAELoss, disc_loss, discrete_weight_at

log = logging.getLogger("videovae.train")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- small pure helpers ----------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """Seed of the posterior-sampling generator of one micro step (resume-proof, no global state)."""
    return int(np.random.default_rng([seed, rank, step, micro]).integers(2**62))


def last_layer_replay(vae: torch.nn.Module):
    """Capture the input of ``decoder.conv_out`` on every forward; the returned ``replay()`` re-runs
    that layer on the detached input -> (output, its weight) for the adaptive GAN weight."""
    layer = vae.decoder.conv_out
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args):
        captured["x"] = args[0]

    layer.register_forward_pre_hook(hook)

    def replay() -> tuple[torch.Tensor, torch.Tensor]:
        out = layer(captured["x"].detach())
        out = vae.decoder.unpatchify(out[0] if isinstance(out, tuple) else out)
        return out, vae.decoder.last_layer_weight()

    return replay


def rng_state() -> dict:
    """RNG states as tensors and plain Python values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def preview_image(x: torch.Tensor, *recons: torch.Tensor, count: int = 4) -> torch.Tensor:
    """(3, T, H, W) original and reconstructions in [-1, 1] -> uint8 (rows*H, (1 + k) W, 3):
    ``count`` frames as rows of original | recon_1 | ... | recon_k."""
    t = x.shape[1]
    idx = sorted({round(i * (t - 1) / max(1, count - 1)) for i in range(min(count, t))})
    columns = [from_model_range(v[:, idx].float().cpu()) for v in (x, *recons)]
    return torch.cat([torch.cat([c[i] for c in columns], dim=1) for i in range(len(idx))], dim=0)


# --- distributed set-up -----------------------------------------------------------------------------------


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_threads(requested: int, local_ranks: int) -> int:
    """Intra-op threads per rank: ``requested``, else the node's idle cores (cores minus the 1-minute
    load average) shared by its ranks. Oversubscribed OpenMP threads make CPU training many times
    slower on a busy machine, so a loaded machine gets fewer threads."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = cores - os.getloadavg()[0] if hasattr(os, "getloadavg") else cores
    return max(1, min(cores, int(idle + 0.5)) // max(1, local_ranks))


def resolve_engine(requested: str) -> str:
    """``auto`` -> ``deepspeed`` when it is installed, else ``torch`` (one process, plain PyTorch)."""
    if requested != "auto":
        return requested
    return "deepspeed" if importlib.util.find_spec("deepspeed") is not None else "torch"


def setup_distributed(threads: int = 0, engine: str = "deepspeed") -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; a plain process becomes rank 0 of 1.

    Without CUDA the DeepSpeed CPU accelerator is used (``DS_ACCELERATOR=cpu``). With ``engine ==
    "torch"`` nothing distributed is started (one process only). Returns (rank, world).
    """
    if engine == "torch":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("engine=torch runs one process; launch several ranks with engine=deepspeed")
        if threads > 0 or "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(cpu_threads(threads, 1))
        return 0, 1
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if threads > 0 or "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(cpu_threads(threads, local))
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(verbose=False)
    import torch.distributed as dist

    _unlink_shm_buffer(dist.get_rank())
    return dist.get_rank(), dist.get_world_size()


def shm_buffer_path(rank: int) -> Path:
    """The ``/dev/shm`` file of DeepSpeed's CPU all-reduce buffer of ``rank`` in this run."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU backend creates a 66 MB shared-memory all-reduce buffer per rank and never
    unlinks it, so every CPU run would leave its buffers in ``/dev/shm`` (RAM) for good. Once every
    rank has mapped every buffer (init maps them all; the barrier waits for every rank's init) the
    names are removed; the mappings live on until the processes exit."""
    import torch.distributed as dist

    if os.environ.get("DS_ACCELERATOR") != "cpu":
        return
    dist.barrier()
    shm_buffer_path(rank).unlink(missing_ok=True)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    import torch.distributed as dist

    if _distributed():
        dist.barrier()


def _any_rank(flag: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    if not _distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)  # NCCL needs device tensors
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class TorchEngine:
    """One-process training engine in plain PyTorch with the calls the loop makes of a DeepSpeed
    engine (forward, ``backward``, ``step``, ``get_lr``, ``save_checkpoint``, ``load_checkpoint``),
    so the same loop, loss and exported checkpoint work where DeepSpeed is not installed.

    Gradient accumulation, clipping and the scheduler step follow DeepSpeed's semantics: the loss is
    divided by ``grad_accum`` and the optimizer steps on every ``grad_accum``-th ``step()``. ``bf16``
    runs the forward under autocast with fp32 weights (fp16 and ZeRO need DeepSpeed).
    """

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, *, grad_accum: int, grad_clip: float,
                 bf16: bool, device: torch.device):
        self.module = model.to(device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_accum, self.grad_clip, self.bf16, self.device = grad_accum, grad_clip, bf16, device
        self.micro_steps = 0

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = False) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps, "client": client_state}
        torch.save(state, folder / "engine_state.pt")

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, dict]:
        path = Path(load_dir) / tag / "engine_state.pt"
        if not path.is_file():
            return None, {}
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_steps = int(state["micro_steps"])
        return str(path), state["client"]


def make_engine(kind: str, cfg: TrainConfig, world: int, model: torch.nn.Module, optimizer, scheduler):
    """A DeepSpeed engine (config dict built from ``cfg``) or a :class:`TorchEngine`."""
    if kind == "torch":
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return TorchEngine(model, optimizer, scheduler, grad_accum=cfg.deepspeed.grad_accum,
                           grad_clip=cfg.optim.grad_clip, bf16=cfg.deepspeed.precision == "bf16", device=device)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world))
    return engine


# --- checkpoints -----------------------------------------------------------------------------------------


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint tag named by ``ckpt_dir/latest`` (None when there is none)."""
    f = ckpt_dir / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not (ckpt_dir / tag / "state.json").is_file():
        raise ConfigError(f"{f} names {tag}, which is missing or incomplete")
    return tag


def run_layout(cfg: TrainConfig, world: int, engine: str) -> dict:
    """What a checkpoint's file layout depends on: resuming needs the same values."""
    return {"world_size": world, "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
            "preset": cfg.model.preset, "engine": engine}


def check_layout(ckpt: Path, saved: dict, current: dict) -> None:
    diff = [f"{k} {saved[k]!r} -> {current[k]!r}" for k in current if k in saved and saved[k] != current[k]]
    if diff:
        raise ConfigError(f"{ckpt}: cannot resume a checkpoint written with different settings ({'; '.join(diff)}); "
                          "keep world size, deepspeed.zero_stage, deepspeed.precision, model.preset and engine "
                          "unchanged")


def save_training_state(ckpt_dir: Path, step: int, engines: dict, ema, counters: dict, rank: int, keep: int,
                        layout: dict) -> str:
    """Write a full resume checkpoint as ``ckpt_dir/step_N`` (one tag per engine, EMA and counters with
    the first); crash-safe: everything goes to
    ``step_N.tmp`` first, rank 0 renames it once all ranks are done and only then rewrites ``latest``."""
    tag = f"step_{step:08d}"
    tmp = ckpt_dir / f"{tag}.tmp"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    client = {"ema": ema.state_dict() if ema is not None else None, **counters}
    for i, (name, engine) in enumerate(engines.items()):  # the first engine carries EMA and counters
        engine.save_checkpoint(str(tmp), tag=name, client_state=client if i == 0 else {}, save_latest=False)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({**counters, "layout": layout}))
        final = ckpt_dir / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        with atomic_path(ckpt_dir / "latest") as t:
            t.write_text(tag)
        done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return tag


def load_training_state(ckpt_dir: Path, tag: str, engines: dict, ema, rank: int, layout: dict) -> dict:
    """Restore the engines (weights, optimizers, schedulers), EMA and this rank's RNG; returns counters."""
    saved = json.loads((ckpt_dir / tag / "state.json").read_text()).get("layout", {})
    check_layout(ckpt_dir / tag, saved, layout)
    client: dict = {}
    for i, (name, engine) in enumerate(engines.items()):
        path, state = engine.load_checkpoint(str(ckpt_dir / tag), tag=name)
        if path is None:
            raise ConfigError(f"{ckpt_dir / tag}: could not load the {name} engine's checkpoint")
        if i == 0:
            client = state
    if ema is not None and client.get("ema") is not None:
        ema.load_state_dict(client["ema"])
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        try:
            set_rng_state(torch.load(rng_file, weights_only=True))
        except pickle.UnpicklingError:
            # written before RNG states were stored as plain values; never unpickle arbitrary objects
            log.warning("%s: RNG state in an older format; continuing with fresh RNG", rng_file)
    else:
        log.warning("%s: no RNG state for rank %d (world size changed?); continuing with fresh RNG", tag, rank)
    return {"step": int(client["step"]), "samples": int(client["samples"])}


def check_resume_request(run_dir: Path, resume: bool) -> None:
    """``--resume`` needs a checkpoint; a fresh run must not overwrite one."""
    ckpt_dir = run_dir / "checkpoints"
    if resume and latest_tag(ckpt_dir) is None:
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}")
    if not resume and (ckpt_dir / "latest").is_file():
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue, or choose a new run_dir")


def prepare_run_dir(run_dir: Path, is_main: bool) -> None:
    """Create the run folder and drop interrupted saves (the previous checkpoint stays the latest)."""
    if is_main:
        (run_dir / "previews").mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()


def resume_state(run_dir: Path, engines: dict, ema, rank: int, layout: dict) -> dict:
    """Load the latest checkpoint of ``run_dir`` into the engines and EMA; returns the counters."""
    ckpt_dir = run_dir / "checkpoints"
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}")
    counters = load_training_state(ckpt_dir, tag, engines, ema, rank, layout)
    if rank == 0:
        log.info("resumed from %s at step %d", ckpt_dir / tag, counters["step"])
    return counters


def training_dataset(cfg: TrainConfig, rank: int) -> ClipDataset:
    d = cfg.data
    return ClipDataset(d.paths, num_frames=d.num_frames, size=d.size, max_stride=d.max_stride,
                       crop_scale_min=d.crop_scale_min, crop_scale_max=d.crop_scale_max,
                       image_ratio=d.image_ratio, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank,
                       backend=d.backend, decode_short_side=d.decode_short_side,
                       cache_mb=d.cache_mb, max_video_frames=d.max_video_frames)


def validation_clips(cfg: TrainConfig, dataset: ClipDataset, is_main: bool) -> list[torch.Tensor]:
    """The fixed validation clips (rank 0 only), ``data.val_num_frames`` long: from ``data.val_paths``
    when given, else the training media."""
    if not is_main or not cfg.val_clips:
        return []
    d = cfg.data
    frames = d.val_num_frames or d.num_frames
    source = dataset
    if d.val_paths or frames != d.num_frames:
        source = ClipDataset(d.val_paths or d.paths, num_frames=frames, size=d.size, max_stride=d.max_stride,
                             crop_scale_min=d.crop_scale_min, crop_scale_max=d.crop_scale_max,
                             batch_size=1, seed=cfg.seed, backend=d.backend,
                             decode_short_side=d.decode_short_side, cache_mb=0, max_video_frames=d.max_video_frames)
    return source.validation_clips(cfg.val_clips)


# --- the model -----------------------------------------------------------------------------------------


def build_training_model(cfg: TrainConfig) -> torch.nn.Module:
    """The model to train: a checkpoint as it is (``init_weights``), or the preset, optionally started
    from another checkpoint of the same backbone (``init_backbone``)."""
    if cfg.model.init_weights:
        return load_checkpoint(cfg.model.init_weights)
    model = from_preset(cfg.model.preset)
    if cfg.model.init_backbone:
        init_backbone(model, cfg.model.init_backbone)
    return model


def init_backbone(model: torch.nn.Module, path: str) -> None:
    """Load the weights of checkpoint ``path`` into ``model`` where the backbones agree: same family
    and same config apart from the fields the model's config class lists as ``head_fields`` (the
    quantiser and its projections, e.g. a continuous OneVAE -> a discrete one). Weights only the
    model has keep their initialisation; weights only the checkpoint has (another head) are dropped;
    a weight whose shape differs is an error."""
    from safetensors import safe_open

    meta = read_metadata(path)
    if meta["family"] != model.family:
        raise ConfigError(f"model.init_backbone: {path} holds a {meta['family']} model, the preset is {model.family}")
    head = set(getattr(type(model.config), "head_fields", ()))
    mine = model.config.to_dict()
    theirs = type(model.config).from_dict(meta["config"]).to_dict()
    differ = sorted(k for k in mine if k not in head and mine[k] != theirs.get(k))
    if differ:
        raise ConfigError(f"model.init_backbone: {path} has another backbone than preset {model.family} "
                          f"(config fields differ: {', '.join(differ)})")
    own = model.state_dict()
    with safe_open(path, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k in own}
    bad = sorted(k for k, v in state.items() if v.shape != own[k].shape)
    if bad:
        raise ConfigError(f"model.init_backbone: {path}: shapes differ for {', '.join(bad[:8])}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    fresh = sorted(set(own) - set(state))
    log.info("init_backbone: %d tensors from %s; %d new (%s)", len(state), path, len(fresh),
             ", ".join(fresh[:6]) + (" ..." if len(fresh) > 6 else ""))


# --- validation and logging ------------------------------------------------------------------------------


@torch.no_grad()
def validate(model: torch.nn.Module, clips: list[torch.Tensor], compat=None,
             discrete: bool = False) -> tuple[dict, torch.Tensor]:
    """Posterior-mean reconstructions of the fixed clips -> ({psnr, ssim}, preview image); with a
    :class:`train.compat.CompatibilityLoss`, also ``compat_psnr``: PSNR of the image-VAE-decoded
    latent frames against the matching video frames. With ``discrete`` (models with a quantiser),
    also ``psnr_discrete``, ``ssim_discrete`` and the codebook usage / perplexity of the clips'
    tokens; the preview then shows the discrete reconstruction."""
    param = next(model.parameters())
    dtype, device = param.dtype, param.device  # the EMA copy stays fp32 under bf16/fp16 training
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {}
    usage = TokenUsage(model) if discrete else None
    preview = None
    for clip in clips:
        x = clip.unsqueeze(0).to(device)
        if compat is not None:
            scores.setdefault("compat_psnr", []).append(compat.compatibility_psnr(model, x.to(dtype)))
        if discrete:
            out = model(x.to(dtype), sample=False, joint=True)
            usage.update(out.tokens)
            recons = {"": out.recon, "_discrete": out.recon_discrete}
        else:
            recons = {"": model(x.to(dtype), sample=False)[0]}
        for suffix, recon in recons.items():
            recon = recon.float().clamp(-1, 1)
            per_frame = psnr(x, recon)
            scores.setdefault(f"psnr{suffix}", []).append(per_frame.clamp(max=100).mean().item())
            scores.setdefault(f"ssim{suffix}", []).append(ssim(x, recon).mean().item())
            for key, value in drift_figures(per_frame).items():
                scores.setdefault(f"{key}{suffix}", []).append(value)
        if preview is None:
            preview = preview_image(x[0], recon[0])
    model.train(was_training)
    values = {k: float(np.mean(v)) for k, v in scores.items()}
    if usage is not None:
        values.update(usage.stats())
    return values, preview


class TokenUsage:
    """Codebook usage and perplexity of a model's tokens (``Tokens.rest`` and ``Tokens.first``),
    counted over many batches; all token groups share one codebook."""

    def __init__(self, model: torch.nn.Module):
        self.counter = CodebookUsage(model.quantizer.codebook_size)

    def update(self, tokens) -> None:
        for part in (tokens.rest, tokens.first):
            if part is not None:
                self.counter.update(part)

    def stats(self) -> dict[str, float]:
        return {f"codebook_{k}": float(v) for k, v in self.counter.stats().items()}

    def reset(self) -> None:
        self.counter.reset()


class RunLog:
    """Rank-0 log: JSONL of every record, CSV of validations, TensorBoard when installed."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self.csv_path = run_dir / "val.csv"
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.jsonl.flush()
        if kind == "val":
            new = not self.csv_path.exists()
            with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", "psnr", "ssim"])
                w.writerow([step, f"{values['psnr']:.4f}", f"{values['ssim']:.5f}"])
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


# --- the training job ------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) training; returns a summary dict (also in ``run_dir/summary.json`` on rank 0)."""
    engine_kind = resolve_engine(cfg.engine)
    rank, world = setup_distributed(cfg.threads, engine_kind)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    is_main = rank == 0
    # DeepSpeed casts the model to the training precision; the torch engine keeps fp32 weights (autocast)
    dtype = _DTYPES[cfg.deepspeed.precision] if engine_kind == "deepspeed" else torch.float32

    check_resume_request(run_dir, resume)

    # model, discriminator, EMA: identical initialisation on every rank
    seed_everything(cfg.seed)
    model = build_training_model(cfg)
    model.train()
    check_against_model(cfg, model.time_factor, model.space_factor)
    joint = cfg.loss.discrete_weight > 0
    if joint and getattr(model, "quantizer", None) is None:
        raise ConfigError(f"loss.discrete_weight > 0 needs a model with a quantiser (e.g. a OneVAE token preset); "
                          f"{cfg.model.preset} has none")
    model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    dataset = training_dataset(cfg, rank)
    disc = PatchDiscriminator3D(model.config.in_channels, cfg.disc.channels, cfg.disc.layers)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.optim.ema_decay > 0 else None
    loss_fn = VAELoss(cfg.loss)
    if loss_fn.compat is not None:
        loss_fn.compat.check_model(model)
    seed_everything(cfg.seed + 1000003 * rank)

    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, cfg.max_steps, o.min_lr_ratio))
    d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc.lr, betas=tuple(cfg.disc.betas),
                              weight_decay=cfg.disc.weight_decay)
    d_total = max(1, cfg.max_steps - cfg.loss.disc_start)
    d_sched = torch.optim.lr_scheduler.LambdaLR(
        d_opt, lambda s: lr_factor(s, min(o.warmup_steps, d_total // 2), d_total, o.min_lr_ratio))
    vae_engine = make_engine(engine_kind, cfg, world, model, opt, sched)
    disc_engine = make_engine(engine_kind, cfg, world, disc, d_opt, d_sched)
    engines = {"vae": vae_engine, "disc": disc_engine}
    vae, dnet = vae_engine.module, disc_engine.module
    device = vae_engine.device
    replay = last_layer_replay(vae)
    loss_fn.to(device)
    if ema is not None:
        ema.to(device)

    prepare_run_dir(run_dir, is_main)
    counters = {"step": 0, "samples": 0}
    if resume:
        counters = resume_state(run_dir, engines, ema, rank, run_layout(cfg, world, engine_kind))
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    val_clips = validation_clips(cfg, dataset, is_main)
    batches = iter(make_loader(dataset, cfg.batch_size, counters["samples"], cfg.data.num_workers))
    runlog = RunLog(run_dir, is_main)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=counters["step"], desc="train", unit="step",
               disable=None if (is_main and cfg.progress) else True, dynamic_ncols=True)  # None: off unless a TTY
    gas = cfg.deepspeed.grad_accum
    samples_per_step = cfg.batch_size * gas * world
    start_step, t_start, t_first = counters["step"], time.time(), None
    last_terms: dict[str, float] = {}
    last_val: dict[str, float] = {}
    usage = TokenUsage(vae) if joint else None  # codebook usage over each logging window
    stop = False
    while counters["step"] < cfg.max_steps and not stop:
        step = counters["step"]
        disc_on = step >= cfg.loss.disc_start
        sums: dict[str, float] = {}
        for micro in range(gas):
            x = next(batches).to(device=device, dtype=dtype, non_blocking=True)
            gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, rank, step, micro))
            dnet.requires_grad_(False)
            if joint:
                out = vae_engine(x, sample=cfg.loss.sample_posterior, generator=gen, joint=True)
                recon = out.recon_discrete
                loss, terms = loss_fn.joint(vae, x, out, dnet if disc_on else None, replay,
                                            discrete_weight_at(cfg.loss, step))
                usage.update(out.tokens)
            else:
                recon, posterior = vae_engine(x, sample=cfg.loss.sample_posterior, generator=gen)
                loss, terms = loss_fn(vae, x, recon, posterior, dnet if disc_on else None, replay)
            dnet.requires_grad_(True)
            vae_engine.backward(loss)
            vae_engine.step()
            if disc_on:
                d_loss, d_terms = disc_loss(disc_engine, x, recon)
                disc_engine.backward(d_loss)
                disc_engine.step()
                terms.update(d_terms)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v / gas
        counters["step"] = step = step + 1
        counters["samples"] += cfg.batch_size * gas
        if ema is not None:
            ema_update(ema, vae, cfg.optim.ema_decay if step > o.warmup_steps else 0.0)
        if t_first is None:
            t_first = time.time()  # throughput excludes the first step (start-up, allocator warm-up)
        elapsed = time.time() - t_start
        rate = samples_per_step * (step - start_step - 1) / max(1e-9, time.time() - t_first)
        last_terms = sums
        bar.update(1)
        bar.set_postfix(loss=f"{sums['total']:.4f}", rate=f"{rate:.2f}/s")
        if cfg.time_budget_s > 0:
            stop = _any_rank(time.time() - t_start > cfg.time_budget_s, device)
        stop = stop or (cfg.run_steps > 0 and step - start_step >= cfg.run_steps)
        final = stop or step == cfg.max_steps
        if step % cfg.log_every == 0 or step == 1 or final:
            codes = {}
            if usage is not None:
                codes = usage.stats()
                usage.reset()
            runlog.write("train", step, {**sums, **codes, "lr": vae_engine.get_lr()[0], "samples_per_s": rate,
                                         "elapsed_s": elapsed})
        if is_main and val_clips and (step % cfg.val_every == 0 or final):
            last_val, preview = validate(ema if ema is not None else vae, val_clips, loss_fn.compat, joint)
            write_png(run_dir / "previews" / f"step_{step:08d}.png", preview)
            runlog.write("val", step, last_val)
            discrete = f", discrete {last_val['psnr_discrete']:.2f} dB" if "psnr_discrete" in last_val else ""
            bar.write(f"step {step}: val PSNR {last_val['psnr']:.2f} dB, SSIM {last_val['ssim']:.4f}{discrete}")
        if step % cfg.save_every == 0 or final:
            save_training_state(ckpt_dir, step, engines, ema, dict(counters), rank, cfg.keep_checkpoints,
                                run_layout(cfg, world, engine_kind))
            if is_main:
                export_model(ema if (ema is not None and cfg.export_ema) else vae, run_dir / "vae.safetensors",
                             cfg, step)
    bar.close()
    if is_main and val_clips and not last_val:
        last_val, preview = validate(ema if ema is not None else vae, val_clips, loss_fn.compat, joint)
        write_png(run_dir / "previews" / f"step_{counters['step']:08d}.png", preview)
    done = counters["step"] - start_step
    wall = time.time() - t_start
    rate = samples_per_step * max(0, done - 1) / max(1e-9, time.time() - t_first) if t_first else 0.0
    summary = {"step": counters["step"], "samples_per_rank": counters["samples"], "world_size": world,
               "engine": engine_kind,
               "threads_per_rank": torch.get_num_threads(),
               "steps_this_run": done, "wall_s": wall, "samples_per_s": rate, "last_terms": last_terms,
               "val": last_val, "export": str(run_dir / "vae.safetensors"),
               "checkpoint": str(ckpt_dir / (latest_tag(ckpt_dir) or ""))}
    if is_main:
        with atomic_path(run_dir / "summary.json") as t:
            t.write_text(json.dumps(summary, indent=2))
        runlog.close()
    _barrier()
    return summary


def export_model(model: torch.nn.Module, path: Path, cfg: TrainConfig, step: int) -> str:
    """Save the (EMA) VAE in fp32 as a videovae checkpoint (what ``videovae decode --weights`` loads)."""
    return save_checkpoint(path, model, dtype=torch.float32,
                           extra={"trained_steps": step, "preset": cfg.model.preset, "run_dir": cfg.run_dir})


# --- command line ----------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML training config (default: built-in defaults)")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/checkpoints/latest")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=2e-4")


def run(args: argparse.Namespace) -> dict:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    return train(cfg, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m videovae.train.vae", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        summary = run(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"videovae train: error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: summary[k] for k in ("step", "world_size", "samples_per_s", "export")}))
    return 0


__all__ = ["config_from_dict", "load_config", "lr_factor", "main", "train"]

if __name__ == "__main__":
    sys.exit(main())
