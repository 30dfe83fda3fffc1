"""The one comparison policy of the kernel tests and the kernel benchmark (interpreter and CUDA).

* **Float outputs** of a kernel agree with its PyTorch reference when the relative RMS error is at
  most :data:`REL_RMS` for the output dtype (bf16/fp16 results are compared with the fp32
  reference evaluated on the same low-precision inputs). NaN anywhere fails (an unwritten output).
* **uint8 outputs** (``to_uint8_frames``, ``normalize_canvas(..., to_uint8=True)``) may differ from
  the reference by at most :data:`UINT8_LEVELS` = 1 level per element, everywhere. Why not bit
  equality: kernel and reference evaluate the same fp32 formula (``x * 127.5 + 127.5``, then round
  half to even), but a compiler may contract ``a * b + c`` into one fused multiply-add (Triton does
  on CUDA; PyTorch's CPU kernels and the Triton interpreter do not), which changes the last bit of
  the product and with it the rounding of values that land within an ulp of ``k + 0.5``. Making both
  sides agree bit for bit would take the same contraction on every device and backend; one level of
  255 is below what any video codec keeps.
* **Whole-model comparisons** (a model decoded through the kernels vs through the references) run
  with TF32 off (:func:`exact_fp32`): on CUDA, fp32 convolutions and matmuls use TF32 by default,
  and two inputs that differ in their last bits (as the fused kernels' outputs may) round to
  different TF32 values, amplifying 1e-7 into 1e-3. Within it, fp32 decodes agree to
  :data:`MODEL_MAX_ABS`, bf16/fp16 decodes to a relative RMS of :data:`MODEL_REL_RMS_LOW` (every
  layer's output is rounded to 8 or 11 bits, and the differences compound over the layers), uint8
  frames to :data:`UINT8_LEVELS`.

Every check returns ``None`` when the outputs agree, else a message saying what differs and by how much.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

REL_RMS = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
UINT8_LEVELS = 1
MODEL_MAX_ABS = 1e-4
MODEL_REL_RMS_LOW = 2e-2

__all__ = ["MODEL_MAX_ABS", "MODEL_REL_RMS_LOW", "REL_RMS", "UINT8_LEVELS", "check_float", "check_model",
           "check_uint8", "exact_fp32", "rel_rms"]


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    """sqrt(mean((got - want)^2)) / sqrt(mean(want^2)), in float64 on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _shape_problem(got: torch.Tensor, want: torch.Tensor, what: str) -> str | None:
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    return None


def check_float(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> str | None:
    """A kernel's float output against its reference, for inputs of ``dtype``."""
    problem = _shape_problem(got, want, what)
    if problem:
        return problem
    if torch.isnan(got).any() and not torch.isnan(want).any():
        return f"{what}: NaN in the kernel's output (unwritten elements?)"
    err = rel_rms(got, want)
    if err > REL_RMS[dtype]:
        return f"{what}: relative RMS error {err:.3e} > {REL_RMS[dtype]:.0e} ({str(dtype).removeprefix('torch.')})"
    return None


def check_uint8(got: torch.Tensor, want: torch.Tensor, what: str) -> str | None:
    """uint8 frames against the reference: at most :data:`UINT8_LEVELS` level apart anywhere."""
    problem = _shape_problem(got, want, what)
    if problem:
        return problem
    if got.dtype != torch.uint8 or want.dtype != torch.uint8:
        return f"{what}: expected uint8 outputs, got {got.dtype} and {want.dtype}"
    diff = (got.cpu().int() - want.cpu().int()).abs()
    worst = int(diff.max()) if diff.numel() else 0
    if worst > UINT8_LEVELS:
        count = int((diff > UINT8_LEVELS).sum())
        return f"{what}: {count} uint8 values differ by up to {worst} levels (at most {UINT8_LEVELS} allowed)"
    return None


def check_model(got: torch.Tensor, want: torch.Tensor, what: str, dtype: torch.dtype = torch.float32) -> str | None:
    """A whole model's output through the kernels against the same model through the references,
    computed in ``dtype`` (run both within :func:`exact_fp32`)."""
    problem = _shape_problem(got, want, what)
    if problem:
        return problem
    if got.dtype == torch.uint8:
        return check_uint8(got, want, what)
    if dtype != torch.float32:
        err = rel_rms(got, want)
        if not err <= MODEL_REL_RMS_LOW:
            return f"{what}: relative RMS error {err:.3e} > {MODEL_REL_RMS_LOW:.0e} ({dtype})"
        return None
    err = (got.detach().float().cpu() - want.detach().float().cpu()).abs().max().item()
    if not err <= MODEL_MAX_ABS:
        return f"{what}: max |difference| {err:.3e} > {MODEL_MAX_ABS:.0e}"
    return None


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions inside the block (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(precision)
