"""Decoder export (ONNX, torch.export) with explicit causal state, and the streaming runtimes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from videovae.checkpoint import save_checkpoint, weights_digest
from videovae.cli import main
from videovae.deploy.export import ExportError, export_decoder, graph_paths, zero_state_matches_first
from videovae.deploy.runtime import (
    OnnxDecoder,
    TorchExportDecoder,
    decode_latent_file,
    import_onnxruntime,
    open_decoder,
)
from videovae.engine import decode_frames
from videovae.io import read_image
from videovae.latents import LatentFileError, load_latents
from videovae.layers import CausalCache
from videovae.models import from_preset
from videovae.synthetic import write_synthetic_video

K = 2  # latents per step
H, W = 32, 40  # frames; latents 4 x 5
ONNX = ("onnx", "onnx")
TORCH = ("torch-export", "pt2")


def _has_onnxruntime() -> bool:
    try:
        import_onnxruntime()
        return True
    except ImportError:
        return False


needs_ort = pytest.mark.skipif(not _has_onnxruntime(), reason="onnxruntime is not installed (the export extra)")


def _model(name: str):
    torch.manual_seed(0)
    return from_preset(name).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path) per (preset, format), each exported once (export is the slow part)."""
    root = tmp_path_factory.mktemp("export")
    cache = {}

    def get(name: str, fmt: tuple[str, str]):
        key = (name, fmt[0])
        if key not in cache:
            model = _model(name)
            path = root / f"{name}.{fmt[1]}"
            export_decoder(model, path, format=fmt[0], chunk_latents=K, height=H, width=W)
            cache[key] = model, path
        return cache[key]

    return get


def _runtime(fmt: str, path):
    return OnnxDecoder(path) if fmt == "onnx" else TorchExportDecoder(path)


FORMATS = [pytest.param(ONNX, marks=needs_ort, id="onnx"), pytest.param(TORCH, id="torch-export")]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["turbo-tiny", "tiny"])
@torch.no_grad()
def test_streamed_equals_eager(exported, name, fmt):
    model, path = exported(name, fmt)
    decoder = _runtime(fmt[0], path)
    z = torch.randn(1, 4, 1 + 3 * K, 4, 5, generator=torch.Generator().manual_seed(3))
    # chunk by chunk through the exported graphs: first, then 3 steps
    cache = CausalCache()
    frames, state = decoder.first(z[:, :, : 1 + K])
    ref, cache = model.decode_chunk(z[:, :, : 1 + K], cache)
    assert frames.shape == ref.shape == (1, 3, 1 + K * 4, H, W)
    assert (frames - ref).abs().max() <= 1e-4
    for start in range(1 + K, z.shape[2], K):
        frames, state = decoder.step(z[:, :, start : start + K], state)
        ref, cache = model.decode_chunk(z[:, :, start : start + K], cache)
        assert frames.shape == (1, 3, K * 4, H, W)
        assert (frames - ref).abs().max() <= 1e-4
    # whole clip, including a length that needs end padding (6 latents: 1 + 2 + 2 + 1)
    whole = model.decode(z)
    assert (decoder.decode(z) - whole).abs().max() <= 1e-4
    short = decoder.decode(z[:, :, :6])
    assert short.shape[2] == 1 + 5 * 4 and (short - whole[:, :, : short.shape[2]]).abs().max() <= 1e-4
    assert decoder.decode(z[:, :, :1]).shape[2] == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_sidecar_and_names(exported, fmt):
    model, path = exported("turbo-tiny", fmt)
    step, first, sidecar = graph_paths(path)
    assert step.exists() and first.exists() and first.name == f"turbo-tiny.first.{fmt[1]}"
    meta = json.loads(sidecar.read_text())
    spec = meta["spec"]
    assert meta["runtime"] == fmt[0] and spec["family"] == "turbo-vaed"
    assert spec["config"] == model.config.to_dict() and spec["chunk_latents"] == K
    assert spec["weights_sha256"] == weights_digest(model.state_dict())
    state = spec["state"]
    cache = CausalCache()
    with torch.no_grad():
        model.decode_chunk(torch.zeros(1, 4, 1 + K, 4, 5), cache)
    assert [s["key"] for s in state] == [k for k, v in cache.frames.items() if v.ndim]
    assert [tuple(s["shape"]) for s in state] == [tuple(v.shape) for v in cache.frames.values() if v.ndim]
    assert meta["graphs"]["step"]["inputs"] == ["latents"] + [f"state.{i}" for i in range(len(state))]
    assert meta["graphs"]["step"]["outputs"] == ["frames"] + [f"new_state.{i}" for i in range(len(state))]
    assert meta["graphs"]["first"]["outputs"] == ["frames"] + [f"state.{i}" for i in range(len(state))]
    if fmt[0] == "onnx":
        import onnx

        graph = onnx.load(str(step)).graph
        assert [i.name for i in graph.input] == meta["graphs"]["step"]["inputs"]
        assert [o.name for o in graph.output] == meta["graphs"]["step"]["outputs"]
        assert min(op.version for op in onnx.load(str(first)).opset_import if op.domain in ("", "ai.onnx")) >= 17


def test_first_chunk_needs_its_own_graph():
    """Measured, not assumed: a step on zero state does not reproduce the first chunk."""
    from videovae.deploy.export import stream_spec

    for name in ("turbo-tiny", "tiny"):
        model = _model(name)
        assert zero_state_matches_first(model, stream_spec(model, K, 4, 5)) > 1e-3


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_input(exported, fmt):
    _, path = exported("turbo-tiny", fmt)
    decoder = _runtime(fmt[0], path)
    with pytest.raises(ExportError, match="chunk of 3 latent frames, got 2"):
        decoder.first(torch.zeros(1, 4, K, 4, 5))
    frames, state = decoder.first(torch.zeros(1, 4, 1 + K, 4, 5))
    with pytest.raises(ExportError, match="chunk of 2 latent frames, got 3"):
        decoder.step(torch.zeros(1, 4, K + 1, 4, 5), state)
    with pytest.raises(ExportError, match=f"expected {len(state)} state tensors, got {len(state) - 1}"):
        decoder.step(torch.zeros(1, 4, K, 4, 5), state[:-1])
    with pytest.raises(ExportError, match="latents have 16 channels; the exported decoder takes 4"):
        decoder.decode(torch.zeros(1, 16, 5, 4, 5))
    with pytest.raises(ExportError, match="exported for 4x5 latents"):
        decoder.decode(torch.zeros(1, 4, 5, 8, 8))
    with pytest.raises(ExportError, match="expected latents"):
        decoder.decode(torch.zeros(4, 5, 4, 5))
    other = "torch-export" if fmt[0] == "onnx" else "onnx"
    if other == "torch-export" or _has_onnxruntime():
        with pytest.raises(ExportError, match=f"exported for {fmt[0]}, not {other}"):
            open_decoder(path, other)


def test_export_errors(tmp_path):
    model = _model("turbo-tiny")
    with pytest.raises(ExportError, match="format must be one of"):
        export_decoder(model, tmp_path / "x.onnx", format="tflite", chunk_latents=K, height=H, width=W)
    with pytest.raises(ExportError, match="multiple of 8"):
        export_decoder(model, tmp_path / "x.onnx", format="onnx", chunk_latents=K, height=30, width=W)
    with pytest.raises(ExportError, match="chunk_latents must be >= 1"):
        export_decoder(model, tmp_path / "x.onnx", format="onnx", chunk_latents=0, height=H, width=W)
    with pytest.raises(FileNotFoundError, match="output folder"):
        export_decoder(model, tmp_path / "no" / "x.onnx", format="onnx", chunk_latents=K, height=H, width=W)
    with pytest.raises(ExportError, match="not exactly streamable"):
        export_decoder(_model("cv-vae-tiny"), tmp_path / "x.pt2", format="torch-export", chunk_latents=K,
                       height=H, width=W)
    with pytest.raises(ExportError, match="no such exported decoder"):
        TorchExportDecoder(tmp_path / "missing.pt2")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_without_onnxruntime():
    """videovae and videovae.deploy import without onnxruntime; the ONNX runtime names the extra."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "import videovae, videovae.deploy, videovae.deploy.export, videovae.deploy.runtime as r\n"
        "try:\n    r.import_onnxruntime()\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "videovae[export]" in out.stdout


@pytest.fixture(scope="module")
def latent_file(tmp_path_factory):
    """A `tiny` checkpoint and a latent file it encoded (14 frames 40x32 -> 5 latents 4x5)."""
    root = tmp_path_factory.mktemp("latents")
    weights = root / "w.safetensors"
    save_checkpoint(weights, _model("tiny"))
    write_synthetic_video(root / "clip.mp4", 14, 32, 40, seed=3, fps=25)
    assert main(["encode", str(root / "clip.mp4"), "-o", str(root / "lat.safetensors"), "--weights", str(weights),
                 "--quiet"]) == 0
    return root


@pytest.mark.parametrize("fmt", FORMATS)
def test_runner_matches_videovae_decode(latent_file, exported, fmt, capsys):
    root = latent_file
    weights, lat = root / "w.safetensors", root / "lat.safetensors"
    out = root / f"tiny.{fmt[1]}"
    assert main(["export", "--weights", str(weights), "--format", fmt[0], "--chunk-latents", "2",
                 "--height", "32", "--width", "40", "-o", str(out), "--quiet"]) == 0
    latent, meta = load_latents(lat)
    from videovae.checkpoint import load_checkpoint

    model = load_checkpoint(weights)
    eager = torch.cat(list(decode_frames(model, latent, meta.geometry)), dim=0)
    streamed = torch.cat(list(decode_latent_file(lat, open_decoder(out, fmt[0]))), dim=0)
    assert streamed.shape == eager.shape == (14, 32, 40, 3)
    assert (streamed.int() - eager.int()).abs().max() <= 1  # fp32 within 1e-4 can still round differently
    # the CLI: lossless PNG frames from both paths
    assert main(["decode", str(lat), "-o", str(root / "eager"), "--weights", str(weights), "--quiet"]) == 0
    assert main(["decode", str(lat), "-o", str(root / f"rt-{fmt[0]}"), "--runtime", fmt[0], "--exported", str(out),
                 "--weights", str(weights), "--quiet"]) == 0
    a = sorted((root / "eager").iterdir())
    b = sorted((root / f"rt-{fmt[0]}").iterdir())
    assert len(a) == len(b) == 14
    for x, y in zip(a, b, strict=True):
        assert (read_image(x).int() - read_image(y).int()).abs().max() <= 1
    # errors: flags that go together, other weights, latents of another model
    capsys.readouterr()
    assert main(["decode", str(lat), "-o", str(root / "x.mkv"), "--runtime", fmt[0]]) == 1
    assert "--runtime and --exported go together" in capsys.readouterr().err
    save_checkpoint(root / "other.safetensors", _model("turbo-tiny"))
    assert main(["decode", str(lat), "-o", str(root / "x.mkv"), "--runtime", fmt[0], "--exported", str(out),
                 "--weights", str(root / "other.safetensors")]) == 1
    assert "exported from other weights" in capsys.readouterr().err
    _, turbo = exported("turbo-tiny", fmt)
    with pytest.raises(LatentFileError, match="come from a different model"):
        list(decode_latent_file(lat, open_decoder(turbo, fmt[0])))


@needs_ort
@torch.no_grad()
def test_onevae_continuous_decoder_onnx(tmp_path):
    """Wan/OneVAE decoders use nearest-exact upsampling, exported through a custom ONNX Resize."""
    model = _model("onevae-tiny")
    path = tmp_path / "onevae.onnx"
    export_decoder(model, path, format="onnx", chunk_latents=K, height=H, width=W)
    z = torch.randn(1, model.latent_channels, 1 + 2 * K, 4, 5, generator=torch.Generator().manual_seed(4))
    assert (OnnxDecoder(path).decode(z) - model.decode(z)).abs().max() <= 1e-4
