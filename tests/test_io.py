import multiprocessing
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from videovae.fileutil import atomic_path
from videovae.io import (
    VideoInfo,
    VideoIOError,
    VideoReader,
    VideoWriter,
    from_model_range,
    probe,
    read_image,
    read_video,
    to_model_range,
    write_png,
    write_video,
)
from videovae.metrics import psnr
from videovae.synthetic import synthetic_video

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _make_video(path, frames, *, codec, pix_fmt, fps=24, src_format="rgb24", options=None, fmt=None):
    """Encode numpy frames (T, H, W, C) of ``src_format`` with PyAV directly (independent of the writer)."""
    rate = Fraction(fps)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        s.codec_context.time_base = 1 / rate
        if options:
            s.options = options
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format=src_format)
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode())
    return str(path)


def _no_temp_files(folder):
    return [n for n in os.listdir(folder) if ".tmp-" in n]


# --------------------------------------------------------------------------- writer round trips


def test_mkv_roundtrip_is_exact(tmp_path):
    frames = torch.randint(0, 256, (7, 17, 33, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "clip.mkv"
    write_video(path, frames, fps=24)
    back, fps = read_video(path)
    assert back.dtype == torch.uint8 and back.shape == frames.shape
    assert torch.equal(back, frames)
    assert fps == pytest.approx(24.0)
    info = probe(path)
    assert info.codec == "ffv1" and (info.width, info.height) == (33, 17)
    assert _no_temp_files(tmp_path) == []


def test_mp4_roundtrip_quality_and_count(tmp_path):
    frames = synthetic_video(12, 64, 96, seed=1)
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=30, crf=18)
    info = probe(path)
    assert (info.codec, info.pix_fmt, info.width, info.height, info.num_frames) == ("h264", "yuv420p", 96, 64, 12)
    back, fps = read_video(path)
    assert back.shape == frames.shape
    p = psnr(to_model_range(frames), to_model_range(back))
    assert float(p.min()) > 35.0
    assert fps == pytest.approx(30.0)


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
@pytest.mark.parametrize("fps", [24, 30, 30000 / 1001])
def test_fps_preserved(tmp_path, ext, fps):
    path = tmp_path / f"clip{ext}"
    write_video(path, synthetic_video(5, 32, 32), fps=fps)
    assert probe(path).fps == pytest.approx(fps, abs=1e-3)
    with VideoReader(path) as r:
        assert r.info.fps == pytest.approx(fps, abs=1e-3)
        assert r.read_all().shape[0] == 5


def test_fraction_fps_and_libx265(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, synthetic_video(4, 32, 32), fps=Fraction(30000, 1001), codec="libx265")
    info = probe(path)
    assert info.codec == "hevc" and info.fps == pytest.approx(30000 / 1001, abs=1e-6)
    assert read_video(path)[0].shape == (4, 32, 32, 3)


def test_png_folder_output(tmp_path):
    frames = synthetic_video(3, 20, 24)
    for target in (str(tmp_path / "frames"), str(tmp_path / "frames2") + "/"):
        write_video(target, frames, fps=24)
        folder = Path(target)
        assert sorted(os.listdir(folder)) == ["frame_000000.png", "frame_000001.png", "frame_000002.png"]
        for i in range(3):
            assert torch.equal(read_image(folder / f"frame_{i:06d}.png")[0], frames[i])
    # re-writing replaces an earlier frame folder
    write_video(tmp_path / "frames", frames[:1], fps=24)
    assert os.listdir(tmp_path / "frames") == ["frame_000000.png"]
    # a folder with other content is never replaced
    (tmp_path / "frames" / "notes.txt").write_text("keep me")
    with pytest.raises(VideoIOError, match="notes.txt"):
        write_video(tmp_path / "frames", frames, fps=24)
    assert (tmp_path / "frames" / "notes.txt").exists()
    assert _no_temp_files(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umask_mode_not_the_temp_file_mode(tmp_path, umask):
    # outputs are written under mkstemp/mkdtemp names (0o600 / 0o700) and renamed into place; they must
    # end with the mode a plain open()/mkdir gives, or others cannot read a reconstruction in a shared folder
    frames = synthetic_video(2, 16, 16)
    old = os.umask(umask)
    try:
        write_video(tmp_path / "clip.mp4", frames, fps=24)
        write_video(tmp_path / "frames", frames, fps=24)
        write_png(tmp_path / "still.png", frames[0])
        with atomic_path(tmp_path / "latents.safetensors") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    for name in ("clip.mp4", "still.png", "latents.safetensors", "frames/frame_000000.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / "frames").stat().st_mode & 0o777 == 0o777 & ~umask


def test_outputs_written_where_the_filesystem_refuses_modes(tmp_path, monkeypatch):
    # vfat (without `quiet`) and some network mounts answer chmod with EPERM: the write must still succeed
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    frames = synthetic_video(2, 16, 16)
    write_video(tmp_path / "clip.mkv", frames, fps=24)
    write_video(tmp_path / "frames", frames, fps=24)
    write_png(tmp_path / "still.png", frames[0])
    with atomic_path(tmp_path / "latents.safetensors") as tmp:
        tmp.write_bytes(b"x")
    assert torch.equal(read_video(tmp_path / "clip.mkv")[0], frames)
    assert sorted(os.listdir(tmp_path)) == ["clip.mkv", "frames", "latents.safetensors", "still.png"]


def test_writer_multiple_writes_and_overwrite(tmp_path):
    frames = synthetic_video(9, 16, 16)
    path = tmp_path / "clip.mkv"
    path.write_bytes(b"old content")
    with VideoWriter(path, 24) as w:
        w.write(frames[:4])
        w.write(frames[4:])
        assert w.frames_written == 9
    assert torch.equal(read_video(path)[0], frames)


# --------------------------------------------------------------------------- reader


def test_iter_chunks_and_max_frames(tmp_path):
    frames = synthetic_video(10, 16, 24)
    path = tmp_path / "clip.mkv"
    write_video(path, frames, fps=24)
    with VideoReader(path) as r:
        assert isinstance(r.info, VideoInfo)
        chunks = list(r.iter_chunks(4))
        assert [c.shape[0] for c in chunks] == [4, 4, 2]
        assert all(c.dtype == torch.uint8 and c.shape[1:] == (16, 24, 3) for c in chunks)
        assert r.frames_read == 10
        assert torch.equal(torch.cat(chunks), frames)
        with pytest.raises(VideoIOError, match="single pass"):
            r.read_all()
    with VideoReader(path, max_frames=6) as r:
        assert [c.shape[0] for c in r.iter_chunks(3)] == [3, 3]
        assert r.frames_read == 6
    with VideoReader(path, max_frames=5) as r:
        assert torch.equal(r.read_all(), frames[:5])
    assert read_video(path, max_frames=100)[0].shape[0] == 10


def test_single_frame_video(tmp_path):
    frames = synthetic_video(1, 16, 16)
    write_video(tmp_path / "one.mkv", frames, fps=24)
    assert torch.equal(read_video(tmp_path / "one.mkv")[0], frames)


def _gradient(t, h, w):
    y = np.linspace(0, 1, h)[None, :, None]
    x = np.linspace(0, 1, w)[None, None, :]
    k = np.arange(t)[:, None, None] / max(t, 1)
    return np.clip((0.15 + 0.6 * (0.5 * x + 0.3 * y + 0.2 * k)) * 255, 0, 255).astype(np.uint8)


# libx264 rather than libx265 for 10-bit: PyAV's bundled x265 corrupts the heap when one process
# encodes 8-bit and then 10-bit HEVC (and test_fraction_fps_and_libx265 encodes 8-bit HEVC).
@pytest.mark.parametrize(
    "codec,pix_fmt,ext",
    [("ffv1", "yuv420p10le", "mkv"), ("libx264", "yuv420p10le", "mp4")],
)
def test_read_10bit(tmp_path, codec, pix_fmt, ext):
    g = _gradient(4, 32, 48)
    rgb = np.stack([g, 255 - g, g // 2], axis=-1)
    path = _make_video(tmp_path / f"ten.{ext}", rgb, codec=codec, pix_fmt=pix_fmt)
    assert probe(path).pix_fmt == pix_fmt
    back, _ = read_video(path)
    assert back.dtype == torch.uint8 and back.shape == (4, 32, 48, 3)
    assert (back.float() - torch.from_numpy(rgb).float()).abs().mean() < 4.0


def test_read_gray(tmp_path):
    g = _gradient(3, 24, 40)
    path = _make_video(tmp_path / "gray.mkv", g, codec="ffv1", pix_fmt="gray", src_format="gray")
    back, _ = read_video(path)
    assert back.shape == (3, 24, 40, 3)
    assert torch.equal(back[..., 0], back[..., 1]) and torch.equal(back[..., 1], back[..., 2])
    assert (back[..., 0].float() - torch.from_numpy(g).float()).abs().max() <= 2


@pytest.mark.parametrize(
    "codec,pix_fmt,name", [("png", "rgba", "alpha.mov"), ("ffv1", "yuva420p", "alpha.mkv")]
)
def test_read_alpha(tmp_path, codec, pix_fmt, name):
    g = _gradient(3, 24, 32)
    rgba = np.stack([g, 255 - g, np.full_like(g, 90), np.full_like(g, 128)], axis=-1)
    path = _make_video(tmp_path / name, rgba, codec=codec, pix_fmt=pix_fmt, src_format="rgba")
    back, _ = read_video(path)
    assert back.shape == (3, 24, 32, 3) and back.dtype == torch.uint8
    tol = 0.5 if codec == "png" else 3.0
    assert (back.float() - torch.from_numpy(rgba[..., :3]).float()).abs().mean() <= tol


def test_read_still_image_file_as_video(tmp_path):
    img = torch.from_numpy(np.stack([_gradient(1, 20, 30)[0]] * 3, axis=-1))
    write_png(tmp_path / "still.png", img)
    back, _ = read_video(tmp_path / "still.png")
    assert torch.equal(back, img[None])


def test_decord_backend_missing(tmp_path):
    try:
        import decord  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("decord installed; only the missing-backend error is tested")
    path = tmp_path / "clip.mkv"
    write_video(path, synthetic_video(2, 16, 16), fps=24)
    with pytest.raises(VideoIOError, match=r"pip install videovae\[decord\]"):
        VideoReader(path, backend="decord")


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    for fn in (probe, read_video, VideoReader, read_image):
        with pytest.raises(VideoIOError, match="nope.mp4.*not found"):
            fn(missing)


def test_zero_byte_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoIOError, match="empty.mp4.*empty"):
        probe(empty)
    with pytest.raises(VideoIOError, match="empty.mp4"):
        read_video(empty)


def test_text_file_named_mp4(tmp_path):
    bogus = tmp_path / "bogus.mp4"
    bogus.write_text("this is not a video\n" * 20)
    with pytest.raises(VideoIOError, match="bogus.mp4"):
        probe(bogus)
    with pytest.raises(VideoIOError, match="bogus.mp4"):
        read_video(bogus)
    with pytest.raises(VideoIOError, match="bogus.mp4"):
        read_image(bogus)


def test_audio_only_file(tmp_path):
    path = tmp_path / "sound.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        frame.pts = 0
        c.mux(s.encode(frame))
        c.mux(s.encode())
    with pytest.raises(VideoIOError, match="sound.mkv.*no video stream"):
        probe(path)


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_mp4(tmp_path, faststart):
    frames = synthetic_video(20, 32, 32, seed=2)
    rgb = frames.numpy()
    opts = {"movflags": "faststart"} if faststart else None
    full = tmp_path / "full.mp4"
    with av.open(str(full), "w", options=opts) as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for img in rgb:
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    try:
        back, _ = read_video(cut)
    except VideoIOError as e:
        assert "cut.mp4" in str(e)
    else:
        assert 0 < back.shape[0] < 20


def test_corrupt_packets(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, synthetic_video(20, 32, 32, seed=3), fps=24)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    start = len(data) // 4
    data[start : start + len(data) // 3] = rng.integers(0, 256, len(data) // 3, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    try:
        back, _ = read_video(bad)
    except VideoIOError as e:
        assert "bad.mp4" in str(e)
    else:
        assert back.dtype == torch.uint8 and back.shape[1:] == (32, 32, 3)


def test_writer_unknown_extension(tmp_path):
    with pytest.raises(VideoIOError, match=r"clip\.avi.*unsupported extension"):
        VideoWriter(tmp_path / "clip.avi", 24)
    with pytest.raises(VideoIOError, match="unsupported codec"):
        VideoWriter(tmp_path / "clip.mp4", 24, codec="mpeg2video")
    with pytest.raises(VideoIOError, match="does not exist"):
        VideoWriter(tmp_path / "missing_dir" / "clip.mp4", 24)
    with pytest.raises(VideoIOError, match="fps"):
        VideoWriter(tmp_path / "clip.mp4", 0)
    assert os.listdir(tmp_path) == []


def test_writer_rejects_bad_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    with pytest.raises(VideoIOError, match=r"clip\.mp4.*uint8.*float32"):
        write_video(path, torch.zeros(2, 16, 16, 3), fps=24)
    with pytest.raises(VideoIOError, match=r"clip\.mp4.*\(T, H, W, 3\).*\(2, 3, 16, 16\)"):
        write_video(path, torch.zeros(2, 3, 16, 16, dtype=torch.uint8), fps=24)
    with pytest.raises(VideoIOError, match=r"clip\.mp4.*even.*17x15"):
        write_video(path, torch.zeros(2, 15, 17, 3, dtype=torch.uint8), fps=24)
    with pytest.raises(VideoIOError, match=r"clip\.mp4.*16x8 differs.*16x16"):
        with VideoWriter(path, 24) as w:
            w.write(torch.zeros(2, 16, 16, 3, dtype=torch.uint8))
            w.write(torch.zeros(2, 8, 16, 3, dtype=torch.uint8))
    with pytest.raises(VideoIOError, match="no frames written"):
        with VideoWriter(path, 24):
            pass
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["clip.mp4", "clip.mkv", "frames"])
def test_aborted_writer_leaves_nothing(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(path, 24) as w:
            w.write(synthetic_video(3, 16, 16))
            assert len(_no_temp_files(tmp_path)) == 1  # output goes to a temp file first
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    w = VideoWriter(path, 24)
    w.write(synthetic_video(2, 16, 16))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_aborted_writer_keeps_previous_file(tmp_path):
    path = tmp_path / "clip.mkv"
    old = synthetic_video(2, 16, 16, seed=5)
    write_video(path, old, fps=24)
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, 24) as w:
            w.write(synthetic_video(3, 16, 16))
            raise KeyboardInterrupt
    assert torch.equal(read_video(path)[0], old)
    assert _no_temp_files(tmp_path) == []


# --------------------------------------------------------------------------- ranges and images


def test_model_range_conversions():
    frames = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(2, 16, 16, 3).contiguous()
    x = to_model_range(frames)
    assert x.shape == (1, 3, 2, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(from_model_range(x), frames)
    assert torch.equal(from_model_range(x[0]), frames)
    noisy = from_model_range(x * 3)  # clamped
    assert noisy.dtype == torch.uint8 and int(noisy[0, 0, 0, 0]) == 0 and int(noisy[0, -1, -1, 0]) == 255
    assert torch.equal(from_model_range(x + 0.3 / 127.5), frames)  # rounds to nearest
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(frames.float())
    with pytest.raises(ValueError, match="shape"):
        to_model_range(frames[0])
    with pytest.raises(ValueError, match="batch size 1"):
        from_model_range(torch.zeros(2, 3, 1, 4, 4))


def test_png_image_roundtrip_and_modes(tmp_path):
    img = synthetic_video(1, 21, 13)[0]
    write_png(tmp_path / "a.png", img)
    back = read_image(tmp_path / "a.png")
    assert back.shape == (1, 21, 13, 3) and torch.equal(back[0], img)
    assert _no_temp_files(tmp_path) == []
    arr = img.numpy()
    Image.fromarray(np.dstack([arr, np.full(arr.shape[:2], 7, np.uint8)])).save(tmp_path / "rgba.png")
    assert torch.equal(read_image(tmp_path / "rgba.png")[0], img)
    Image.fromarray(arr[..., 0]).save(tmp_path / "gray.png")
    gray = read_image(tmp_path / "gray.png")[0]
    assert torch.equal(gray[..., 2], img[..., 0]) and torch.equal(gray[..., 1], img[..., 0])
    Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    assert torch.equal(read_image(tmp_path / "gray16.png")[0, ..., 0], img[..., 0])
    with pytest.raises(VideoIOError, match="write_png expects one image"):
        write_png(tmp_path / "b.png", torch.zeros(2, 4, 4, 3, dtype=torch.uint8))


def _read_in_fork(paths, queue):
    torch.set_num_threads(1)  # as a DataLoader worker does
    queue.put([tuple(read_video(p)[0].shape) for p in paths])


def test_reading_in_forked_worker_after_parent_decoded(tmp_path):
    """The trainer's DataLoader workers are forked after the main process has decoded the validation
    clips; with PyAV's threaded pixel-format conversion the child hung for ever inside ``to_ndarray``."""
    frames = synthetic_video(9, 64, 96, seed=3)
    paths = [str(tmp_path / f"clip{i}.{ext}") for i in range(3) for ext in ("mkv", "mp4")]
    for p in paths:
        write_video(p, frames, fps=24)
    for p in paths[:3]:
        read_video(p)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_fork, args=(paths, queue))
    child.start()
    child.join(120)  # a deadlock guard, not a speed limit: the reads take well under a second
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung, "reading video in a forked process deadlocked"
    assert child.exitcode == 0
    assert queue.get(timeout=10) == [(9, 64, 96, 3)] * len(paths)


# --------------------------------------------------------------------------- shared sample media


@pytest.mark.skipif(not (SHARED_DATA / "world.mp4").exists(), reason="shared sample data not present")
def test_shared_world_mp4():
    path = SHARED_DATA / "world.mp4"
    info = probe(path)
    assert (info.width, info.height) == (480, 270)
    assert info.fps == pytest.approx(30.0, abs=0.01)
    assert info.num_frames == 901
    with VideoReader(path, max_frames=10) as r:
        chunks = list(r.iter_chunks(4))
    frames = torch.cat(chunks)
    assert frames.shape == (10, 270, 480, 3) and frames.dtype == torch.uint8
    assert float(frames.float().std()) > 5.0
