"""Typed training configuration: dataclasses, YAML loading, ``key=value`` overrides, DeepSpeed dict.

A run is described by one :class:`TrainConfig`. ``load_config(path, overrides)`` reads a YAML file
(nested mappings matching the dataclass sections), applies command-line overrides such as
``optim.lr=2e-4`` or ``data.paths=[a.mp4,b.mp4]`` (values parsed as YAML scalars/lists), type-checks
every field and validates the combination. ``deepspeed_config(cfg, world_size)`` builds the DeepSpeed
config dict in code (ZeRO stage, precision, gradient accumulation, clipping) so no JSON file can drift
from the typed config.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the offending key."""


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a name from `videovae models`
    init_weights: str | None = None  # optional videovae checkpoint to start from (its own architecture)
    # a checkpoint of the same backbone whose weights start the *preset's* model, which may add a
    # discrete head (e.g. a continuous OneVAE / converted Wan 2.1 checkpoint -> a discrete OneVAE)
    init_backbone: str | None = None
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # folders, video/image files, or .txt list files
    val_paths: list[str] = field(default_factory=list)  # held-out media for validation (empty: draw from paths)
    num_frames: int = 9  # clip length, must be 1 + k * time_factor of the model
    # validation clip length (0: num_frames). Longer than num_frames shows whether the causal state
    # drifts past the training length (validation then also logs psnr_first_9 / psnr_last_8)
    val_num_frames: int = 0
    size: int = 64  # square training crop, a multiple of the model's space_factor
    max_stride: int = 2  # temporal stride drawn uniformly from 1..max_stride (clamped to the video)
    # crop side as a fraction of the short side, drawn from [min, max]; resized to ``size``, so the
    # pair also sets how far content is scaled down (a max below 1 keeps crops near native scale)
    crop_scale_min: float = 0.6
    crop_scale_max: float = 1.0
    image_ratio: float = 0.0  # fraction of batches made of images (1-frame clips) when images exist
    decode_short_side: int = 0  # resize decoded frames so the short side is at most this (0 = keep)
    backend: str = "auto"  # auto (decord when installed, else pyav), pyav, decord
    num_workers: int = 0
    cache_mb: int = 256  # per-worker cache of decoded videos (0 = off)
    max_video_frames: int = 2048  # read at most this many frames of any video


@dataclass
class LossConfig:
    recon: str = "l1"  # l1, mse (what PSNR measures; for a last fine-tune) or charbonnier
    recon_weight: float = 1.0
    charbonnier_eps: float = 1e-3
    kl_weight: float = 1e-6
    lpips_weight: float = 0.0  # > 0 needs lpips_vgg and lpips_lin (local files, never downloaded)
    lpips_vgg: str | None = None  # VGG16 feature weights (torchvision names features.N.*), .pth or .safetensors
    lpips_lin: str | None = None  # LPIPS linear heads (lin0..lin4.model.1.weight), .pth or .safetensors
    disc_weight: float = 0.5
    disc_start: int = 2000  # optimizer step at which the discriminator and GAN loss switch on
    adaptive_weight_max: float = 1e4
    sample_posterior: bool = True
    # joint continuous/discrete objective of models with a quantiser (OneVAE): both paths decode the
    # same encoding; total = continuous_weight * continuous terms + discrete_weight * discrete terms
    discrete_weight: float = 0.0  # 0 = continuous training only
    continuous_weight: float = 1.0
    discrete_ramp_steps: int = 0  # the discrete weight ramps linearly from 0 over these steps
    # CV-VAE latent regularisation (train/compat.py): a frozen local image VAE (diffusers AutoencoderKL
    # folder or .safetensors file; never downloaded) decodes the latent frames (compat_side=decoder) or
    # encodes the matching frames (encoder); the L1 term is weighted by compat_weight (0 = off).
    image_vae: str | None = None
    compat_weight: float = 0.0
    compat_side: str = "decoder"


@dataclass
class DiscConfig:
    channels: int = 32
    layers: int = 3
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0  # 0 = off
    ema_decay: float = 0.999  # 0 = no EMA


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0, 1 or 2
    precision: str = "fp32"  # fp32, bf16 or fp16
    grad_accum: int = 1


@dataclass
class DistillConfig:
    """``videovae distill``: a frozen teacher's latents decoded by a turbo student (train/distill.py)."""

    teacher: str | None = None  # videovae checkpoint of the teacher (any VAE family; converted official weights too)
    student: str = "turbo-tiny"  # a turbo-vaed preset with the teacher's latent geometry
    # optional start for the student: a turbo-vaed checkpoint or turbo pair (a file or a shipped name,
    # e.g. turbo-vv-s16) with the student preset's architecture; re-distilling after the teacher
    # trained on then starts from the decoder distilled before instead of from scratch
    student_init: str | None = None
    # feature alignment: relative MSE of projected student features to teacher decoder features
    align_weight: float = 0.1  # 0 = off (the teacher's decoder is then never run)
    # "level=teacher_module" pairs (student level output, 0 = latent resolution; a module path in the
    # teacher); empty = every level to the last teacher decoder block of the same frame count and size
    align: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    run_dir: str = "runs/vae"
    seed: int = 0
    batch_size: int = 1  # micro batch per rank
    max_steps: int = 1000  # optimizer steps
    run_steps: int = 0  # stop (and save) after this many steps in this invocation (0 = run to max_steps)
    time_budget_s: float = 0.0  # stop (and save) after this much wall time (0 = no limit)
    log_every: int = 10
    val_every: int = 200
    val_clips: int = 2
    save_every: int = 500
    keep_checkpoints: int = 2
    export_ema: bool = True
    progress: bool = True
    threads: int = 0  # CPU threads per rank; 0 = auto: idle cores / ranks on this node (OMP_NUM_THREADS wins)
    # deepspeed; torch (one process, needs only torch: fp32 or bf16 autocast); auto = deepspeed when installed
    engine: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading ----------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (the subset used by the config classes)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and inner is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_nested(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x,y]"]`` -> nested dict; values are parsed as YAML (``null`` -> None)."""
    data: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: cannot parse value ({err})") from None
        _set_nested(data, key.strip(), value)
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: config file not found")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(TrainConfig, data)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    cfg = _build(TrainConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Model-independent checks (the model-dependent ones run once the model is built)."""
    problems = []
    d, o, ds, lo = cfg.data, cfg.optim, cfg.deepspeed, cfg.loss
    if ds.zero_stage not in (0, 1, 2):
        problems.append(f"deepspeed.zero_stage must be 0, 1 or 2, got {ds.zero_stage}")
    if ds.precision not in ("fp32", "bf16", "fp16"):
        problems.append(f"deepspeed.precision must be fp32, bf16 or fp16, got {ds.precision!r}")
    if ds.grad_accum < 1:
        problems.append("deepspeed.grad_accum must be >= 1")
    if cfg.engine not in ("auto", "deepspeed", "torch"):
        problems.append(f"engine must be auto, deepspeed or torch, got {cfg.engine!r}")
    if cfg.engine == "torch" and (ds.precision == "fp16" or ds.zero_stage != 0):
        problems.append("engine=torch trains fp32 or bf16 with deepspeed.zero_stage=0 (fp16 and ZeRO need deepspeed)")
    if lo.recon not in ("l1", "mse", "charbonnier"):
        problems.append(f"loss.recon must be l1, mse or charbonnier, got {lo.recon!r}")
    if d.backend not in ("auto", "pyav", "decord"):
        problems.append(f"data.backend must be auto, pyav or decord, got {d.backend!r}")
    if not 0.0 <= d.image_ratio <= 1.0:
        problems.append("data.image_ratio must be in [0, 1]")
    if not 0.0 < d.crop_scale_min <= d.crop_scale_max <= 1.0:
        problems.append("data.crop_scale_min and data.crop_scale_max must satisfy 0 < min <= max <= 1")
    for name, value in (("batch_size", cfg.batch_size), ("max_steps", cfg.max_steps), ("data.size", d.size),
                        ("data.num_frames", d.num_frames), ("data.max_stride", d.max_stride),
                        ("log_every", cfg.log_every), ("val_every", cfg.val_every),
                        ("save_every", cfg.save_every), ("keep_checkpoints", cfg.keep_checkpoints)):
        if value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    if d.val_num_frames < 0:
        problems.append(f"data.val_num_frames must be >= 0 (0: data.num_frames), got {d.val_num_frames}")
    if d.num_workers < 0 or cfg.val_clips < 0 or cfg.run_steps < 0 or cfg.threads < 0 or o.warmup_steps < 0:
        problems.append("data.num_workers, val_clips, run_steps, threads and optim.warmup_steps must be >= 0")
    if not 0.0 <= o.ema_decay < 1.0:
        problems.append("optim.ema_decay must be in [0, 1)")
    if len(o.betas) != 2 or len(cfg.disc.betas) != 2:
        problems.append("optim.betas and disc.betas need two values")
    if cfg.disc.layers < 1 or cfg.disc.channels < 1:
        problems.append("disc.layers and disc.channels must be >= 1")
    if lo.lpips_weight > 0:
        for key in ("lpips_vgg", "lpips_lin"):
            value = getattr(lo, key)
            if not value:
                problems.append(f"loss.lpips_weight > 0 needs loss.{key} (a local weights file; nothing is downloaded)")
            elif not os.path.isfile(value):
                problems.append(f"loss.{key}: LPIPS weights file not found: {value}")
    if lo.discrete_weight < 0 or lo.continuous_weight < 0 or lo.discrete_ramp_steps < 0:
        problems.append("loss.discrete_weight, loss.continuous_weight and loss.discrete_ramp_steps must be >= 0")
    if lo.discrete_weight == 0 and lo.continuous_weight == 0:
        problems.append("loss.discrete_weight and loss.continuous_weight cannot both be 0")
    if cfg.model.init_weights and cfg.model.init_backbone:
        problems.append("model.init_weights and model.init_backbone are exclusive (init_backbone keeps the preset)")
    if lo.compat_side not in ("decoder", "encoder"):
        problems.append(f"loss.compat_side must be decoder or encoder, got {lo.compat_side!r}")
    if lo.compat_weight < 0:
        problems.append("loss.compat_weight must be >= 0")
    if lo.compat_weight > 0 and not lo.image_vae:
        problems.append("loss.compat_weight > 0 needs loss.image_vae (a local AutoencoderKL; nothing is downloaded)")
    elif lo.compat_weight > 0 and not os.path.exists(lo.image_vae):
        problems.append(f"loss.image_vae: image VAE not found: {lo.image_vae}")
    if cfg.distill.align_weight < 0:
        problems.append("distill.align_weight must be >= 0")
    for pair in cfg.distill.align:
        if pair.count("=") != 1 or not all(part.strip() for part in pair.split("=")):
            problems.append(f"distill.align: {pair!r} is not level=teacher_module")
    if problems:
        raise ConfigError("invalid training config: " + "; ".join(problems))


def check_against_model(cfg: TrainConfig, time_factor: int, space_factor: int) -> None:
    """The clip geometry must fit the model: T = 1 + k * time_factor, size a multiple of space_factor."""
    d = cfg.data
    for key, frames in (("num_frames", d.num_frames), ("val_num_frames", d.val_num_frames or d.num_frames)):
        if (frames - 1) % time_factor:
            raise ConfigError(f"data.{key}={frames} is not 1 + k*{time_factor} for preset {cfg.model.preset}")
    if d.size % space_factor:
        raise ConfigError(f"data.size={d.size} is not a multiple of {space_factor} for preset {cfg.model.preset}")


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    from videovae.fileutil import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --- DeepSpeed ---------------------------------------------------------------------------------------


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for one engine (VAE or discriminator; both share these settings)."""
    ds = cfg.deepspeed
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": cfg.batch_size * ds.grad_accum * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": ds.zero_stage},
    }
    if ds.zero_stage > 0:
        out["zero_optimization"].update(
            {"contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True}
        )
    if ds.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        out["fp16"] = {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 500}
    return out
