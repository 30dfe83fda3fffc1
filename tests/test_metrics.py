import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from videovae.io import to_model_range
from videovae.metrics import MetricAccumulator, drift_psnr, psnr, ssim, temporal_flicker, video_metrics
from videovae.synthetic import synthetic_video


def _clip(t=6, h=32, w=40, seed=0):
    return to_model_range(synthetic_video(t, h, w, seed=seed)).double()


def _noisy(x, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(-1, 1)


def _reference_ssim(x, y, data_range=2.0):
    """Independent SSIM of one (C, H, W) image pair: full 2-D Gaussian window via F.conv2d, per channel."""
    r = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(r**2) / (2 * 1.5**2))
    win = torch.outer(g, g)
    win = (win / win.sum()).view(1, 1, 11, 11)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for c in range(x.shape[0]):
        a = x[c].double()[None, None]
        b = y[c].double()[None, None]
        mu_a, mu_b = F.conv2d(a, win), F.conv2d(b, win)
        var_a = F.conv2d(a * a, win) - mu_a**2
        var_b = F.conv2d(b * b, win) - mu_b**2
        cov = F.conv2d(a * b, win) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        vals.append(s.mean())
    return float(torch.stack(vals).mean())


def test_psnr_known_mse():
    a = torch.zeros(2, 3, 4, 8, 8)
    b = a.clone()
    b[:, :, 1] += 0.1  # MSE 0.01 on frame 1
    b[1, :, 2] -= 0.5  # MSE 0.25 on frame 2 of item 1
    p = psnr(a, b)
    assert p.shape == (2, 4) and p.dtype == torch.float64
    assert math.isinf(float(p[0, 0]))
    assert float(p[0, 1]) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-4)
    assert float(p[1, 2]) == pytest.approx(10 * math.log10(4 / 0.25), abs=1e-6)
    assert float(psnr(a, b, data_range=1.0)[1, 2]) == pytest.approx(10 * math.log10(1 / 0.25), abs=1e-6)


def test_ssim_identity_and_monotonic():
    x = _clip()
    s = ssim(x, x)
    assert s.shape == (1, 6)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-12)
    means = [float(ssim(x, _noisy(x, sigma)).mean()) for sigma in (0.02, 0.05, 0.1, 0.3)]
    assert all(m1 > m2 for m1, m2 in zip(means, means[1:], strict=False))
    assert 0.0 < means[-1] < 0.9


def test_ssim_matches_independent_reference():
    x = _clip(t=3)
    y = _noisy(x, 0.1)
    s = ssim(x, y)
    for t in range(3):
        assert float(s[0, t]) == pytest.approx(_reference_ssim(x[0, :, t], y[0, :, t]), abs=1e-10)


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x = _clip(t=2, h=37, w=45)
    y = _noisy(x, 0.15)
    s = ssim(x, y)
    for t in range(2):
        ref = metrics.structural_similarity(
            x[0, :, t].permute(1, 2, 0).numpy(),
            y[0, :, t].permute(1, 2, 0).numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=2.0,
            channel_axis=-1,
        )
        assert float(s[0, t]) == pytest.approx(ref, abs=1e-4)


def test_ssim_small_frames_and_float32():
    x = torch.rand(1, 3, 2, 6, 5) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(1, 2, dtype=torch.float64))
    y = _noisy(x.double(), 0.2).float()
    s = ssim(x, y)
    assert s.shape == (1, 2) and bool(((s > -1) & (s < 1)).all())


def test_shape_checks():
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(torch.zeros(1, 3, 2, 8, 8), torch.zeros(1, 3, 3, 8, 8))
    with pytest.raises(ValueError, match="N, C, T, H, W"):
        ssim(torch.zeros(3, 2, 8, 8), torch.zeros(3, 2, 8, 8))


def test_temporal_flicker():
    x = _clip(t=5)
    assert temporal_flicker(x, x) == 0.0
    assert temporal_flicker(x, x + 0.3) == pytest.approx(0.0, abs=1e-12)  # constant offset does not flicker
    y = x.clone()
    y[:, :, 2] += 0.1  # one frame brighter: differences t=2 (+0.1) and t=3 (-0.1)
    assert temporal_flicker(x, y) == pytest.approx(2 * 0.1 / 4, abs=1e-12)
    assert temporal_flicker(x[:, :, :1], y[:, :, :1]) == 0.0
    diff_a = x[:, :, 1:] - x[:, :, :-1]
    z = _noisy(x, 0.05)
    diff_b = z[:, :, 1:] - z[:, :, :-1]
    assert temporal_flicker(x, z) == pytest.approx(float((diff_b - diff_a).abs().mean()), rel=1e-12)


def test_drift_psnr_separates_head_and_tail():
    """Noise only on the last 8 of 20 frames: the head is perfect, the tail has the noise's PSNR."""
    x = torch.zeros(1, 3, 20, 8, 8, dtype=torch.float64)
    y = x.clone()
    y[:, :, 12:] += 0.1  # MSE 0.01 -> 10 log10(4 / 0.01) dB
    d = drift_psnr(x, y)
    assert d["psnr_first_9"] == math.inf
    assert d["psnr_last_8"] == pytest.approx(10 * math.log10(400))
    y[:, :, 11] += 0.1  # frame 11 is in neither part
    assert drift_psnr(x, y) == d
    with pytest.raises(ValueError, match="at least 17 frames, got 16"):
        drift_psnr(x[:, :, :16], y[:, :, :16])
    acc = MetricAccumulator()
    for t in range(0, 20, 7):  # chunks of 7, 7, 6 frames
        acc.update(x[:, :, t : t + 7], y[:, :, t : t + 7])
    assert {k: acc.result()[k] for k in d} == d
    assert "psnr_last_8" not in video_metrics(x[:, :, :16], y[:, :, :16])


def test_video_metrics_dict():
    x = _clip(t=4)
    y = _noisy(x, 0.05)
    m = video_metrics(x, y)
    assert set(m) == {"psnr", "ssim", "flicker", "frames", "psnr_per_frame", "ssim_per_frame"}
    assert m["frames"] == 4 and len(m["psnr_per_frame"]) == 4 and len(m["ssim_per_frame"]) == 4
    assert m["psnr"] == pytest.approx(float(psnr(x, y).mean()))
    assert m["ssim"] == pytest.approx(float(ssim(x, y).mean()))
    assert m["flicker"] == pytest.approx(temporal_flicker(x, y))
    assert 20 < m["psnr"] < 40 and 0 < m["ssim"] < 1


def test_video_metrics_accepts_uint8_frames():
    frames = synthetic_video(3, 24, 24)
    noisy = (frames.int() + 3).clamp(0, 255).to(torch.uint8)
    a = video_metrics(frames, noisy)
    b = video_metrics(to_model_range(frames), to_model_range(noisy))
    assert a == b


@pytest.mark.parametrize("splits", [[7], [1, 6], [3, 3, 1], [2, 2, 2, 1], [1] * 7])
def test_accumulator_matches_whole_clip(splits):
    x = torch.cat([_clip(t=7, seed=2)] * 2)  # N = 2
    y = _noisy(x, 0.07)
    whole = video_metrics(x, y)
    acc = MetricAccumulator()
    start = 0
    for n in splits:
        acc.update(x[:, :, start : start + n], y[:, :, start : start + n])
        start += n
    chunked = acc.result()
    assert chunked["frames"] == whole["frames"] == 7
    for key in ("psnr", "ssim", "flicker"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(chunked["psnr_per_frame"], whole["psnr_per_frame"], rtol=1e-12)
    np.testing.assert_allclose(chunked["ssim_per_frame"], whole["ssim_per_frame"], rtol=1e-12)


def test_accumulator_errors():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="no frames"):
        acc.result()
    acc.update(torch.zeros(1, 3, 2, 16, 16), torch.zeros(1, 3, 2, 16, 16))
    with pytest.raises(ValueError, match="does not continue"):
        acc.update(torch.zeros(1, 3, 2, 8, 16), torch.zeros(1, 3, 2, 8, 16))
