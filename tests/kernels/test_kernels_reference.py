"""The (CPU-efficient) references of ``videovae.kernels`` equal the textbook PyTorch formulations."""

import pytest
import torch
import torch.nn.functional as F

from videovae.kernels.causal_pad3d.reference import causal_pad3d_ref
from videovae.kernels.group_norm_silu.reference import group_norm_silu_ref
from videovae.kernels.rms_norm_silu.reference import rms_norm_silu_ref


def _grad_pair(fn_a, fn_b, *inputs):
    """Outputs and input gradients of two implementations fed the same leaves and output gradient."""
    results = []
    dy = None
    for fn in (fn_a, fn_b):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        dy = torch.randn_like(y) if dy is None else dy
        used = [t for t in leaves if t is not None]
        results.append((y, torch.autograd.grad(y, used, dy)))
    return results


@pytest.mark.parametrize("per_frame", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_reference_matches_folded_group_norm(per_frame, affine):
    torch.manual_seed(0)
    x = torch.randn(2, 12, 5, 7, 9) * 2 + 3
    w, b = (torch.randn(12), torch.randn(12)) if affine else (None, None)

    def textbook(x, w, b):
        if per_frame:
            n, c, t, h, ww = x.shape
            y = F.group_norm(x.transpose(1, 2).reshape(n * t, c, h, ww), 4, w, b, 1e-6)
            y = y.reshape(n, t, c, h, ww).transpose(1, 2)
        else:
            y = F.group_norm(x, 4, w, b, 1e-6)
        return F.silu(y)

    (y, g), (y_ref, g_ref) = _grad_pair(
        lambda x, w, b: group_norm_silu_ref(x, w, b, 4, 1e-6, per_frame, True), textbook, x, w, b
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_rms_norm_reference_matches_wan_form():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 12, 5, 7, 9), torch.randn(12, 1, 1, 1), torch.randn(12, 1, 1, 1)
    (y, g), (y_ref, g_ref) = _grad_pair(
        lambda x, w, b: rms_norm_silu_ref(x, w, b),
        lambda x, w, b: F.silu(F.normalize(x, dim=1, eps=1e-12) * 12**0.5 * w + b),
        x, w, b,
    )
    torch.testing.assert_close(y, y_ref)
    for a, r in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", ["replicate", "zeros", "cache"])
@pytest.mark.parametrize("pads", [(2, 1, 1), (2, 0, 0), (0, 1, 2)])
def test_causal_pad_reference_matches_cat_pad(head, pads):
    torch.manual_seed(0)
    pt, ph, pw = pads
    if head == "cache" and pt == 0:
        pytest.skip("a cache of zero frames is never read")
    x = torch.randn(1, 3, 4, 5, 6)
    cache = torch.randn(1, 3, pt, 5, 6) if head == "cache" else None
    mode = "zeros" if head == "zeros" else "replicate"

    def textbook(x, cache):
        if cache is not None:
            first = cache
        elif mode == "replicate":
            first = x[:, :, :1].repeat(1, 1, pt, 1, 1)
        else:
            first = torch.zeros_like(x[:, :, :1]).repeat(1, 1, pt, 1, 1)
        return F.pad(torch.cat([first, x], dim=2), (pw, pw, ph, ph))

    (y, g), (y_ref, g_ref) = _grad_pair(lambda x, c: causal_pad3d_ref(x, pt, ph, pw, c, mode), textbook, x, cache)
    assert torch.equal(y, y_ref)
    for a, r in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, r)
