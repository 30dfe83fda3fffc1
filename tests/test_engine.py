"""The streaming / tiled engine: exactness, tiling, padding and cropping, bounded memory, budgets."""

from __future__ import annotations

import pytest
import torch

from videovae.engine import (
    DEFAULT_CHUNK_FRAMES,
    MEMORY_FACTORS,
    EngineOptions,
    MemoryBudgetError,
    VideoGeometry,
    decode_chunks,
    decode_frames,
    decode_tensor,
    default_chunk_frames,
    encode_frames,
    encode_tensor,
    estimate_peak_bytes,
    parse_size,
    plan_for_budget,
    stream_tile_order,
    tile_spans,
)
from videovae.io import to_model_range
from videovae.layers import CausalCache
from videovae.metrics import psnr
from videovae.models import from_preset
from videovae.synthetic import synthetic_frames, synthetic_video


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = from_preset(name).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move norms and biases off their identity init
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def tiny():
    return _model("tiny")


@pytest.fixture(scope="module")
def tiny_rms():
    return _model("tiny-rms")


@pytest.mark.parametrize("frames", [1, 5, 17, 33, 65])
def test_chunked_encode_and_decode_equal_whole_clip(tiny, frames):
    x = to_model_range(synthetic_video(frames, 16, 24, seed=frames))
    with torch.no_grad():
        whole = tiny.encode(x).mean
        decoded = tiny.decode(whole)
    for chunk in (4, 8, 16, 32, 64):
        if chunk > frames + 3:
            break
        torch.testing.assert_close(encode_tensor(tiny, x, chunk_frames=chunk).mean, whole, atol=1e-5, rtol=0)
        torch.testing.assert_close(decode_tensor(tiny, whole, chunk_frames=chunk), decoded, atol=1e-5, rtol=0)


def test_halo_tiling_is_exact_without_per_tile_statistics(tiny_rms):
    x = to_model_range(synthetic_video(5, 64, 88, seed=2))
    with torch.no_grad():
        whole = tiny_rms.encode(x).mean
        decoded = tiny_rms.decode(whole)
    for tile in (32,):
        tiled_latent = encode_tensor(tiny_rms, x, chunk_frames=4, tile=tile).mean
        torch.testing.assert_close(tiled_latent, whole, atol=1e-5, rtol=0)
        tiled = decode_tensor(tiny_rms, whole, chunk_frames=4, tile=tile)
        torch.testing.assert_close(tiled, decoded, atol=1e-5, rtol=0)


def test_too_small_halo_is_not_exact(tiny_rms):
    """The exactness above comes from the halo: with none, tiles see zero padding at their edges."""
    x = to_model_range(synthetic_video(1, 64, 64, seed=2))
    with torch.no_grad():
        z = tiny_rms.encode(x).mean
        decoded = tiny_rms.decode(z)
    tiled = decode_tensor(tiny_rms, z, chunk_frames=0, tile=32, halo=1, ramp=1)
    assert (tiled - decoded).abs().max() > 1e-3


def test_group_norm_tiling_blends_without_seams(tiny):
    """GroupNorm models see per-tile statistics, so tiled decoding is approximate; the blend band
    must leave no seam: the error at tile boundaries is no worse than inside the tiles."""
    x = to_model_range(synthetic_video(5, 128, 128, seed=4))
    with torch.no_grad():
        z = tiny.encode(x).mean
        decoded = tiny.decode(z)
    tiled = decode_tensor(tiny, z, chunk_frames=4, tile=64)
    err = (tiled - decoded).abs().mean(dim=(0, 1, 2))  # (H, W)
    band = err[:, 56:72].mean()
    assert band < 2 * err.mean()


def test_exact_tile_norm_gives_the_untiled_result_for_group_norm_models(tiny):
    """With whole-frame statistics exchanged between tiles, GroupNorm + attention tiles exactly."""
    x = to_model_range(synthetic_video(5, 48, 64, seed=6))
    with torch.no_grad():
        whole = tiny.encode(x).mean
        decoded = tiny.decode(whole)
    tiled_latent = encode_tensor(tiny, x, chunk_frames=4, tile=32, tile_norm="exact").mean
    torch.testing.assert_close(tiled_latent, whole, atol=1e-5, rtol=0)
    tiled = decode_tensor(tiny, whole, chunk_frames=4, tile=32, tile_norm="exact")
    torch.testing.assert_close(tiled, decoded, atol=1e-5, rtol=0)
    assert psnr(decoded.clamp(-1, 1), tiled.clamp(-1, 1)).min() > 40
    with pytest.raises(ValueError, match="tile_norm"):
        decode_tensor(tiny, whole, tile=32, tile_norm="global")


def _max_caches_alive(model, monkeypatch, run) -> int:
    """Run ``run()`` and return how many tile caches were alive at once when the decoder body or
    the encoder body started a tile step."""
    import weakref

    seen: list = []
    most = 0

    def tracked(fn):
        def step(x, cache):
            nonlocal most
            if not any(ref() is cache for ref in seen):
                seen.append(weakref.ref(cache))
            most = max(most, sum(ref() is not None for ref in seen))
            return fn(x, cache)
        return step

    monkeypatch.setattr(model, "decode_body", tracked(model.decode_body))
    monkeypatch.setattr(model, "encode_body", tracked(model.encode_body))
    run()
    monkeypatch.undo()
    return most


@pytest.mark.parametrize("name", ["tiny", "tiny-rms"])
def test_tile_major_order_gives_the_chunk_major_result_with_one_tile_cache_alive(name, monkeypatch):
    """tile_order='tile' runs each tile through the whole clip before the next: the same numbers as
    the chunk-major stream (GroupNorm's approximate per-tile statistics included), with only one
    tile's causal caches alive instead of all of them, so tiling never adds cache memory."""
    model = _model(name)
    x = to_model_range(synthetic_video(9, 48, 64, seed=8))
    z = torch.randn(1, model.latent_channels, 3, 6, 8, generator=torch.Generator().manual_seed(2))
    opts = dict(chunk_frames=4, tile=32)
    latents, videos = {}, {}
    for order, tiles_alive in (("chunk", 4), ("tile", 1)):  # 2 x 2 tiles of 32 px at 48 x 64
        def run(o=order):
            latents[o] = encode_tensor(model, x, tile_order=o, **opts).mean
            videos[o] = decode_tensor(model, z, tile_order=o, **opts)
        assert _max_caches_alive(model, monkeypatch, run) == tiles_alive, order
    assert torch.equal(latents["tile"], latents["chunk"])
    assert torch.equal(videos["tile"], videos["chunk"])
    assert videos["tile"].shape == (1, 3, 9, 48, 64)
    # auto: tile-major where the whole clip is held anyway (the *_tensor entry points) ...
    assert _max_caches_alive(model, monkeypatch, lambda: decode_tensor(model, z, **opts)) == 1
    # ... chunk-major in the streams, and wherever tile norms are exchanged between the tiles of a chunk
    assert _max_caches_alive(model, monkeypatch, lambda: list(decode_chunks(model, z, EngineOptions(**opts)))) == 4
    exact = dict(opts, tile_norm="exact")
    alive = _max_caches_alive(model, monkeypatch, lambda: decode_tensor(model, z, **exact))
    assert alive == 1 if model.config.halo_tiling_exact else alive >= 4  # + the statistics passes' forks
    if not model.config.halo_tiling_exact:
        with pytest.raises(ValueError, match="tile_order='chunk'"):
            decode_tensor(model, z, tile_order="tile", **exact)
    with pytest.raises(ValueError, match="tile_order must be one of"):
        decode_tensor(model, z, tile_order="row", **opts)


def test_spans_cover_and_blend_weights_sum_to_one():
    spans = tile_spans(37, 10, 5, 2)
    assert spans[0].keep0 == 0 and spans[-1].keep1 == 37
    for a, b in zip(spans, spans[1:], strict=False):
        assert a.keep1 - b.keep0 == 4 and a.ramp_after == b.ramp_before == 4
        assert b.ext0 <= b.keep0 and a.ext1 >= a.keep1
    canvas = torch.zeros(1, 1, 1, 37, 1)
    weights = torch.zeros(37, 1)
    from videovae.kernels import blend_tile_, normalize_canvas

    for s in spans:
        tile = torch.ones(1, 1, 1, s.keep1 - s.keep0, 1)
        blend_tile_(canvas, weights, tile, s.keep0, 0, s.ramp_before, s.ramp_after, 0, 0)
    torch.testing.assert_close(canvas[0, 0, 0], weights)
    torch.testing.assert_close(normalize_canvas(canvas, weights), torch.ones_like(canvas))


@pytest.mark.parametrize("frames,height,width", [(7, 30, 46), (1, 17, 9), (18, 24, 32)])
def test_odd_sizes_are_padded_and_cropped_back(tiny, frames, height, width):
    video = synthetic_video(frames, height, width, seed=1)
    result = encode_frames(tiny, iter(video.split(4)), EngineOptions(chunk_frames=8))
    g = result.geometry
    assert (g.frames, g.height, g.width) == (frames, height, width)
    assert (g.padded_frames - 1) % 4 == 0 and g.padded_height % 8 == 0 and g.padded_width % 8 == 0
    assert result.mean.shape[2] == 1 + (g.padded_frames - 1) // 4
    decoded = torch.cat(list(decode_frames(tiny, result.mean, g, EngineOptions(chunk_frames=8))))
    assert decoded.shape == (frames, height, width, 3) and decoded.dtype == torch.uint8
    # the streamed encode equals the whole-clip encode of the replicate-padded clip
    padded = torch.nn.functional.pad(to_model_range(video)[0], (0, -width % 8, 0, -height % 8), mode="replicate")
    padded = torch.cat([padded, padded[:, -1:].expand(-1, g.padded_frames - frames, -1, -1)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(result.mean, tiny.encode(padded[None]).mean, atol=2e-5, rtol=0)


def test_encode_streams_frames_and_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="no frames"):
        encode_frames(tiny, iter([]))
    with pytest.raises(ValueError, match="uint8"):
        encode_frames(tiny, iter([torch.zeros(2, 16, 16, 3)]))
    with pytest.raises(ValueError, match="size changed"):
        encode_frames(tiny, iter([torch.zeros(2, 16, 16, 3, dtype=torch.uint8),
                                  torch.zeros(2, 16, 24, 3, dtype=torch.uint8)]))
    with pytest.raises(ValueError, match="multiple of 4"):
        encode_frames(tiny, synthetic_frames(5, 16, 16), EngineOptions(chunk_frames=6))


def test_decode_is_lazy_and_its_state_does_not_grow(tiny):
    """Memory does not grow with clip length: each chunk is produced before later latents are read
    (later latents are NaN here), and the carried caches have a fixed size."""
    z = torch.randn(1, 4, 12, 4, 4)
    z[:, :, 3:] = float("nan")
    first = next(decode_chunks(tiny, z, EngineOptions(chunk_frames=8)))
    assert first.shape[2] == 9 and torch.isfinite(first).all()
    sizes = []
    cache = CausalCache()
    with torch.no_grad():
        for t in range(6):
            _, cache = tiny.decode_chunk(torch.randn(1, 4, 1 if t == 0 else 2, 4, 4), cache)
            sizes.append(cache.nbytes())
    assert sizes[1:] == [sizes[1]] * 5


def test_default_chunk_is_one_latent_frame_on_cuda(tiny):
    assert default_chunk_frames(tiny, "cpu") == DEFAULT_CHUNK_FRAMES
    assert default_chunk_frames(tiny, "cuda") == default_chunk_frames(tiny, "cuda:1") == tiny.time_factor


@pytest.mark.parametrize("tile", [0, 32])
def test_a_chunk_starts_with_nothing_of_the_previous_chunk_held(tiny, monkeypatch, tile):
    """Only the causal caches carry over: when the next chunk's decode starts, the previous chunk's
    features and tiles are already freed (what the next chunk needs from them is in the caches)."""
    import weakref

    stem_out: list = []
    body_out: list = []

    def tracked(fn, outputs, earlier):
        def run(x, cache):
            assert all(ref() is None for ref in earlier()), "a tensor of the previous chunk or tile is alive"
            out, cache = fn(x, cache)
            outputs.append(weakref.ref(out))
            return out, cache
        return run

    # a chunk's stem starts with nothing held; each tile of the body without the previous tile's output
    monkeypatch.setattr(tiny, "decode_stem", tracked(tiny.decode_stem, stem_out, lambda: stem_out + body_out))
    monkeypatch.setattr(tiny, "decode_body", tracked(tiny.decode_body, body_out, lambda: body_out))
    z = torch.randn(1, 4, 4, 6, 6)
    for chunk in decode_chunks(tiny, z, EngineOptions(chunk_frames=4, tile=tile)):
        assert not chunk.requires_grad and torch.is_grad_enabled()  # no_grad does not leak to the caller
        del chunk
    assert len(stem_out) == 3 and len(body_out) == (3 if tile == 0 else 12)


def test_compiled_decode_step_matches_eager(tiny_rms):
    """torch.compile of the per-chunk decode step (the fixed-shape streaming loop: first chunk, then
    one-latent chunks) gives the eager result; eager stays the definition of correct."""
    from torch._dynamo.utils import counters

    z = torch.randn(1, tiny_rms.latent_channels, 5, 6, 6, generator=torch.Generator().manual_seed(3))
    graphs = counters["stats"]["unique_graphs"]
    eager = decode_tensor(tiny_rms, z, chunk_frames=4)
    chunks, graphs_after = [], []
    for chunk in decode_chunks(tiny_rms, z, EngineOptions(chunk_frames=4, compile="default")):
        chunks.append(chunk)
        graphs_after.append(counters["stats"]["unique_graphs"])
    assert graphs_after[0] > graphs  # it really ran compiled code
    # latents 2, 1, 1, 1: the steady state compiles once, later chunks reuse it without recompiling
    assert len(chunks) == 4 and graphs_after[1] == graphs_after[2] == graphs_after[3]
    torch.testing.assert_close(torch.cat(chunks, dim=2), eager, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="compile must be one of"):
        decode_tensor(tiny_rms, z, compile="fast")


def test_engine_option_errors(tiny):
    z = torch.randn(1, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="multiple of 8 pixels"):
        decode_tensor(tiny, z, tile=30)
    with pytest.raises(ValueError, match="chunk_frames"):
        decode_tensor(tiny, z, chunk_frames=3)
    with pytest.raises(ValueError, match="latents"):
        decode_tensor(tiny, torch.randn(1, 3, 2, 4, 4))


def test_memory_budget_planning(tiny):
    assert parse_size("1.5G") == int(1.5 * 2**30) and parse_size("800M") == 800 * 2**20
    with pytest.raises(ValueError, match="memory size"):
        parse_size("lots")
    big = plan_for_budget(tiny, 1080, 1920, 16 * 2**30, torch.float32)
    small = plan_for_budget(tiny, 1080, 1920, 6 * 2**30, torch.float32)
    assert big[1] == 0 or big[1] > small[1]
    assert small[1] > 0  # 1080p does not fit 6 GiB untiled
    with pytest.raises(MemoryBudgetError, match=r"does not fit a memory budget.*--max-memory \d"):
        plan_for_budget(tiny, 1080, 1920, 2**20, torch.float32)


def test_memory_budget_plans_cost_the_tile_order_that_will_run(tiny):
    """A short clip streamed tile by tile holds one tile's caches, not every tile's: a budget that
    chunk order cannot meet is met in tile order, and the plan's estimate in the order the CLI
    then picks (stream_tile_order) is within the budget."""
    budget, h, w = 2**30, 720, 1280
    with pytest.raises(MemoryBudgetError):
        plan_for_budget(tiny, h, w, budget, torch.float32)
    with pytest.raises(MemoryBudgetError):
        plan_for_budget(tiny, h, w, budget, torch.float32, frames=17, tile_order="chunk")
    with pytest.raises(MemoryBudgetError):
        plan_for_budget(tiny, h, w, budget, torch.float32, frames=None, tile_order="auto")  # length unknown
    chunk, tile = plan_for_budget(tiny, h, w, budget, torch.float32, frames=17, tile_order="auto")
    assert tile > 0
    order = stream_tile_order(tiny, 17, tile, tile, torch.float32, h, w)
    assert order == "tile"
    assert estimate_peak_bytes(tiny, chunk, tile, tile, torch.float32, h, w, tile_order=order, frames=17) <= budget
    assert plan_for_budget(tiny, h, w, budget, torch.float32, frames=17, tile_order="tile") == (chunk, tile)
    with pytest.raises(ValueError, match="frame count"):
        plan_for_budget(tiny, h, w, budget, torch.float32, tile_order="tile")
    with pytest.raises(ValueError, match="tile_order"):
        plan_for_budget(tiny, h, w, budget, torch.float32, tile_order="rows")


def test_memory_calibration_measures_a_run_against_the_planner_parts(tiny):
    """``benchmarks/calibrate_memory.py`` (how ``MEMORY_FACTORS`` are set) measures a real run."""
    import importlib.util
    from pathlib import Path

    from videovae.engine import estimate_peak_bytes, peak_parts

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "calibrate_memory.py"
    spec = importlib.util.spec_from_file_location("calibrate_memory", path)
    calibrate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibrate)
    run = calibrate.measure("tiny", "decode", 5, 32, 48, 4, 0)
    assert run["family"] == "causal-vae" and run["growth"] >= 0
    parts = peak_parts(tiny, 4, 32, 48, torch.float32, 32, 48)
    assert (run["activations"], run["caches"], run["weights"]) == (parts.activations, parts.caches, parts.weights)
    assert estimate_peak_bytes(tiny, 4, 32, 48, torch.float32, 32, 48) == parts.total(MEMORY_FACTORS["causal-vae"])


def test_cache_bytes_per_pixel_counts_the_causal_state(tiny):
    from videovae.engine import cache_bytes_per_pixel

    per_pixel = cache_bytes_per_pixel(tiny, torch.float32)
    # at least the decoder's full-resolution convs: 2 cached frames x 16 channels x 4 bytes each
    assert per_pixel > 2 * 16 * 4
    assert cache_bytes_per_pixel(tiny, torch.bfloat16) == pytest.approx(per_pixel / 2)


def test_decode_frames_crops_padding(tiny):
    z = torch.randn(1, 4, 3, 4, 4)
    g = VideoGeometry(frames=7, height=30, width=27, padded_frames=9, padded_height=32, padded_width=32)
    frames = torch.cat(list(decode_frames(tiny, z, g, EngineOptions(chunk_frames=4))))
    assert frames.shape == (7, 30, 27, 3)


def test_tiled_decode_of_natural_content_is_close(tiny_rms):
    x = to_model_range(synthetic_video(5, 96, 96, seed=5))
    with torch.no_grad():
        z = tiny_rms.encode(x).mean
        decoded = tiny_rms.decode(z)
    tiled = decode_tensor(tiny_rms, z, tile=48)
    assert psnr(decoded.clamp(-1, 1), tiled.clamp(-1, 1)).min() > 40
