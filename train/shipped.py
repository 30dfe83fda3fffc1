"""The recipe of the shipped model (``vv-s16``): its training data, its training run, its export.

Steps (each resumable; see ``videovae/weights/MODEL_CARD.md`` for what was run and measured)::

    python -m videovae.train.shipped data --out data/vv-s16           # write the training clips
    python -m videovae.train.vae --config train/configs/vv_s16.yaml "data.paths=[data/vv-s16]" \
        run_dir=runs/vv-s16 [--resume]                                 # train (or deepspeed --module ...)
    python -m videovae.train.shipped export runs/vv-s16/vae.safetensors   # fp16 into the package

Data (all real or rendered offline; nothing is downloaded):

* the real clips listed in :data:`TRAIN_CLIPS` (copied as they are), from ``train/clips`` in the
  repository (sources and licences in its README) or ``../shared/data``, with :data:`HELD_OUT_CLIPS`
  kept out of training for validation;
* real photographs (scikit-image's sample images and the photos of ``../shared/data``) filmed by a
  virtual camera (:func:`videovae.synthetic.camera_motion_video`: pan, zoom, rotation, brightness);
* the synthetic scenes of :mod:`videovae.synthetic`.

Rendered clips are written losslessly (FFV1 ``.mkv``) so that training never sees codec artifacts
that are not in the source.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from videovae.synthetic import camera_motion_video, write_synthetic_video

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
REPO_CLIPS = Path(__file__).resolve().parent / "clips"
# Stages 1-5 of vv-s16 trained on the first five (../shared/data); the first eight clips of
# train/clips joined the training set after stage 5, the next three after stage 6 and the last four
# after stage 10.
TRAIN_CLIPS = ("world.mp4", "a.mp4", "mmaction2_armwrestling.mp4", "mmaction2_basketball.mp4",
               "mmaction2_room_1080p.mp4", "sam2_dog.mp4", "sam2_cups.mp4", "sam2_blocks.mp4",
               "sam2_juggle.mp4", "sam2_bedroom.mp4", "intel_car_detection.mp4",
               "intel_person_detection.mp4", "intel_asl_book.mp4", "intel_asl_again.mp4",
               "intel_asl_walk.mp4", "intel_bottle_detection.mp4", "openmpf_hikers.mp4",
               "openmpf_highway.mp4", "openmpf_hall.mp4", "openmpf_marathon.mp4")
# The first four are the training validation set; the last two joined the evaluation after stage 8.
HELD_OUT_CLIPS = ("mmaction2_pool.mp4", "mmaction2_makeup.avi", "sam2_coffee.mp4", "intel_asl_sister.mp4",
                  "imageio_cockatoo.mp4", "nasa_jwst_cleanroom.mp4")
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "immunohistochemistry.png", "ihc.png", "retina.jpg", "brick.png",
                  "grass.png", "gravel.png", "camera.png", "moon.png", "page.png", "text.png", "color.png")
SHARED_PHOTOS = ("cheetah.jpg", "lion.jpg", "tower.jpg")
CLIPS_PER_PHOTO = 4
PHOTO_CLIP = (49, 256, 320)  # frames, height, width
SYNTHETIC_CLIPS = 8
SYNTHETIC_CLIP = (65, 256, 320)
SPEED_REPEATS = 3  # evaluate's speed figures: best of this many runs


def shared_dir() -> Path:
    """``../shared/data`` beside the checkout (may be absent)."""
    return SHARED.resolve()


def clip_path(name: str) -> Path:
    """Where a real clip of :data:`TRAIN_CLIPS` or :data:`HELD_OUT_CLIPS` lives: ``train/clips`` in
    the repository, else ``../shared/data`` (which may be absent: check ``is_file()``)."""
    repo = REPO_CLIPS / name
    return repo if repo.is_file() else shared_dir() / name


def _photo_paths() -> list[Path]:
    import skimage

    skdata = Path(skimage.__file__).parent / "data"
    found = [skdata / name for name in SKIMAGE_PHOTOS if (skdata / name).is_file()]
    found += [shared_dir() / name for name in SHARED_PHOTOS if (shared_dir() / name).is_file()]
    return found


def _read_rgb(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB")))


def prepare_data(out: Path) -> dict:
    """Write the training set into ``out`` (real clips copied, rendered clips written losslessly);
    returns the manifest (also written as ``out/manifest.json``). Existing files are kept."""
    from videovae.io import write_png, write_video

    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, list[str]] = {"real_clips": [], "photo_clips": [], "synthetic_clips": [], "photos": []}
    for name in TRAIN_CLIPS:
        src = clip_path(name)
        if src.is_file():
            dst = out / name
            if not dst.exists():
                shutil.copyfile(src, dst)
            manifest["real_clips"].append(name)
    frames, height, width = PHOTO_CLIP
    for path in _photo_paths():
        image = _read_rgb(path)
        still = out / f"still_{path.stem}.png"  # also trained on as 1-frame clips (data.image_ratio)
        if not still.exists():
            write_png(still, image)
        manifest["photos"].append(still.name)
        for k in range(CLIPS_PER_PHOTO):
            dst = out / f"photo_{path.stem}_{k}.mkv"
            if not dst.exists():
                seed = int(np.random.default_rng([k, *path.stem.encode()]).integers(2**31))
                write_video(dst, camera_motion_video(image, frames, height, width, seed=seed), 24.0)
            manifest["photo_clips"].append(dst.name)
    frames, height, width = SYNTHETIC_CLIP
    for k in range(SYNTHETIC_CLIPS):
        dst = out / f"synthetic_{k}.mkv"
        if not dst.exists():
            write_synthetic_video(dst, frames, height, width, seed=100 + k)
        manifest["synthetic_clips"].append(dst.name)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def export_shipped(src: Path, name: str = "vv-s16") -> dict:
    """Write the (EMA) weights of a run's ``vae.safetensors`` (or, for a turbo model, a distillation's
    ``turbo.safetensors`` pair) into the package as fp16, atomically; returns the checkpoint's
    ``extra`` metadata. The config must be the preset's; a pair must have been distilled from the
    shipped weights of its teacher."""
    from videovae.checkpoint import load_checkpoint, read_metadata, save_checkpoint
    from videovae.models import PRESETS
    from videovae.models.turbo_vaed import TEACHERS
    from videovae.shipped import SHIPPED, WEIGHTS_DIR, shipped_path

    if name not in SHIPPED:
        raise ValueError(f"{name!r} is not a shipped model; shipped: {', '.join(sorted(SHIPPED))}")
    model = load_checkpoint(src)
    pair = model.family == "turbo-pair"
    if (model.config.decoder if pair else model.config) != PRESETS[name][1]:
        raise ValueError(f"{src}: its config is not the {name} preset's")
    if pair:
        teacher_digest = read_metadata(shipped_path(TEACHERS[name]))["weights_sha256"]
        if model.config.teacher_weights_sha256 != teacher_digest:
            raise ValueError(f"{src}: distilled from other weights than the shipped {TEACHERS[name]}")
    trained = read_metadata(src).get("extra", {})
    extra = {"shipped_model": name, "trained_steps": trained.get("trained_steps"),
             "recipe": "python -m videovae.train.shipped (see videovae/weights/MODEL_CARD.md)"}
    save_checkpoint(WEIGHTS_DIR / SHIPPED[name], model, dtype=torch.float16, extra=extra)
    return extra


def _eval_clip(path: Path, frames: int, size: int) -> torch.Tensor:
    """First ``frames`` frames, short side resized to ``size`` (antialiased), centre ``size``x``size``
    crop: ``(1, 3, T, size, size)`` in [-1, 1]."""
    import torch.nn.functional as F

    from videovae.io import VideoReader, to_model_range

    with VideoReader(path, max_frames=frames) as reader:
        x = reader.read_all().permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear",
                      antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
    return to_model_range(x.permute(0, 2, 3, 1).contiguous())


def evaluate(weights: str | None, frames: int = 33, size: int = 256) -> dict:
    """PSNR/SSIM (posterior mean, chunked engine) on the held-out and the training real clips at
    ``size`` px, and encode/decode frames per second at 17 x 256 x 256 fp32 on this machine (best of
    ``SPEED_REPEATS`` runs)."""
    import time

    import videovae
    from videovae.metrics import DRIFT_HEAD, DRIFT_TAIL, video_metrics

    model = videovae.load(weights)
    out: dict = {"clips": {}, "frames": frames, "size": size, "threads": torch.get_num_threads()}
    groups = {"held_out": HELD_OUT_CLIPS, "train": TRAIN_CLIPS}
    for group, names in groups.items():
        for name in names:
            path = clip_path(name)
            if not path.is_file():
                continue
            x = _eval_clip(path, frames, size)
            with torch.no_grad():
                enc = model.encode_video(x, progress=False)
                y = model.decode_video(enc.mean, enc.geometry, progress=False).clamp(-1, 1)
            m = video_metrics(x, y)
            drift = {k: m[k] for k in (f"psnr_first_{DRIFT_HEAD}", f"psnr_last_{DRIFT_TAIL}") if k in m}
            out["clips"][name] = {"group": group, "psnr": m["psnr"], "ssim": m["ssim"], **drift}
    for group in groups:
        rows = [v for v in out["clips"].values() if v["group"] == group]
        if rows:
            keys = [k for k in rows[0] if k != "group"]
            out[group] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    x = torch.rand(1, 3, 17, 256, 256) * 2 - 1
    encode_s, decode_s = [], []
    with torch.no_grad():
        model.encode(x[:, :, :5, :64, :64])
        # Best of SPEED_REPEATS: one run on a shared CPU varies by up to 2x from one minute to the next.
        for _ in range(SPEED_REPEATS):
            t0 = time.perf_counter()
            z = model.encode(x).mean
            t1 = time.perf_counter()
            model.decode(z)
            t2 = time.perf_counter()
            encode_s.append(t1 - t0)
            decode_s.append(t2 - t1)
    out["encode_fps_256"] = 17 / min(encode_s)
    out["decode_fps_256"] = 17 / min(decode_s)
    out["speed_repeats"] = SPEED_REPEATS
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m videovae.train.shipped", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write the training clips")
    d.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("export", help="a run's vae.safetensors (or turbo.safetensors) -> fp16 weights in the package")
    e.add_argument("src", type=Path)
    e.add_argument("--name", default="vv-s16", help="the shipped model (vv-s16, or its turbo pair turbo-vv-s16)")
    v = sub.add_parser("evaluate", help="PSNR/SSIM on held-out and training clips, CPU speed")
    v.add_argument("--weights", default=None, help="checkpoint (default: the shipped weights)")
    v.add_argument("--frames", type=int, default=33)
    v.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.command == "data":
        manifest = prepare_data(args.out)
        print(json.dumps({k: len(v) for k, v in manifest.items()}))
    elif args.command == "export":
        print(json.dumps(export_shipped(args.src, args.name)))
    else:
        result = evaluate(args.weights, args.frames)
        text = json.dumps(result, indent=2)
        if args.json is not None:
            from videovae.fileutil import atomic_path

            with atomic_path(args.json) as tmp:
                tmp.write_text(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
