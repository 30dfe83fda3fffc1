"""FSQ quantiser: exact codes <-> indices, reachability, straight-through gradients, fp32 under
bf16, agreement with vector_quantize_pytorch, codebook statistics and index dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from videovae.quantizers import FSQ, CodebookUsage, codebook_stats, smallest_index_dtype

CASES = [((8, 5, 5, 5), 1), ((8, 8, 8, 5, 5, 5), 2), ((7, 6, 3), 3)]


def _z(q: FSQ, *spatial: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, q.dim, *spatial, generator=gen) * scale


def _expected_digits(z: torch.Tensor, level: int, bound: str) -> torch.Tensor:
    """Rounded level-unit value of one channel, computed independently in float64."""
    z = z.double()
    offset = 0.5 if level % 2 == 0 else 0.0
    if bound == "tanh":
        half_l = (level - 1) * 1.001 / 2
        u = torch.tanh(z + math.atanh(offset / half_l)) * half_l - offset
    else:
        u = (2 * torch.sigmoid(1.6 * z) - 1) * (level - 1) / 2 - offset
    return u.round()


def _preimages(level: int, bound: str) -> dict[int, float]:
    """One input per reachable level digit, found by sweeping z."""
    z = torch.linspace(-15, 15, 200001, dtype=torch.float64)
    digits = _expected_digits(z, level, bound)
    return {int(d): float(z[digits == d][len(z[digits == d]) // 2]) for d in digits.unique()}


# --- codes <-> indices ---------------------------------------------------------------------------


@pytest.mark.parametrize("bound", ["tanh", "isigmoid"])
@pytest.mark.parametrize(("levels", "groups"), CASES)
def test_round_trip_codes_indices(levels, groups, bound):
    q = FSQ(levels, groups=groups, bound=bound)
    out = q(_z(q, 4, 5))
    assert out.indices.dtype == torch.int64 and out.indices.shape == (3, groups, 4, 5)
    assert torch.equal(q.indices_to_codes(q.codes_to_indices(out.values)), out.values)
    assert torch.equal(q.codes_to_indices(out.values), out.indices)
    assert q.indices_to_codes(out.indices).dtype == torch.float32


@pytest.mark.parametrize(("levels", "groups"), [((8, 5, 5, 5), 1), ((8, 8, 8, 5, 5, 5), 2)])
def test_every_index_is_a_distinct_code(levels, groups):
    q = FSQ(levels, groups=groups)
    k = q.codebook_size
    # group 0 counts up, group 1 counts down, so the groups are not decoded identically by accident
    all_ids = torch.arange(k)
    indices = torch.stack([all_ids if g % 2 == 0 else all_ids.flip(0) for g in range(groups)])[None]
    codes = q.indices_to_codes(indices)
    assert torch.equal(q.codes_to_indices(codes), indices)
    per_group = codes[0, : len(levels)].T  # (k, len(levels)) codes of group 0
    assert torch.unique(per_group, dim=0).shape[0] == k
    # mixed radix, first channel least significant: index 1 moves channel 0 up one level
    step = codes[0, : len(levels), 1] - codes[0, : len(levels), 0]
    assert step[0] == pytest.approx(1 / (levels[0] // 2)) and torch.all(step[1:] == 0)


@pytest.mark.parametrize(
    ("levels", "groups", "bound"),
    [((8, 5, 5, 5), 1, "tanh"), ((8, 5, 5, 5), 1, "isigmoid"), ((8, 8, 8, 5, 5, 5), 2, "tanh"),
     ((8, 8, 8, 5, 5, 5), 2, "isigmoid"), ((2, 4, 3), 1, "isigmoid")],
)
def test_every_code_is_reachable_from_some_input(levels, groups, bound):
    q = FSQ(levels, groups=groups, bound=bound)
    for level in levels:
        assert sorted(_preimages(level, bound)) == list(range(-(level // 2), (level - 1) // 2 + 1))
    # build one input per code from per-channel preimages; forward must return every index
    ids = torch.arange(q.codebook_size)
    basis = [math.prod(levels[:i]) for i in range(len(levels))]
    channels = []
    for level, b in zip(levels, basis, strict=True):
        table = _preimages(level, bound)
        digit = (ids // b) % level - level // 2
        channels.append(torch.tensor([table[int(d)] for d in digit], dtype=torch.float32))
    z = torch.stack(channels).repeat(groups, 1)[None]  # (1, dim, codebook_size)
    out = q(z)
    assert torch.equal(out.indices, ids.expand(1, groups, -1))


@pytest.mark.parametrize("bound", ["tanh", "isigmoid"])
@pytest.mark.parametrize(("levels", "groups"), CASES)
def test_values_lie_on_the_grid(levels, groups, bound):
    q = FSQ(levels, groups=groups, bound=bound)
    values = q(_z(q, 50, scale=4.0)).values
    half = torch.tensor([lv // 2 for lv in levels] * groups, dtype=torch.float32).view(1, -1, 1)
    scaled = values * half
    assert torch.equal(scaled, scaled.round())
    low = torch.tensor([-(lv // 2) for lv in levels] * groups).view(1, -1, 1)
    high = torch.tensor([(lv - 1) // 2 for lv in levels] * groups).view(1, -1, 1)
    assert torch.all(scaled >= low) and torch.all(scaled <= high)
    assert values.abs().max() <= 1


@pytest.mark.parametrize("bound", ["tanh", "isigmoid"])
def test_values_match_the_formula(bound):
    levels = (8, 7, 4, 3) if bound == "tanh" else (8, 7, 4, 3, 2)
    q = FSQ(levels, groups=2, bound=bound)
    z = _z(q, 200, scale=3.0)
    values = q(z).values
    for g in range(2):
        for c, level in enumerate(levels):
            ch = g * len(levels) + c
            expected = (_expected_digits(z[:, ch], level, bound) / (level // 2)).float()
            assert torch.equal(values[:, ch], expected), (bound, level)


# --- gradients and precision ---------------------------------------------------------------------


@pytest.mark.parametrize("bound", ["tanh", "isigmoid"])
def test_gradient_is_straight_through_the_bound(bound):
    levels = (8, 5, 4, 3)
    q = FSQ(levels, groups=2, bound=bound)
    z = _z(q, 6, 7, scale=1.0).requires_grad_(True)
    weight = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    (q(z).values * weight).sum().backward()
    expected = torch.empty_like(z, dtype=torch.float64)
    zd = z.detach().double()
    for ch in range(q.dim):
        level = levels[ch % len(levels)]
        offset = 0.5 if level % 2 == 0 else 0.0
        if bound == "tanh":
            half_l = (level - 1) * 1.001 / 2
            slope = (1 - torch.tanh(zd[:, ch] + math.atanh(offset / half_l)) ** 2) * half_l
        else:
            s = torch.sigmoid(1.6 * zd[:, ch])
            slope = 2 * 1.6 * s * (1 - s) * (level - 1) / 2
        expected[:, ch] = slope / (level // 2)
    # fp32 1 - tanh^2 loses digits where the bound saturates, hence the absolute tolerance
    torch.testing.assert_close(z.grad.double(), expected * weight.double(), rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 0.5  # not a test of zeros


@pytest.mark.parametrize("bound", ["tanh", "isigmoid"])
def test_bf16_input_is_quantised_in_fp32(bound):
    q = FSQ((8, 8, 8, 5, 5, 5), groups=2, bound=bound)
    z16 = (torch.randn(8, q.dim, 4000, generator=torch.Generator().manual_seed(2)) * 2).bfloat16()
    out = q(z16)
    ref = q(z16.float())
    assert out.values.dtype == torch.bfloat16
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.values, ref.values.bfloat16())
    # the test can tell: the same bound evaluated in bf16 lands on other codes somewhere
    x, bf16 = z16[:, 0], torch.bfloat16
    if bound == "tanh":
        half_l = torch.tensor(7 * 1.001 / 2, dtype=bf16)
        u = torch.tanh(x + torch.atanh(torch.tensor(0.5, dtype=bf16) / half_l)) * half_l - 0.5
    else:
        u = (2 * torch.sigmoid(1.6 * x) - 1) * 3.5 - 0.5
    assert not torch.equal(u.round().float(), ref.values[:, 0] * 4)


def test_autocast_does_not_lower_precision():
    q = FSQ((8, 5, 5, 5))
    z = _z(q, 2000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    ref = q(z)
    assert out.values.dtype == torch.float32
    assert torch.equal(out.values, ref.values) and torch.equal(out.indices, ref.indices)


# --- reference implementation --------------------------------------------------------------------


@pytest.mark.parametrize(("levels", "groups"), CASES + [((17, 17, 17, 17), 1), ((5, 5, 5), 4)])
@pytest.mark.parametrize("spatial", [(), (9,), (3, 4, 5)])
def test_matches_vector_quantize_pytorch(levels, groups, spatial):
    reference = pytest.importorskip("vector_quantize_pytorch")
    ref = reference.FSQ(list(levels), num_codebooks=groups, channel_first=True)
    q = FSQ(levels, groups=groups)
    z = _z(q, *spatial, scale=3.0)
    ref_values, ref_indices = ref(z)
    if groups == 1:
        ref_indices = ref_indices.unsqueeze(-1)  # the reference drops a single codebook dim
    ref_indices = ref_indices.movedim(-1, 1).to(torch.int64)  # (N, *spatial, groups) -> (N, groups, *spatial)
    out = q(z)
    assert torch.equal(out.values, ref_values)
    assert torch.equal(out.indices, ref_indices)
    codes = ref.indices_to_codes(ref_indices.movedim(1, -1) if groups > 1 else ref_indices[:, 0])
    assert torch.equal(q.indices_to_codes(out.indices), codes)


# --- shapes and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(), (7,), (2, 3, 4), (1, 2, 3, 2)])
def test_any_number_of_trailing_dims(spatial):
    q = FSQ((8, 5, 5, 5), groups=2, bound="isigmoid")
    z = _z(q, *spatial)
    out = q(z)
    assert out.values.shape == z.shape and out.indices.shape == (3, 2, *spatial)
    # each position is quantised on its own: flattening space first gives the same tokens
    flat = q(z.reshape(3, q.dim, -1).movedim(2, 1).reshape(-1, q.dim))
    assert torch.equal(flat.indices.reshape(3, -1, 2).movedim(1, 2), out.indices.reshape(3, 2, -1))


def test_attributes():
    q = FSQ([8, 8, 8, 5, 5, 5], groups=2, bound="isigmoid")
    assert (q.levels, q.groups, q.dim, q.codebook_size, q.bound) == ((8, 8, 8, 5, 5, 5), 2, 12, 64000, "isigmoid")
    assert list(q.parameters()) == [] and q.state_dict() == {}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"levels": (8, 1, 5)}, "at least 2"),
        ({"levels": (8, 0)}, "at least 2"),
        ({"levels": ()}, "at least one"),
        ({"levels": (8, 2.5)}, "integers"),
        ({"levels": (8, 2)}, "isigmoid"),
        ({"levels": (8, 5), "bound": "sigmoid"}, "bound"),
        ({"levels": (8, 5), "groups": 0}, "groups"),
    ],
)
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSQ(**kwargs)


def test_level_two_works_with_isigmoid():
    q = FSQ((2, 3), bound="isigmoid")
    out = q(torch.tensor([[-1.0, 0.0], [0.5, 0.0]]))
    assert torch.equal(out.values, torch.tensor([[-1.0, 0.0], [0.0, 0.0]]))


def test_wrong_inputs_raise():
    q = FSQ((8, 5, 5, 5), groups=2)
    with pytest.raises(ValueError, match=r"\(N, 8, \*spatial\)"):
        q(torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="channel-first"):
        q(torch.zeros(8))
    with pytest.raises(TypeError, match="floating"):
        q(torch.zeros(1, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        q.indices_to_codes(torch.tensor([[0, 1000]]))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        q.indices_to_codes(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="2 groups"):
        q.indices_to_codes(torch.zeros(1, 3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        q.indices_to_codes(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="not on the FSQ grid"):
        q.codes_to_indices(torch.full((1, 8, 2), 0.3))
    with pytest.raises(ValueError, match="not on the FSQ grid"):
        q.codes_to_indices(torch.ones(1, 8))  # +1 is off an 8-level grid (it stops at 0.75)
    with pytest.raises(ValueError, match=r"\(N, 8, \*spatial\)"):
        q.codes_to_indices(torch.zeros(1, 4))


def test_indices_of_narrow_dtypes_decode():
    q = FSQ((8, 5, 5, 5))
    ids = torch.arange(1000)[None, None]
    expected = q.indices_to_codes(ids)
    assert torch.equal(q.indices_to_codes(ids.to(torch.uint16)), expected)
    assert torch.equal(q.indices_to_codes(ids.to(torch.int32)), expected)


# --- codebook statistics -------------------------------------------------------------------------


def test_codebook_stats_hand_example():
    stats = codebook_stats(torch.tensor([[0, 0], [1, 3]]), 4)
    assert stats["usage"] == 0.75 and stats["tokens"] == 4
    # p = (1/2, 1/4, 1/4): entropy 1.5 bits, perplexity 2**1.5
    assert stats["perplexity"] == pytest.approx(2**1.5, rel=1e-12)
    uniform = codebook_stats(torch.arange(64).repeat(3), 64)
    assert uniform["usage"] == 1.0 and uniform["perplexity"] == pytest.approx(64, rel=1e-12)
    single = codebook_stats(torch.full((10,), 5, dtype=torch.uint8), 64)
    assert single["usage"] == 1 / 64 and single["perplexity"] == pytest.approx(1.0)


def test_codebook_usage_streams_over_batches():
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 300, (2, 2, 5, 5), generator=gen) for _ in range(4)]
    usage = CodebookUsage(1000)
    with pytest.raises(ValueError, match="update"):
        usage.stats()
    for batch in batches:
        usage.update(batch)
    whole = codebook_stats(torch.cat([b.reshape(-1) for b in batches]), 1000)
    assert usage.stats() == whole
    assert 0 < whole["usage"] <= 0.3
    usage.reset()
    usage.update(batches[0])
    assert usage.stats() == codebook_stats(batches[0], 1000)


def test_codebook_stats_errors():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        codebook_stats(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="at least one"):
        codebook_stats(torch.zeros(0, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="integer"):
        codebook_stats(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="codebook_size"):
        CodebookUsage(0)


# --- index dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "dtype"),
    [(1, torch.uint8), (256, torch.uint8), (257, torch.uint16), (64000, torch.uint16), (65536, torch.uint16),
     (65537, torch.int32), (2**31, torch.int32), (2**31 + 1, torch.int64), (2**63, torch.int64)],
)
def test_smallest_index_dtype(size, dtype):
    assert smallest_index_dtype(size) == dtype


def test_smallest_index_dtype_errors():
    for bad in (0, -3, 2**63 + 1, True):
        with pytest.raises(ValueError, match="codebook_size"):
            smallest_index_dtype(bad)


@pytest.mark.parametrize("size", [256, 65536, 2**31])
def test_index_dtypes_survive_safetensors(tmp_path, size):
    dtype = smallest_index_dtype(size)
    ids = torch.tensor([0, 1, size // 2, size - 1], dtype=torch.int64)
    save_file({"ids": ids.to(dtype)}, str(tmp_path / "ids.safetensors"))
    loaded = load_file(str(tmp_path / "ids.safetensors"))["ids"]
    assert loaded.dtype == dtype and torch.equal(loaded.to(torch.int64), ids)
