"""The shared comparison policy (videovae.kernels.tolerance) accepts and rejects what it says."""

import torch

from videovae.kernels.tolerance import (
    MODEL_MAX_ABS,
    REL_RMS,
    check_float,
    check_model,
    check_uint8,
    exact_fp32,
)


def test_uint8_one_level_passes_two_levels_fail():
    want = torch.tensor([0, 128, 255], dtype=torch.uint8)
    assert check_uint8(want.clone(), want, "x") is None
    assert check_uint8(torch.tensor([1, 127, 254], dtype=torch.uint8), want, "x") is None
    problem = check_uint8(torch.tensor([2, 128, 255], dtype=torch.uint8), want, "frames")
    assert problem is not None and "frames" in problem and "2 levels" in problem
    assert "expected uint8" in check_uint8(want.float(), want.float(), "x")
    assert "shape" in check_uint8(want[:2], want, "x")


def test_float_policy_per_dtype_and_nan():
    want = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for dtype, tol in REL_RMS.items():
        assert check_float(want * (1 + 0.5 * tol), want, dtype, "x") is None
        assert check_float(want * (1 + 3 * tol), want, dtype, "x") is not None
    broken = want.clone()
    broken[7] = float("nan")
    assert "NaN" in check_float(broken, want, torch.float32, "x")


def test_model_policy_and_tf32_switch():
    want = torch.zeros(4, 4)
    assert check_model(want + 0.5 * MODEL_MAX_ABS, want, "decode") is None
    assert check_model(want + 2 * MODEL_MAX_ABS, want, "decode") is not None
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with exact_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
