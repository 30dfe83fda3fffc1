"""Building blocks: causality, streaming caches, padding modes, norms, resamplers, attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from videovae import layers
from videovae.layers import (
    WINDOW_FRAMES,
    CausalCache,
    CausalConv3d,
    Conv2dPerFrame,
    LayerOptions,
    Norm,
    PixelShuffleUpsample,
    ResBlock,
    SpatialAttention,
    SpatialDownsample,
    SpatialUpsample,
    SpatioTemporalDownsample,
    SpatioTemporalUpsample,
    assign_cache_keys,
    norm_silu_conv,
)


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _chunked(module, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    assign_cache_keys(module)
    cache = CausalCache()
    outs, start = [], 0
    for size in sizes:
        y, cache = module(x[:, :, start : start + size], cache)
        outs.append(y)
        start += size
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("time_pad", ["replicate", "zeros"])
def test_causal_conv_is_causal_and_pads_as_documented(time_pad):
    conv = _randomise(CausalConv3d(3, 4, 3, time_pad=time_pad))
    x = torch.randn(1, 3, 6, 8, 8)
    y, _ = conv(x)
    x2 = x.clone()
    x2[:, :, 4:] = torch.randn_like(x2[:, :, 4:])
    y2, _ = conv(x2)
    assert y.shape == (1, 4, 6, 8, 8)
    torch.testing.assert_close(y[:, :, :4], y2[:, :, :4])
    assert not torch.allclose(y[:, :, 4:], y2[:, :, 4:])
    front = x[:, :, :1].expand(-1, -1, 2, -1, -1) if time_pad == "replicate" else torch.zeros(1, 3, 2, 8, 8)
    expected = F.conv3d(torch.cat([front, x], 2), conv.conv.weight, conv.conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("stride,spatial_pad", [(1, None), (2, (0, 1, 0, 1))])
@pytest.mark.parametrize("sizes", [[1, 4, 4], [1, 2, 2, 2, 2], [5, 4], [9]])
def test_causal_conv_streaming_equals_whole_clip(stride, spatial_pad, sizes):
    conv = _randomise(CausalConv3d(2, 3, 3, stride, spatial_pad=spatial_pad))
    x = torch.randn(1, 2, sum(sizes), 10, 10)
    whole, _ = conv(x)
    assert whole.shape[2] == (x.shape[2] - 1) // stride + 1
    torch.testing.assert_close(_chunked(conv, x, sizes), whole, atol=1e-6, rtol=0)


def test_causal_conv_chunk_too_short_is_an_error():
    conv = CausalConv3d(2, 2, 3, 2, spatial_pad=(0, 1, 0, 1))
    assign_cache_keys(conv)
    cache = CausalCache()
    conv(torch.randn(1, 2, 1, 4, 4), cache)
    with pytest.raises(ValueError, match="too short"):
        conv(torch.randn(1, 2, 1, 4, 4), cache)


def test_conv2d_per_frame_matches_frame_loop():
    conv = _randomise(Conv2dPerFrame(3, 5, 3, padding=1))
    x = torch.randn(2, 3, 4, 7, 9)
    y = conv(x)
    for t in range(4):
        torch.testing.assert_close(y[:, :, t], F.conv2d(x[:, :, t], conv.weight, conv.bias, padding=1))


def test_norm_kinds():
    x = torch.randn(2, 8, 5, 6, 7)
    frame = _randomise(Norm("group_frame", 8, groups=4))
    clip = Norm("group_clip", 8, groups=4)
    clip.load_state_dict(frame.state_dict())
    rms = _randomise(Norm("rms", 8))
    y = frame(x, silu=True)
    expected = torch.stack([F.group_norm(x[:, :, t], 4, frame.weight, frame.bias, 1e-6) for t in range(5)], 2)
    torch.testing.assert_close(y, F.silu(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip(x), F.group_norm(x, 4, clip.weight, clip.bias, 1e-6), atol=1e-5, rtol=1e-5)
    shape = (1, 8, 1, 1, 1)
    expected = x / x.norm(dim=1, keepdim=True) * 8**0.5 * rms.weight.view(shape) + rms.bias.view(shape)
    torch.testing.assert_close(rms(x), expected, atol=1e-5, rtol=1e-5)
    # per-frame statistics make the first frames independent of later ones; clip statistics do not
    torch.testing.assert_close(frame(x[:, :, :2]), frame(x)[:, :, :2])
    assert not torch.allclose(clip(x[:, :, :2]), clip(x)[:, :, :2], atol=1e-3)


def test_norm_rejects_bad_groups():
    with pytest.raises(ValueError, match="not divisible"):
        Norm("group_frame", 10, groups=4)


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_resblock_streaming(kind):
    block = _randomise(ResBlock(4, 8, kind, LayerOptions(norm="group_frame", groups=4)))
    x = torch.randn(1, 4, 7, 8, 8)
    whole, _ = block(x)
    assert whole.shape == (1, 8, 7, 8, 8)
    torch.testing.assert_close(_chunked(block, x, [1, 2, 4]), whole, atol=1e-5, rtol=0)


def test_downsamplers_shapes_and_streaming():
    x = torch.randn(1, 4, 9, 16, 12)
    spatial = _randomise(SpatialDownsample(4))
    assert spatial(x)[0].shape == (1, 4, 9, 8, 6)
    st = _randomise(SpatioTemporalDownsample(4, "replicate"))
    whole, _ = st(x)
    assert whole.shape == (1, 4, 5, 8, 6)
    torch.testing.assert_close(_chunked(st, x, [1, 4, 4]), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(_chunked(st, x, [1, 2, 2, 2, 2]), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["nearest", "trilinear"])
def test_spatiotemporal_upsample(mode):
    up = _randomise(SpatioTemporalUpsample(4, "replicate", mode))
    x = torch.randn(1, 4, 3, 5, 6)
    whole, _ = up(x)
    assert whole.shape == (1, 4, 5, 10, 12)
    chunked = _chunked(up, x, [1, 1, 1])
    if mode == "nearest":
        torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    else:  # the trilinear time interpolation looks one latent ahead: chunk edges differ
        assert not torch.allclose(chunked, whole, atol=1e-4)


def test_pixel_shuffle_upsample_moves_channels_into_space_and_time():
    up = _randomise(PixelShuffleUpsample(3, (2, 2, 2), "zeros"))
    x = torch.randn(1, 3, 4, 5, 6)
    whole, _ = up(x)
    assert whole.shape == (1, 3, 7, 10, 12)
    conv_out, _ = up.conv(x)
    # channel (c, st, sh, sw) lands at time 2t+st-1 (first frame dropped), row 2h+sh, column 2w+sw
    c, st, sh, sw = 1, 1, 0, 1
    channel = ((c * 2 + st) * 2 + sh) * 2 + sw
    torch.testing.assert_close(whole[:, c, 2 * 2 + st - 1, 2 * 3 + sh, 2 * 4 + sw], conv_out[:, channel, 2, 3, 4])
    torch.testing.assert_close(_chunked(up, x, [1, 2, 1]), whole, atol=1e-6, rtol=0)


def test_spatial_attention_matches_explicit_softmax():
    attn = _randomise(SpatialAttention(8, LayerOptions(norm="group_frame", groups=4)))
    x = torch.randn(1, 8, 2, 3, 4)
    y, _ = attn(x)
    h = attn.norm(x)
    q, k, v = (m(h)[0].flatten(3).permute(0, 2, 3, 1) for m in (attn.q, attn.k, attn.v))  # (n, t, hw, c)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    out = (weights @ v).permute(0, 3, 1, 2).reshape(1, 8, 2, 3, 4)
    torch.testing.assert_close(y, x + attn.proj_out(out)[0], atol=1e-5, rtol=1e-5)
    # per frame: frame 0 does not see frame 1
    torch.testing.assert_close(attn(x[:, :, :1])[0], y[:, :, :1], atol=1e-6, rtol=0)


def test_cpu_attention_in_query_blocks_equals_whole(monkeypatch):
    """Long sequences on the CPU are attended in query blocks (bounded score memory), same result."""
    import videovae.layers as layers

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 700, 16, generator=gen) for _ in range(3))
    whole = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    monkeypatch.setattr(layers, "CPU_ATTENTION_SCORE_BYTES", 2 * 700 * 4 * 64)  # 64 query rows per block
    torch.testing.assert_close(layers.single_head_attention(q, k, v), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "norm_kind,time_pad", [("group_frame", "replicate"), ("group_clip", "zeros"), ("rms", "zeros")]
)
def test_forward_normed_writes_the_norm_into_the_conv_input(norm_kind, time_pad):
    """Inference: conv(silu(norm(x))) with the normalised tensor written straight into the conv's
    time-padded input (same storage, no separate copy) and the conv's old tail released before the
    conv runs; whole clip and chunks give the plain composition's values."""
    norm = _randomise(Norm(norm_kind, 8, groups=4))
    conv = _randomise(CausalConv3d(8, 6, 3, time_pad=time_pad), seed=1)
    conv.cache_key = "conv"
    x = torch.randn(1, 8, 7, 6, 5) * 2 + 1
    seen = {}

    def record_out(module, args, kwargs):
        seen["out"] = kwargs.get("out")

    def record_input(module, args):
        seen["input"] = args[0]
        seen["tail_at_conv_time"] = seen["cache"].get("conv") if seen.get("cache") is not None else None

    norm.register_forward_pre_hook(record_out, with_kwargs=True)
    conv.conv.register_forward_pre_hook(record_input)

    def plain(chunk, cache):
        return conv(norm(chunk, silu=True), cache)

    for sizes in ([7], [1, 2, 4]):
        want_cache, got_cache = CausalCache(), CausalCache()
        start = 0
        for size in sizes:
            chunk = x[:, :, start : start + size]
            start += size
            with torch.no_grad():
                want, want_cache = plain(chunk, want_cache)
                seen["cache"] = got_cache
                got, got_cache = conv.forward_normed(norm, chunk, got_cache)
            assert seen["out"].untyped_storage().data_ptr() == seen["input"].untyped_storage().data_ptr()
            assert seen["tail_at_conv_time"] is None
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(got_cache.get("conv"), want_cache.get("conv"), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "norm_kind,time_pad", [("group_frame", "replicate"), ("group_clip", "zeros"), ("rms", "zeros")]
)
def test_long_inputs_go_through_a_window_with_the_plain_values(norm_kind, time_pad, monkeypatch):
    """Inference on inputs longer than WINDOW_FRAMES: the conv sees at most pad_t + WINDOW_FRAMES
    input frames per call (the padded clip never exists), per-clip GroupNorm statistics are still
    the whole input's, the carried tail is the plain path's, and ``overwrite`` puts a same-shaped
    result into the input's own storage."""
    norm = _randomise(Norm(norm_kind, 8, groups=4))
    conv = _randomise(CausalConv3d(8, 8, 3, time_pad=time_pad), seed=1)
    conv.cache_key = "conv"
    x = torch.randn(1, 8, 2 * WINDOW_FRAMES + 3, 6, 5) * 2 + 1
    calls = []
    conv.conv.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[2]))
    with torch.no_grad():  # on the CPU, frames this small keep one call (oneDNN needs larger inputs)
        conv.forward_normed(norm, x)
    assert calls == [x.shape[2] + 2]
    monkeypatch.setattr(layers, "CPU_WINDOW_MIN_NCTH", 0)
    for sizes in ([x.shape[2]], [WINDOW_FRAMES + 1, x.shape[2] - WINDOW_FRAMES - 1]):
        want_cache, got_cache = CausalCache(), CausalCache()
        start = 0
        for size in sizes:
            chunk = x[:, :, start : start + size]
            start += size
            with torch.enable_grad():  # the plain composition
                want, want_cache = conv(norm(chunk, silu=True), want_cache)
            calls.clear()
            with torch.no_grad():
                own = chunk.clone()
                got, got_cache = conv.forward_normed(norm, own, got_cache, overwrite=True)
            assert max(calls) <= 2 + WINDOW_FRAMES and sum(c - 2 for c in calls) == size
            assert got.untyped_storage().data_ptr() == own.untyped_storage().data_ptr()
            torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=0)
            torch.testing.assert_close(got_cache.get("conv"), want_cache.get("conv").detach(), atol=1e-5, rtol=0)
    with torch.no_grad():  # without overwrite the input is left alone
        kept = x.clone()
        conv.forward_normed(norm, kept)
    assert torch.equal(kept, x)


@pytest.mark.parametrize("norm_kind", ["group_frame", "group_clip", "rms"])
@pytest.mark.parametrize("batch", [1, 2])
def test_per_frame_conv_normalises_a_window_at_a_time(norm_kind, batch):
    """Inference on inputs longer than WINDOW_FRAMES: a per-frame conv after a norm sees at most
    WINDOW_FRAMES frames per call (the normalised clip never exists), per-clip GroupNorm statistics
    are still the whole input's, the result is frame-major, and ``overwrite`` puts a same-shaped
    result into the input's own storage; with gradients it is the plain composition."""
    norm = _randomise(Norm(norm_kind, 8, groups=4))
    x = torch.randn(batch, 8, 2 * WINDOW_FRAMES + 3, 6, 5) * 2 + 1
    calls = []
    for cout in (8, 6):
        conv = _randomise(Conv2dPerFrame(8, cout, 3, padding=1), seed=1)
        conv_forward = conv._conv_forward  # sees the frame batch of every call

        def counted(frames, weight, bias, conv_forward=conv_forward):
            calls.append(frames.shape[0])
            return conv_forward(frames, weight, bias)

        conv._conv_forward = counted
        calls.clear()
        with torch.enable_grad():
            want = conv(norm(x, silu=True)).detach()
        assert calls == [batch * x.shape[2]]
        for overwrite in (False, True):
            calls.clear()
            own = x.clone()
            with torch.no_grad():
                got = norm_silu_conv(norm, conv, own, None, overwrite=overwrite)
            assert calls == [batch * WINDOW_FRAMES] * 2 + [batch * 3]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            into_input = got.untyped_storage().data_ptr() == own.untyped_storage().data_ptr()
            assert into_input == (overwrite and cout == 8)
            if not into_input:
                assert torch.equal(own, x)
                assert got.transpose(1, 2).is_contiguous()
        with torch.no_grad():  # one window's worth or less: a single call
            calls.clear()
            norm_silu_conv(norm, conv, x[:, :, :WINDOW_FRAMES], None)
            assert calls == [batch * WINDOW_FRAMES]


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_resblock_in_windows_matches_the_gradient_path(kind, monkeypatch):
    """A residual block with a 1x1 shortcut on a long input: windows, conv2 written over its own
    input and the shortcut added window by window give the plain (gradient-path) values."""
    monkeypatch.setattr(layers, "CPU_WINDOW_MIN_NCTH", 0)
    block = _randomise(ResBlock(8, 4, kind, LayerOptions(norm="group_clip", groups=4)))
    assign_cache_keys(block)
    x = torch.randn(1, 8, 2 * WINDOW_FRAMES + 1, 6, 5)
    with torch.enable_grad():
        want = block(x)[0].detach()
    with torch.no_grad():
        got = block(x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_forward_normed_with_gradients_is_the_plain_composition():
    norm = _randomise(Norm("group_frame", 8, groups=4))
    conv = _randomise(CausalConv3d(8, 6, 3), seed=1)
    x = torch.randn(1, 8, 5, 6, 5, requires_grad=True)
    got, _ = conv.forward_normed(norm, x)
    want, _ = conv(norm(x, silu=True))
    torch.testing.assert_close(got, want)
    (gx,) = torch.autograd.grad(got.square().sum(), x)
    (wx,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(gx, wx)


@pytest.mark.parametrize("spatial_pad", [None, (0, 1, 0, 1)])
def test_causal_conv_pads_space_itself_only_when_symmetric(spatial_pad):
    conv = CausalConv3d(2, 3, 3, 1 if spatial_pad is None else 2, spatial_pad=spatial_pad)
    assert conv.conv_pads_space == (spatial_pad is None)
    assert conv.conv.padding == ((0, 1, 1) if spatial_pad is None else (0, 0, 0))


@pytest.mark.parametrize("module_kind", ["spatial", "nearest"])
def test_upsamplers_write_into_the_conv_input_with_the_same_values(module_kind, monkeypatch):
    """Inference: nearest upsampling lands straight in the conv's padded input; whole clip and
    chunks match the plain interpolate-then-conv path run with gradients on."""
    if module_kind == "spatial":
        up = _randomise(SpatialUpsample(4, "replicate"))
    else:
        up = _randomise(SpatioTemporalUpsample(4, "replicate", "nearest"))
    assign_cache_keys(up)
    x = torch.randn(1, 4, 5, 6, 5)
    interpolations = []
    real_interpolate = F.interpolate

    def counting_interpolate(*args, **kwargs):
        interpolations.append(torch.is_grad_enabled())
        return real_interpolate(*args, **kwargs)

    monkeypatch.setattr(F, "interpolate", counting_interpolate)
    for sizes in ([5], [1, 2, 2]):
        with torch.enable_grad():  # the plain path (what autograd needs)
            want = _chunked(up, x, sizes).detach()
        with torch.no_grad():
            got = _chunked(up, x, sizes)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert interpolations and all(interpolations)  # only the gradient path made an upsampled copy
