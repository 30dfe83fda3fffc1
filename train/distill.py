"""Distil a Turbo-VAED decoder from a frozen teacher VAE (``videovae distill``), with DeepSpeed.

Single process::

    videovae distill --teacher teacher.safetensors --student turbo-od-vae \\
        --config train/configs/distill_tiny.yaml "data.paths=[clips/]" run_dir=runs/turbo

Several processes / nodes (on a CPU-only machine add ``DS_ACCELERATOR=cpu``)::

    deepspeed --num_gpus 2 --module videovae.train.distill --config C.yaml distill.teacher=T.safetensors

The teacher (any videovae checkpoint: a trained run's ``vae.safetensors`` or converted official
weights) is frozen. Each step it encodes the clip and draws a posterior sample (the mean with
``loss.sample_posterior=false``); the student decodes that sample. Loss::

    recon_weight * L1(student(z), x) + lpips_weight * LPIPS(student(z), x)
        + align_weight * sum_k |P_k(s_k) - t_k|^2 / |t_k|^2

where ``s_k`` / ``t_k`` are aligned student / teacher decoder features (teacher decoding the same
``z``), ``P_k`` a 1x1x1 projection head (plus a per-frame pixel shuffle when the teacher feature is
r times larger in H and W) and the squared norms are means (a relative MSE, so teacher blocks of any
scale weigh alike). Student features are level outputs (after a level's blocks, before its
upsampler). ``distill.align`` names the pairs as ``level=teacher_module``; by default each level is
aligned to the last teacher decoder block with the same frame count and size (or an integer multiple
r of it). ``disc.*`` and the KL, GAN, compat and discrete loss settings are not used here.

The run folder is laid out as for ``videovae train`` (``config.yaml``, ``log.jsonl``, ``val.csv``,
``previews/step_N.png`` with original | teacher | student columns, resumable ``checkpoints/``), and
``turbo.safetensors`` is the export: a ``turbo-pair`` checkpoint of the teacher's encoder and the
(EMA) student decoder, which ``videovae encode/decode/roundtrip --weights`` load and which decodes
the teacher's latent files. Videos are NCTHW float in [-1, 1] throughout.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from videovae.checkpoint import load_checkpoint, model_digest, save_checkpoint
from videovae.fileutil import atomic_path
from videovae.io import write_png
from videovae.layers import batch_to_frames, frames_to_batch
from videovae.metrics import drift_figures, psnr, ssim
from videovae.models import from_preset
from videovae.models.turbo_vaed import DECODE_SIDE, TurboPair, TurboVAED

from .config import ConfigError, TrainConfig, check_against_model, load_config, save_config
from .data import make_loader
from .losses import recon_loss
from .vae import (
    _DTYPES,
    RunLog,
    _any_rank,
    check_resume_request,
    ema_update,
    latest_tag,
    lr_factor,
    make_engine,
    prepare_run_dir,
    preview_image,
    resolve_engine,
    resume_state,
    save_training_state,
    seed_everything,
    setup_distributed,
    step_seed,
    training_dataset,
    validation_clips,
)

log = logging.getLogger("videovae.distill")
EXPORT_NAME = "turbo.safetensors"

__all__ = ["AlignHead", "Distiller", "FeatureTaps", "auto_align_pairs", "distill", "load_teacher", "main"]


# --- feature taps and alignment ------------------------------------------------------------------------


class FeatureTaps:
    """Forward hooks keeping the latest output of named modules (the tensor, or a tuple's first
    element: our blocks return ``(features, cache)``)."""

    def __init__(self, root: nn.Module, names: list[str]):
        modules = dict(root.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"no module {', '.join(missing)} in {type(root).__name__}")
        self.names = list(names)
        self.values: dict[str, Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args, out):
            self.values[name] = out[0] if isinstance(out, tuple) else out

        return hook

    def take(self) -> list[Tensor]:
        """The kept outputs in ``names`` order; clears them (nothing stays alive between steps)."""
        missing = [n for n in self.names if n not in self.values]
        if missing:
            raise RuntimeError(f"feature taps did not fire: {', '.join(missing)}")
        out = [self.values[n] for n in self.names]
        self.values = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _is_block(name: str) -> bool:
    """Candidate teacher taps: members of block lists (``...block.2``) and the mid block."""
    last = name.rsplit(".", 1)[-1]
    return last.isdigit() or last in ("mid", "mid_block")


@torch.no_grad()
def _probe_shapes(model: nn.Module, names: list[str], z: Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, (C, T, H, W)) of the 5-D outputs of ``names`` in firing order, decoding ``z`` once."""
    fired: list[tuple[str, tuple[int, ...]]] = []
    modules = dict(model.named_modules())

    def hook_for(name):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, Tensor) and out.ndim == 5:
                fired.append((name, tuple(out.shape[1:])))

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        model.decode(z)
    finally:
        for h in handles:
            h.remove()
    return fired


@torch.no_grad()
def _student_shapes(student: TurboVAED, z: Tensor) -> list[tuple[int, ...]]:
    """(C, T, H, W) of every student level's output, decoding ``z`` once."""
    return [tuple(f.shape[1:]) for f in student.decode_with_features(z)[1]]


def _probe_latent(teacher: nn.Module) -> Tensor:
    param = next(teacher.parameters())
    return torch.zeros(1, teacher.latent_channels, 3, 4, 4, device=param.device, dtype=param.dtype)


def _ratio(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> int | None:
    """r when the teacher feature has the student's frame count and r times its H and W, else None."""
    (_, st, sh, sw), (_, tt, th, tw) = student_shape, teacher_shape
    if tt != st or th % sh or tw % sw or th // sh != tw // sw:
        return None
    return th // sh


def auto_align_pairs(student: TurboVAED, teacher: nn.Module) -> list[tuple[int, str]]:
    """(student level, teacher module) pairs: each level to the last-firing teacher decoder block
    whose output has the level's frame count and its H and W, or r times them (smallest r first);
    levels with no such block are left out. Found by decoding a small latent once."""
    z = _probe_latent(teacher)
    s_shapes = _student_shapes(student.to(z.device), z.to(next(student.parameters()).dtype))
    t_shapes = _probe_shapes(teacher, [n for n, _ in teacher.named_modules() if n.startswith("decoder.")
                                       and _is_block(n)], z)
    pairs = []
    for level, s_shape in enumerate(s_shapes):
        best = None
        for t_name, t_shape in t_shapes:  # firing order: a later block wins at the same r
            r = _ratio(s_shape, t_shape)
            if r is not None and (best is None or r <= best[0]):
                best = (r, t_name)
        if best is not None:
            pairs.append((level, best[1]))
    return pairs


class AlignHead(nn.Module):
    """Student feature (N, Cs, T, h, w) -> teacher feature shape (N, Ct, T, h r, w r): a pointwise
    (1x1x1) conv to Ct r^2 channels, then a per-frame pixel shuffle by r."""

    def __init__(self, student_channels: int, teacher_channels: int, ratio: int):
        super().__init__()
        self.ratio = ratio
        self.proj = nn.Conv3d(student_channels, teacher_channels * ratio * ratio, 1)

    def forward(self, s: Tensor) -> Tensor:
        y = self.proj(s)
        if self.ratio > 1:
            y = batch_to_frames(F.pixel_shuffle(frames_to_batch(y), self.ratio), y.shape[0])
        return y


@dataclass(frozen=True)
class AlignPlan:
    """Aligned student levels and teacher modules, with the shapes (C, T, H, W) seen when probing."""

    levels: tuple[int, ...]
    teacher: tuple[str, ...]
    student_shapes: tuple[tuple[int, ...], ...]
    teacher_shapes: tuple[tuple[int, ...], ...]


def plan_alignment(student: TurboVAED, teacher: nn.Module, pairs: list[tuple[int, str]]) -> AlignPlan:
    """Check the pairs (frame counts equal, teacher size an integer multiple r of the student's) and
    record their shapes."""
    if not pairs:
        return AlignPlan((), (), (), ())
    z = _probe_latent(teacher)
    levels, names = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    s_shapes = _student_shapes(student.to(z.device), z.to(next(student.parameters()).dtype))
    bad_levels = [lv for lv in levels if not 0 <= lv < len(s_shapes)]
    modules = dict(teacher.named_modules())
    missing = [n for n in names if n not in modules]
    if bad_levels or missing:
        raise ConfigError(f"distill.align: student levels are 0..{len(s_shapes) - 1} (got {bad_levels or '-'}); "
                          f"teacher modules not found: {', '.join(missing) or '-'}")
    t_fired = dict(_probe_shapes(teacher, list(names), z))
    for level, name in pairs:
        if name not in t_fired:
            raise ConfigError(f"distill.align: {level}={name}: the teacher module gives no 5-D feature map")
        if _ratio(s_shapes[level], t_fired[name]) is None:
            raise ConfigError(f"distill.align: {level}={name}: level {level} gives (C, T, H, W) {s_shapes[level]} at "
                              f"a 4x4 latent, the teacher module {t_fired[name]}: frame counts must agree and the "
                              "teacher size be r times the student's")
    return AlignPlan(levels, names, tuple(s_shapes[lv] for lv in levels), tuple(t_fired[n] for n in names))


class Distiller(nn.Module):
    """What the optimizer trains: the student decoder and the alignment heads.
    ``forward(z) -> (reconstruction NCTHW, [projected student features, in plan order])``."""

    def __init__(self, student: TurboVAED, plan: AlignPlan):
        super().__init__()
        self.student = student
        self.levels = plan.levels
        self.heads = nn.ModuleList(
            AlignHead(s[0], t[0], _ratio(s, t)) for s, t in zip(plan.student_shapes, plan.teacher_shapes, strict=True)
        )

    def forward(self, z: Tensor) -> tuple[Tensor, list[Tensor]]:
        if not self.levels:
            return self.student.decode(z), []
        recon, features = self.student.decode_with_features(z)
        return recon, [head(features[lv]) for head, lv in zip(self.heads, self.levels, strict=True)]


def align_loss(projected: list[Tensor], targets: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Sum over pairs of mean |p - t|^2 / mean |t|^2 (fp32); also the per-pair terms."""
    terms = [(p.float() - t.float()).pow(2).mean() / (t.float().pow(2).mean() + 1e-6)
             for p, t in zip(projected, targets, strict=True)]
    return torch.stack(terms).sum(), terms


# --- teacher ---------------------------------------------------------------------------------------------


def load_teacher(path: str | None) -> tuple[nn.Module, str]:
    """The frozen teacher (eval, no gradients) and its weights digest."""
    if not path:
        raise ConfigError("distill.teacher: pass the teacher's checkpoint (--teacher T.safetensors)")
    from videovae.shipped import resolve_weights

    path, _ = resolve_weights(path)  # a file, or a shipped model's name
    teacher = load_checkpoint(path).float()  # fp16 files (the shipped models) run in fp32 here
    if teacher.family not in DECODE_SIDE:
        raise ConfigError(f"distill.teacher: {path} is a {teacher.family} model; the teacher must be a VAE "
                          f"({', '.join(sorted(DECODE_SIDE))})")
    return teacher.eval().requires_grad_(False), model_digest(teacher)


def build_student(cfg: TrainConfig, teacher: nn.Module) -> TurboVAED:
    student = from_preset(cfg.distill.student)
    if not isinstance(student, TurboVAED):
        raise ConfigError(f"distill.student: {cfg.distill.student} is not a turbo-vaed preset")
    if cfg.distill.student_init:
        student = _initial_student(cfg.distill.student_init, student)
    mine = (student.latent_channels, student.time_factor, student.space_factor)
    theirs = (teacher.latent_channels, teacher.time_factor, teacher.space_factor)
    if mine != theirs:
        raise ConfigError(f"distill.student: {cfg.distill.student} decodes (latent channels, time factor, space "
                          f"factor) {mine}, the teacher encodes {theirs}")
    return student


def _initial_student(value: str, preset: TurboVAED) -> TurboVAED:
    """The turbo decoder of checkpoint ``value`` (a turbo-vaed model, or a turbo pair's student),
    which must have the student preset's architecture."""
    from videovae.shipped import resolve_weights

    path, _ = resolve_weights(value)
    model = load_checkpoint(path).float()
    student = model.student if isinstance(model, TurboPair) else model
    if not isinstance(student, TurboVAED):
        raise ConfigError(f"distill.student_init: {path} is a {model.family} model, not a turbo decoder or pair")
    if student.config != preset.config:
        raise ConfigError(f"distill.student_init: {path} holds a turbo decoder of another architecture than "
                          f"the student preset ({student.config} vs {preset.config})")
    return student


def parse_align(pairs: list[str]) -> list[tuple[int, str]]:
    """``["0=decoder.up.3.block.2", ...]`` -> [(0, "decoder.up.3.block.2"), ...]."""
    out = []
    for p in pairs:
        level, name = (part.strip() for part in p.split("="))
        if not level.isdigit():
            raise ConfigError(f"distill.align: {p!r}: the student side is a level number (0 = latent resolution)")
        out.append((int(level), name))
    return out


# --- validation ------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(distiller: Distiller, teacher: nn.Module, clips: list[Tensor]) -> tuple[dict, Tensor]:
    """Posterior-mean latents of the fixed clips decoded by the student and by the teacher ->
    ({psnr, ssim (student vs clip), teacher_psnr, teacher_ssim, psnr_vs_teacher}, preview of
    original | teacher | student); clips of 17 frames or more also give the drift PSNRs
    (``psnr_first_9``, ``psnr_last_8`` and their ``teacher_`` twins)."""
    student = distiller.student
    param = next(student.parameters())
    was_training = distiller.training
    distiller.eval()
    scores: dict[str, list[float]] = {}
    preview = None
    for clip in clips:
        x = clip.unsqueeze(0).to(param.device)
        z = teacher.encode(x.to(next(teacher.parameters()).dtype)).mode()
        ours = student.decode(z.to(param.dtype)).float().clamp(-1, 1)
        theirs = teacher.decode(z).float().clamp(-1, 1)
        for key, (a, b) in {"": (x, ours), "teacher_": (x, theirs)}.items():
            per_frame = psnr(a, b)
            scores.setdefault(f"{key}psnr", []).append(per_frame.clamp(max=100).mean().item())
            scores.setdefault(f"{key}ssim", []).append(ssim(a, b).mean().item())
            for name, value in drift_figures(per_frame).items():
                scores.setdefault(f"{key}{name}", []).append(value)
        scores.setdefault("psnr_vs_teacher", []).append(psnr(theirs, ours).clamp(max=100).mean().item())
        if preview is None:
            preview = preview_image(x[0], theirs[0], ours[0])
    distiller.train(was_training)
    return {k: float(np.mean(v)) for k, v in scores.items()}, preview


def export_pair(teacher: nn.Module, student: TurboVAED, digest: str, path: Path, cfg: TrainConfig, step: int) -> str:
    """Save the teacher's encoder + ``student`` as a fp32 ``turbo-pair`` checkpoint."""
    pair = TurboPair.from_models(teacher, student, digest)
    extra = {"trained_steps": step, "student": cfg.distill.student, "teacher": os.path.abspath(cfg.distill.teacher),
             "run_dir": cfg.run_dir}
    return save_checkpoint(path, pair, dtype=torch.float32, extra=extra)


# --- the distillation job --------------------------------------------------------------------------------


def distill(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) a distillation; returns a summary dict (also ``run_dir/summary.json``)."""
    engine_kind = resolve_engine(cfg.engine)
    rank, world = setup_distributed(cfg.threads, engine_kind)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    is_main = rank == 0
    dtype = _DTYPES[cfg.deepspeed.precision] if engine_kind == "deepspeed" else torch.float32
    check_resume_request(run_dir, resume)

    seed_everything(cfg.seed)
    teacher, teacher_digest = load_teacher(cfg.distill.teacher)
    student = build_student(cfg, teacher)
    check_against_model(cfg, student.time_factor, student.space_factor)
    pairs = []
    if cfg.distill.align_weight > 0:
        pairs = parse_align(cfg.distill.align) or auto_align_pairs(student, teacher)
        if not pairs:
            raise ConfigError("distill.align_weight > 0 but no student level matches a teacher block in shape; "
                              "name pairs in distill.align or set distill.align_weight=0")
    plan = plan_alignment(student, teacher, pairs)
    distiller = Distiller(student, plan).train()
    ema = copy.deepcopy(distiller).eval().requires_grad_(False) if cfg.optim.ema_decay > 0 else None
    dataset = training_dataset(cfg, rank)
    lpips_net = None
    if cfg.loss.lpips_weight > 0:
        from .lpips import LPIPS, lpips_video

        lpips_net = LPIPS.from_files(cfg.loss.lpips_vgg, cfg.loss.lpips_lin)
    seed_everything(cfg.seed + 1000003 * rank)

    o = cfg.optim
    opt = torch.optim.AdamW(distiller.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, cfg.max_steps, o.min_lr_ratio))
    engine = make_engine(engine_kind, cfg, world, distiller, opt, sched)
    engines = {"student": engine}
    distiller = engine.module
    device = engine.device
    teacher.to(device=device, dtype=dtype)
    if ema is not None:
        ema.to(device)
    if lpips_net is not None:
        lpips_net.to(device)
    teacher_taps = FeatureTaps(teacher, list(plan.teacher)) if plan.teacher else None

    layout = {"world_size": world, "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
              "student": cfg.distill.student, "teacher_sha256": teacher_digest, "engine": engine_kind}
    prepare_run_dir(run_dir, is_main)
    counters = {"step": 0, "samples": 0}
    if resume:
        counters = resume_state(run_dir, engines, ema, rank, layout)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    val_clips = validation_clips(cfg, dataset, is_main)
    batches = iter(make_loader(dataset, cfg.batch_size, counters["samples"], cfg.data.num_workers))
    runlog = RunLog(run_dir, is_main)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=counters["step"], desc="distill", unit="step",
               disable=None if (is_main and cfg.progress) else True, dynamic_ncols=True)
    gas = cfg.deepspeed.grad_accum
    lo = cfg.loss
    start_step, t_start, t_first = counters["step"], time.time(), None
    last_terms: dict[str, float] = {}
    last_val: dict[str, float] = {}
    stop = False
    while counters["step"] < cfg.max_steps and not stop:
        step = counters["step"]
        sums: dict[str, float] = {}
        for micro in range(gas):
            x = next(batches).to(device=device, dtype=dtype, non_blocking=True)
            gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, rank, step, micro))
            with torch.no_grad():
                posterior = teacher.encode(x)
                z = posterior.sample(gen) if lo.sample_posterior else posterior.mode()
                targets = []
                if teacher_taps is not None:
                    teacher.decode(z)
                    targets = teacher_taps.take()
            recon, projected = engine(z)
            terms = {"recon": recon_loss(x, recon, lo.recon, lo.charbonnier_eps)}
            loss = lo.recon_weight * terms["recon"]
            if lpips_net is not None:
                terms["lpips"] = lpips_video(lpips_net, x.float(), recon.float())
                loss = loss + lo.lpips_weight * terms["lpips"]
            if projected:
                terms["align"], per_pair = align_loss(projected, targets)
                terms.update({f"align_{i}": t for i, t in enumerate(per_pair)})
                loss = loss + cfg.distill.align_weight * terms["align"]
            terms["total"] = loss
            engine.backward(loss)
            engine.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / gas
        counters["step"] = step = step + 1
        counters["samples"] += cfg.batch_size * gas
        if ema is not None:
            ema_update(ema, distiller, o.ema_decay if step > o.warmup_steps else 0.0)
        if t_first is None:
            t_first = time.time()
        rate = cfg.batch_size * gas * world * (step - start_step - 1) / max(1e-9, time.time() - t_first)
        last_terms = sums
        bar.update(1)
        bar.set_postfix(loss=f"{sums['total']:.4f}", rate=f"{rate:.2f}/s")
        if cfg.time_budget_s > 0:
            stop = _any_rank(time.time() - t_start > cfg.time_budget_s, device)
        stop = stop or (cfg.run_steps > 0 and step - start_step >= cfg.run_steps)
        final = stop or step == cfg.max_steps
        if step % cfg.log_every == 0 or step == 1 or final:
            runlog.write("train", step, {**sums, "lr": engine.get_lr()[0], "samples_per_s": rate,
                                         "elapsed_s": time.time() - t_start})
        current = ema if ema is not None else distiller
        if is_main and val_clips and (step % cfg.val_every == 0 or final):
            last_val, preview = validate(current, teacher, val_clips)
            write_png(run_dir / "previews" / f"step_{step:08d}.png", preview)
            runlog.write("val", step, last_val)
            bar.write(f"step {step}: student {last_val['psnr']:.2f} dB, teacher {last_val['teacher_psnr']:.2f} dB, "
                      f"student vs teacher {last_val['psnr_vs_teacher']:.2f} dB")
        if step % cfg.save_every == 0 or final:
            save_training_state(ckpt_dir, step, engines, ema, dict(counters), rank, cfg.keep_checkpoints, layout)
            if is_main:
                chosen = ema if (ema is not None and cfg.export_ema) else distiller
                export_pair(teacher, chosen.student, teacher_digest, run_dir / EXPORT_NAME, cfg, step)
    bar.close()
    done = counters["step"] - start_step
    rate = cfg.batch_size * gas * world * max(0, done - 1) / max(1e-9, time.time() - t_first) if t_first else 0.0
    summary = {"step": counters["step"], "world_size": world, "engine": engine_kind,
               "threads_per_rank": torch.get_num_threads(), "steps_this_run": done,
               "wall_s": time.time() - t_start, "samples_per_s": rate, "last_terms": last_terms, "val": last_val,
               "align": [f"{lv}={t}" for lv, t in zip(plan.levels, plan.teacher, strict=True)],
               "export": str(run_dir / EXPORT_NAME), "checkpoint": str(ckpt_dir / (latest_tag(ckpt_dir) or ""))}
    if is_main:
        with atomic_path(run_dir / "summary.json") as t:
            t.write_text(json.dumps(summary, indent=2))
        runlog.close()
    return summary


# --- command line ----------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (e.g. train/configs/distill_tiny.yaml)")
    p.add_argument("--teacher", default=None, help="teacher checkpoint (sets distill.teacher)")
    p.add_argument("--student", default=None, help="turbo-vaed preset (sets distill.student)")
    p.add_argument("--resume", action="store_true", help="continue from run_dir/checkpoints/latest")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. distill.align_weight=0")


def run(args: argparse.Namespace) -> dict:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.teacher is not None:
        overrides.append(f"distill.teacher={args.teacher}")
    if args.student is not None:
        overrides.append(f"distill.student={args.student}")
    return distill(load_config(args.config, overrides), resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m videovae.train.distill", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        summary = run(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"videovae distill: error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: summary[k] for k in ("step", "world_size", "samples_per_s", "export")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
