"""Triton kernels of ``videovae.kernels`` against their PyTorch references (outputs and gradients).

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (see ``conftest.py``), so shapes are tiny
but deliberately odd: T in {1, 5, 17}, H x W not multiples of the block, C not a multiple of 32.
bf16 results are compared with the fp32 reference evaluated on the same (bf16-representable)
inputs. Tolerances: the one policy of ``videovae.kernels.tolerance``, shared with the benchmark.
"""

import zlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed; the Triton kernels cannot be tested")

from videovae.kernels.blend_tile import triton as blend_tr  # noqa: E402
from videovae.kernels.blend_tile.reference import blend_tile_ref_, normalize_canvas_ref  # noqa: E402
from videovae.kernels.causal_pad3d import triton as pad_tr  # noqa: E402
from videovae.kernels.causal_pad3d.reference import causal_pad3d_ref  # noqa: E402
from videovae.kernels.group_norm_silu import triton as gn_tr  # noqa: E402
from videovae.kernels.group_norm_silu.reference import (  # noqa: E402
    group_norm_apply_ref,
    group_norm_silu_ref,
    group_norm_stats_ref,
)
from videovae.kernels.rms_norm_silu import triton as rms_tr  # noqa: E402
from videovae.kernels.rms_norm_silu.reference import rms_norm_silu_ref  # noqa: E402
from videovae.kernels.to_uint8_frames import triton as u8_tr  # noqa: E402
from videovae.kernels.to_uint8_frames.reference import to_uint8_frames_ref  # noqa: E402
from videovae.kernels.tolerance import check_float, check_uint8  # noqa: E402

BF16 = torch.bfloat16
F32 = torch.float32


def seeded(*params) -> torch.Generator:
    """A CPU generator seeded from the test parameters (stable across processes)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def assert_close(got, want, dtype, what):
    """The shared policy (videovae.kernels.tolerance): relative RMS per dtype, NaN fails."""
    problem = check_float(got, want, dtype, what)
    assert problem is None, problem


def assert_uint8_close(got, want, what):
    """The shared policy: uint8 outputs at most one level from the reference (FMA contraction)."""
    problem = check_uint8(got, want, what)
    assert problem is None, problem


def make(shape, dtype, device, gen, scale=1.0, shift=0.0, grad=True):
    """Random tensor drawn from ``gen``, rounded to ``dtype``; returns (low-precision, fp32 twin)."""
    base = torch.randn(shape, generator=gen) * scale + shift
    lo = base.to(dtype).to(device).requires_grad_(grad)
    hi = lo.detach().float().requires_grad_(grad)
    return lo, hi


def grads(out, inputs, dy):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], dy)


GN_CASES = [
    # shape, groups, per_frame, silu, affine, dtype
    ((1, 12, 5, 7, 9), 3, True, True, True, F32),
    ((1, 12, 5, 7, 9), 4, False, True, True, F32),
    ((2, 12, 1, 13, 11), 4, True, False, False, F32),
    ((1, 12, 17, 3, 5), 4, False, False, True, F32),
    ((1, 24, 5, 3, 5), 8, True, True, False, F32),
    ((1, 24, 5, 3, 5), 8, False, True, True, BF16),
    ((1, 12, 17, 3, 5), 3, True, True, True, BF16),
    ((2, 12, 13, 11), 4, True, True, True, F32),
]


@pytest.mark.parametrize("shape,groups,per_frame,silu,affine,dtype", GN_CASES)
def test_group_norm_silu(shape, groups, per_frame, silu, affine, dtype, device, poison_empty):
    gen = seeded(shape, groups, per_frame, silu, affine)
    x, xf = make(shape, dtype, device, gen, scale=2.0, shift=3.0)
    c = shape[1]
    w, wf = make((c,), dtype, device, gen, shift=1.0) if affine else (None, None)
    b, bf = make((c,), dtype, device, gen) if affine else (None, None)
    y = gn_tr.group_norm_silu(x, w, b, groups, 1e-6, per_frame, silu)
    ref = group_norm_silu_ref(xf, wf, bf, groups, 1e-6, per_frame, silu)
    assert y.dtype == dtype
    assert_close(y, ref, dtype, "output")
    dy = torch.randn(shape, generator=gen).to(dtype).to(device)
    got = grads(y, (x, w, b), dy)
    want = grads(ref, (xf, wf, bf), dy.float())
    for name, g, r in zip(("dx", "dweight", "dbias"), got, want, strict=False):
        assert g.dtype == dtype
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize("per_frame", [True, False])
def test_group_norm_silu_split_reductions_agree(per_frame, device, poison_empty):
    """Every launch configuration the tuner may pick (rows split over 1..8 programs, any block)
    gives the reference result: tuning changes speed only."""
    shape, groups = (1, 8, 3, 33, 31), 4
    gen = seeded(shape, per_frame, "split")
    x, xf = make(shape, F32, device, gen, scale=2.0, shift=3.0, grad=False)
    w, wf = make((8,), F32, device, gen, shift=1.0, grad=False)
    b, bf = make((8,), F32, device, gen, grad=False)
    ref = group_norm_silu_ref(xf, wf, bf, groups, 1e-6, per_frame, True)
    configs = [gn_tr.FwdConfig(128, 1, 4), gn_tr.FwdConfig(128, 8, 4), gn_tr.FwdConfig(256, 3, 8)]
    configs += gn_tr.fwd_candidates(24, 33 * 31, torch.device(device))[:1]
    for cfg in configs:
        y, mean, rstd = gn_tr.group_norm_silu_fwd(x, w, b, groups, 1e-6, per_frame, True, cfg)
        assert mean.shape == (1, groups, 3 if per_frame else 1)
        assert_close(y, ref, F32, f"output with {cfg}")


@pytest.mark.parametrize("max_block_s", [16, 32, 64, 128])
def test_rms_norm_silu_block_sizes_agree(max_block_s, device, poison_empty):
    """Every block size the tuner may pick gives the reference result (both the single-tile and the
    channel-chunked path)."""
    for c in (12, 200):
        shape = (1, c, 3, 7, 9)
        gen = seeded(shape, max_block_s)
        x, xf = make(shape, F32, device, gen, grad=False)
        w, wf = make((c,), F32, device, gen, shift=1.0, grad=False)
        y, _ = rms_tr.rms_norm_silu_fwd(x, w, None, 1e-12, True, max_block_s)
        assert_close(y, rms_norm_silu_ref(xf, wf, None, 1e-12, True), F32, f"C={c}")


@pytest.mark.parametrize("per_frame", [True, False])
def test_group_norm_silu_keeps_a_frame_major_layout(per_frame, device, poison_empty):
    """Per-frame 2D convs leave (N, T, C, H, W) memory seen as NCTHW: both implementations normalise
    it in that layout (no copy) and return the same layout, with the values of the contiguous case."""
    shape, groups = (2, 12, 3, 7, 9), 4
    gen = seeded(shape, per_frame, "frame-major")
    x, xf = make(shape, F32, device, gen, scale=2.0, shift=3.0)
    w, wf = make((12,), F32, device, gen, shift=1.0)
    b, bf = make((12,), F32, device, gen)
    ref = group_norm_silu_ref(xf, wf, bf, groups, 1e-6, per_frame, True)
    dy = torch.randn(shape, generator=gen).to(device)
    want = grads(ref, (xf, wf, bf), dy)
    frame_major = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    for fn in (gn_tr.group_norm_silu, group_norm_silu_ref):
        y = fn(frame_major, w, b, groups, 1e-6, per_frame, True)
        assert y.transpose(1, 2).is_contiguous() and not y.is_contiguous()
        assert_close(y, ref, F32, f"{fn.__name__} output")
        got = grads(y, (frame_major, w, b), dy)
        for name, g, r in zip(("dx", "dweight", "dbias"), got, want, strict=True):
            assert_close(g, r, F32, f"{fn.__name__} {name}")


def _layout(x: torch.Tensor, frame_major: bool) -> torch.Tensor:
    return x.transpose(1, 2).contiguous().transpose(1, 2) if frame_major else x.contiguous()


@pytest.mark.parametrize("per_frame", [True, False])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("frame_major", [False, True])
def test_group_norm_stats_then_apply_is_the_one_step_norm(per_frame, dtype, frame_major, device, poison_empty):
    """The two-step form: statistics (N, G, T or 1) of both implementations agree, and normalising
    with them gives the one-step norm's values, in the input's layout."""
    shape, groups = (2, 12, 9, 7, 11), 4
    gen = seeded(shape, per_frame, dtype, frame_major, "two-step")
    x, xf = make(shape, dtype, device, gen, scale=2.0, shift=3.0, grad=False)
    x = _layout(x, frame_major)
    w, wf = make((12,), F32, device, gen, shift=1.0, grad=False)
    b, bf = make((12,), F32, device, gen, grad=False)
    want = group_norm_silu_ref(xf, wf, bf, groups, 1e-6, per_frame, True)
    ref_stats = group_norm_stats_ref(xf, groups, 1e-6, per_frame)
    assert ref_stats[0].shape == (2, groups, 9 if per_frame else 1)
    with torch.no_grad():
        for stats_fn, apply_fn in ((gn_tr.group_norm_stats, gn_tr.group_norm_apply),
                                   (group_norm_stats_ref, group_norm_apply_ref)):
            mean, rstd = stats_fn(x, groups, 1e-6, per_frame)
            assert mean.dtype == rstd.dtype == F32
            assert_close(mean, ref_stats[0], F32, f"{stats_fn.__name__} mean")
            assert_close(rstd, ref_stats[1], F32, f"{stats_fn.__name__} rstd")
            y = apply_fn(x, w, b, mean, rstd, True)
            assert y.dtype == dtype and y.shape == shape
            assert (y.stride(2) > y.stride(1)) == frame_major, "the output keeps the input's layout"
            assert_close(y, want, dtype, f"{apply_fn.__name__} output")


@pytest.mark.parametrize("frame_major", [False, True])
def test_group_norm_apply_normalises_time_slices_with_the_clip_statistics(frame_major, device, poison_empty):
    """A clip normalised 4 frames at a time (slices read in place, written into the frames of a
    padded window or of a frame-major window) with the whole clip's statistics is the whole-clip norm."""
    shape, groups, step = (1, 8, 11, 5, 13), 2, 4
    gen = seeded(shape, frame_major, "slices")
    x, xf = make(shape, BF16, device, gen, scale=2.0, shift=-1.0, grad=False)
    x = _layout(x, frame_major)
    w, wf = make((8,), F32, device, gen, shift=1.0, grad=False)
    want = group_norm_silu_ref(xf, wf, None, groups, 1e-6, False, True)
    with torch.no_grad():
        for stats_fn, apply_fn in ((gn_tr.group_norm_stats, gn_tr.group_norm_apply),
                                   (group_norm_stats_ref, group_norm_apply_ref)):
            mean, rstd = stats_fn(x, groups, 1e-6, False)
            padded = torch.full((1, 8, 2 + step, 5, 13), 7.0, device=device, dtype=BF16)
            frames_first = torch.full((1, step, 8, 5, 13), 7.0, device=device, dtype=BF16)
            for t0 in range(0, shape[2], step):
                part = x[:, :, t0 : t0 + step]
                k = part.shape[2]
                for window in (padded[:, :, 2 : 2 + k], frames_first[:, :k].transpose(1, 2)):
                    got = apply_fn(part, w, None, mean, rstd, True, out=window)
                    assert got.data_ptr() == window.data_ptr()
                    assert_close(window, want[:, :, t0 : t0 + k], BF16, f"{apply_fn.__name__} frames {t0}..")
                assert torch.all(padded[:, :, :2] == 7.0), f"{apply_fn.__name__} wrote outside its frames"


def test_group_norm_two_step_rejects_gradients_and_bad_statistics(device):
    x = torch.randn(1, 8, 3, 5, 5, device=device, requires_grad=True)
    w = torch.ones(8, device=device)
    mean, rstd = torch.zeros(1, 4, 1, device=device), torch.ones(1, 4, 1, device=device)
    for stats_fn, apply_fn in ((gn_tr.group_norm_stats, gn_tr.group_norm_apply),
                               (group_norm_stats_ref, group_norm_apply_ref)):
        with pytest.raises(ValueError, match="gradients"):
            stats_fn(x, 4)
        with pytest.raises(ValueError, match="gradients"):
            apply_fn(x, w, None, mean, rstd)
        with torch.no_grad():
            with pytest.raises(ValueError, match="mean and rstd"):
                apply_fn(x, w, None, mean[:, :, :0], rstd)
            with pytest.raises(ValueError, match="T=3 or 1"):
                apply_fn(x, w, None, mean.expand(1, 4, 2), rstd.expand(1, 4, 2))
            with pytest.raises(ValueError, match="num_groups"):
                apply_fn(x, w, None, mean[:, :3], rstd[:, :3])
            with pytest.raises(ValueError, match="N, C, T, H, W"):
                stats_fn(x[:, :, 0], 4)


def test_fwd_candidates_are_valid_launches():
    for rows, hw in ((2560, 4096), (2176, 65536), (1, 7), (16, 1)):
        cands = gn_tr.fwd_candidates(rows, hw, torch.device("cpu"))
        assert cands and len(set(cands)) == len(cands)
        for cfg in cands:
            assert cfg.block >= 128 and cfg.block & (cfg.block - 1) == 0
            assert 1 <= cfg.splits <= max(1, -(-hw // cfg.block))


def test_autotune_returns_the_heuristic_off_cuda_and_caches_on_cuda():
    from videovae.kernels._utils import _TUNED, autotune

    calls = []
    key = (torch.device("cpu"), "probe")
    assert autotune(key, ["a", "b"], calls.append) == "a"
    assert calls == [] and key not in _TUNED
    if torch.cuda.is_available():
        cuda_key = (torch.device("cuda", 0), "probe")
        got = autotune(cuda_key, ["a", "b"], lambda cfg: torch.cuda._sleep(10_000 if cfg == "a" else 10))
        assert got == "b" and _TUNED[cuda_key] == "b"


RMS_CASES = [
    # shape, weight, bias, silu, dtype
    ((1, 12, 5, 7, 9), True, True, True, F32),
    ((2, 12, 13, 11), True, False, False, F32),
    ((1, 200, 3, 5, 3), True, True, True, F32),  # C too large for one register tile: chunked path
    ((1, 16, 1, 7, 9), False, False, True, F32),
    ((1, 12, 17, 3, 5), True, True, True, BF16),
    ((1, 200, 1, 3, 5), True, False, False, BF16),
]


@pytest.mark.parametrize("shape,has_w,has_b,silu,dtype", RMS_CASES)
def test_rms_norm_silu(shape, has_w, has_b, silu, dtype, device, poison_empty):
    gen = seeded(shape, has_w, has_b, silu)
    x, xf = make(shape, dtype, device, gen)
    c = shape[1]
    w, wf = make((c,), dtype, device, gen, shift=1.0) if has_w else (None, None)
    b, bf = make((c,), dtype, device, gen) if has_b else (None, None)
    y = rms_tr.rms_norm_silu(x, w, b, 1e-12, silu)
    ref = rms_norm_silu_ref(xf, wf, bf, 1e-12, silu)
    assert y.dtype == dtype
    assert_close(y, ref, dtype, "output")
    dy = torch.randn(shape, generator=gen).to(dtype).to(device)
    got = grads(y, (x, w, b), dy)
    want = grads(ref, (xf, wf, bf), dy.float())
    for name, g, r in zip(("dx", "dweight", "dbias"), got, want, strict=False):
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize(
    "shape,dtype", [((1, 3, 5, 7, 9), F32), ((2, 3, 1, 13, 11), BF16), ((1, 4, 17, 3, 5), torch.float16)]
)
def test_to_uint8_frames(shape, dtype, device, poison_empty):
    gen = seeded(shape)
    x = (torch.rand(shape, generator=gen) * 2.4 - 1.2).to(dtype).to(device)
    x.view(-1)[:4] = torch.tensor([0.0, -1.0, 1.0, 5.0])
    got = u8_tr.to_uint8_frames(x)
    want = to_uint8_frames_ref(x)
    assert got.dtype == torch.uint8 and got.shape == (shape[0], shape[2], shape[3], shape[4], shape[1])
    assert got.is_contiguous()
    assert_uint8_close(got, want, "uint8 frames")


# (top, left, h, w, ramps) tiles of a 13 x 17 canvas, overlapping, with hard and feathered edges
TILES = [
    (0, 0, 8, 10, (0, 3, 0, 2)),
    (5, 0, 8, 10, (3, 0, 0, 2)),
    (0, 7, 8, 10, (0, 3, 2, 0)),
    (5, 7, 8, 10, (3, 0, 2, 0)),
    (2, 3, 1, 1, (1, 1, 1, 1)),
]


@pytest.mark.parametrize("t,dtype", [(1, F32), (5, BF16), (17, F32)])
def test_blend_tile_and_normalize(t, dtype, device, poison_empty):
    gen = seeded(t, dtype)
    n, c, h, w = 1, 3, 13, 17
    canvas = torch.zeros((n, c, t, h, w), device=device)
    wsum = torch.zeros((h, w), device=device)
    canvas_ref, wsum_ref = canvas.clone(), wsum.clone()
    for top, left, th, tw, ramps in TILES:
        tile = torch.randn((n, c, t, th, tw), generator=gen).to(dtype).to(device)
        blend_tr.blend_tile_(canvas, wsum, tile, top, left, *ramps)
        blend_tile_ref_(canvas_ref, wsum_ref, tile, top, left, *ramps)
    assert_close(canvas, canvas_ref, F32, "canvas")
    assert_close(wsum, wsum_ref, F32, "weight_sum")
    out = blend_tr.normalize_canvas(canvas, wsum)
    assert out.dtype == F32
    assert_close(out, normalize_canvas_ref(canvas_ref, wsum_ref), F32, "normalized canvas")
    got8 = blend_tr.normalize_canvas(canvas, wsum, to_uint8=True)
    want8 = normalize_canvas_ref(canvas, wsum, to_uint8=True)
    assert_uint8_close(got8, want8, "normalized canvas -> uint8")


def test_blend_tile_rejects_tile_outside_canvas(device):
    canvas = torch.zeros((1, 3, 1, 8, 8), device=device)
    wsum = torch.zeros((8, 8), device=device)
    tile = torch.zeros((1, 3, 1, 4, 4), device=device)
    for top, left in ((5, 0), (0, 5), (-1, 0)):
        with pytest.raises(ValueError, match="outside"):
            blend_tr.blend_tile_(canvas, wsum, tile, top, left, 1, 1, 1, 1)
        with pytest.raises(ValueError, match="outside"):
            blend_tile_ref_(canvas, wsum, tile, top, left, 1, 1, 1, 1)


PAD_CASES = [
    # T, pad_t, pad_h, pad_w, head ("replicate" | "zeros" | "cache"), dtype
    (5, 2, 1, 1, "replicate", F32),
    (1, 2, 0, 0, "replicate", F32),
    (17, 1, 2, 1, "zeros", F32),
    (5, 2, 1, 1, "cache", F32),
    (5, 0, 1, 0, "replicate", BF16),
    (1, 2, 1, 1, "cache", BF16),
    (17, 2, 1, 1, "replicate", BF16),
]


@pytest.mark.parametrize("t,pad_t,pad_h,pad_w,head,dtype", PAD_CASES)
def test_causal_pad3d(t, pad_t, pad_h, pad_w, head, dtype, device, poison_empty):
    gen = seeded(t, pad_t, pad_h, pad_w, head)
    shape = (2, 3, t, 7, 9)
    x, xf = make(shape, dtype, device, gen)
    cache, cache_f = make((2, 3, pad_t, 7, 9), dtype, device, gen) if head == "cache" else (None, None)
    mode = "zeros" if head == "zeros" else "replicate"
    y = pad_tr.causal_pad3d(x, pad_t, pad_h, pad_w, cache, mode)
    ref = causal_pad3d_ref(xf, pad_t, pad_h, pad_w, cache_f, mode)
    assert y.dtype == dtype and y.is_contiguous()
    assert torch.equal(y.float().cpu(), ref.detach().cpu())
    dy = torch.randn(ref.shape, generator=gen).to(dtype).to(device)
    got = grads(y, (x, cache), dy)
    want = grads(ref, (xf, cache_f), dy.float())
    for name, g, r in zip(("dx", "dcache"), got, want, strict=False):
        assert g.dtype == dtype
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize("op", ["group_frame", "group_clip", "rms"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_norms_write_into_the_frames_of_a_padded_buffer(op, dtype, device, poison_empty):
    """``out=``: both implementations write the normalised tensor into frames 2.. of a time-padded
    buffer (what a causal conv convolves) with the values of the plain call, and touch nothing else."""
    shape = (2, 12, 5, 7, 9)
    gen = seeded(shape, op, dtype, "into")
    x, xf = make(shape, dtype, device, gen, scale=2.0, shift=1.0, grad=False)
    w, wf = make((12,), F32, device, gen, shift=1.0, grad=False)
    b, bf = make((12,), F32, device, gen, grad=False)
    if op == "rms":
        want = rms_norm_silu_ref(xf, wf, bf, 1e-12, True)
        impls = {"triton": lambda o: rms_tr.rms_norm_silu(x, w, b, 1e-12, True, out=o),
                 "reference": lambda o: rms_norm_silu_ref(x, w, b, 1e-12, True, out=o)}
    else:
        per_frame = op == "group_frame"
        want = group_norm_silu_ref(xf, wf, bf, 4, 1e-6, per_frame, True)
        impls = {"triton": lambda o: gn_tr.group_norm_silu(x, w, b, 4, 1e-6, per_frame, True, out=o),
                 "reference": lambda o: group_norm_silu_ref(x, w, b, 4, 1e-6, per_frame, True, out=o)}
    for name, fn in impls.items():
        padded = torch.full((2, 12, 7, 7, 9), 7.0, device=device, dtype=dtype)
        with torch.no_grad():
            got = fn(padded[:, :, 2:])
        assert got.data_ptr() == padded[:, :, 2:].data_ptr()
        assert_close(padded[:, :, 2:], want, dtype, f"{name} {op} into the buffer")
        assert torch.all(padded[:, :, :2] == 7.0), f"{name} wrote outside its frames"


def test_norm_out_rejects_gradients_and_bad_views(device):
    x = torch.randn(1, 8, 3, 5, 5, device=device, requires_grad=True)
    w = torch.ones(8, device=device)
    out = torch.empty(1, 8, 3, 5, 5, device=device)
    for fn in (lambda o: gn_tr.group_norm_silu(x, w, None, 4, out=o),
               lambda o: group_norm_silu_ref(x, w, None, 4, out=o),
               lambda o: rms_tr.rms_norm_silu(x, w, None, out=o),
               lambda o: rms_norm_silu_ref(x, w, None, out=o)):
        with pytest.raises(ValueError, match="gradients"):
            fn(out)
        with torch.no_grad(), pytest.raises(ValueError, match="out"):
            fn(torch.empty(1, 8, 3, 5, 6, device=device))
        with torch.no_grad(), pytest.raises(ValueError, match="contiguous frames"):
            fn(torch.empty(1, 8, 3, 5, 10, device=device)[..., ::2])
