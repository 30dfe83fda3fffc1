
import pytest
import torch

from videovae.io import probe, read_video
from videovae.synthetic import synthetic_frames, synthetic_video, write_synthetic_video


def test_shape_dtype_and_determinism():
    a = synthetic_video(9, 40, 56, seed=3)
    assert a.shape == (9, 40, 56, 3) and a.dtype == torch.uint8
    assert torch.equal(a, synthetic_video(9, 40, 56, seed=3))
    assert not torch.equal(a, synthetic_video(9, 40, 56, seed=4))
    assert torch.equal(synthetic_video(5, 40, 56, seed=3), a[:5])  # frame i does not depend on the length


@pytest.mark.parametrize("chunk", [1, 4, 9, 100])
def test_chunks_equal_whole(chunk):
    whole = synthetic_video(9, 24, 32, seed=1)
    chunks = list(synthetic_frames(9, 24, 32, seed=1, chunk_frames=chunk))
    assert all(c.shape[0] <= chunk for c in chunks)
    assert torch.equal(torch.cat(chunks), whole)


def test_content_is_natural_looking():
    v = synthetic_video(16, 64, 64, seed=0).float()
    assert float(v.min()) < 60 and float(v.max()) > 190  # spans a good part of the range
    assert float(v.std()) > 20
    for c in range(3):  # coloured, all channels vary
        assert float(v[..., c].std()) > 10
    d = (v[1:] - v[:-1]).abs().mean(dim=(1, 2, 3))
    assert bool((d > 0.2).all())  # every frame moves
    for t in range(15):  # consecutive frames stay strongly correlated
        a = v[t].flatten() - v[t].mean()
        b = v[t + 1].flatten() - v[t + 1].mean()
        assert float((a @ b) / (a.norm() * b.norm())) > 0.9
    far = (v[0] - v[15]).abs().mean()
    assert float(far) > float(d[0])  # content drifts further over time


def test_edge_cases():
    assert synthetic_video(0, 8, 8).shape == (0, 8, 8, 3)
    assert synthetic_video(2, 1, 1).shape == (2, 1, 1, 3)
    with pytest.raises(ValueError):
        synthetic_video(2, 0, 8)
    with pytest.raises(ValueError):
        list(synthetic_frames(2, 8, 8, chunk_frames=0))


def test_write_synthetic_video(tmp_path):
    path = write_synthetic_video(tmp_path / "syn.mkv", 6, 32, 48, seed=2, fps=30)
    info = probe(path)
    assert (info.width, info.height, info.fps) == (48, 32, 30.0)
    frames, _ = read_video(path)
    assert torch.equal(frames, synthetic_video(6, 32, 48, seed=2, fps=30))


def test_camera_motion_over_a_photo():
    from videovae.synthetic import camera_motion_video

    photo = synthetic_video(1, 120, 160, seed=8)[0]
    a = camera_motion_video(photo, 9, 48, 64, seed=1)
    assert a.shape == (9, 48, 64, 3) and a.dtype == torch.uint8
    assert torch.equal(a, camera_motion_video(photo, 9, 48, 64, seed=1))
    assert not torch.equal(a, camera_motion_video(photo, 9, 48, 64, seed=2))
    steps = (a[1:].float() - a[:-1].float()).abs().mean(dim=(1, 2, 3))
    assert (steps > 0.05).all()  # the camera moves in every frame
    assert a.float().std() > 10  # real content, not a flat frame
    with pytest.raises(ValueError, match="uint8"):
        camera_motion_video(photo.float(), 9, 48, 64)
    with pytest.raises(ValueError, match="num_frames"):
        camera_motion_video(photo, 0, 48, 64)
