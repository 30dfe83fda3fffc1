"""The prepared GPU check runs its code paths on the CPU (``--smoke``) and works uninstalled."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_the_report(tmp_path):
    import videovae.layers as layers

    gpu_check = _module()
    window = layers.WINDOW_FRAMES
    assert gpu_check.main(["--smoke", "--skip-tests", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    modes = {r["mode"] for r in report["e2e"]}
    assert modes == {"whole", "1 latent/chunk", "16-frame chunks", "16-frame chunks, 256 px tiles",
                     "1 latent/chunk, 256 px tiles"}
    assert all(r["graphs_compiled_while_timed"] == 0 for r in report["e2e"])  # eager: nothing compiled
    assert all(r["decode_psnr_vs_whole"] == 100.0 for r in report["e2e"])  # tiny streams exactly
    assert {r["mode"] for r in report["accuracy"]} == {"1 latent/chunk", "16-frame chunks",
                                                         "16-frame chunks, 128 px tiles"}
    assert all(r["psnr_vs_whole"] == 100.0 for r in report["accuracy"])
    assert "Chunking accuracy (fp32, TF32 off)" in (tmp_path / "gpu_check.md").read_text()
    assert "| tiny |" in (tmp_path / "gpu_check.md").read_text()
    assert [r["window_frames"] for r in report["windows"]] == [4, 0]
    assert all(r["decode_s"] > 0 and r["encode_s"] > 0 for r in report["windows"])
    assert layers.WINDOW_FRAMES == window, "the window study restores the library's window"
    assert "Whole-clip conv windows" in (tmp_path / "gpu_check.md").read_text()


def test_each_stage_is_on_disk_before_the_next_starts(tmp_path, monkeypatch):
    """A check cut short (a device time limit) keeps what the finished stages measured."""
    gpu_check = _module()

    def killed(*args):
        raise KeyboardInterrupt("time limit")

    monkeypatch.setattr(gpu_check, "accuracy_rows", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--smoke", "--skip-tests", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["windows"] and report["e2e"] and "accuracy" not in report
    assert "| tiny |" in (tmp_path / "gpu_check.md").read_text()


def test_shim_maps_the_folders_as_the_install_does():
    shim = _module().make_shim() / "videovae"
    assert (shim / "kernels" / "tolerance.py").resolve() == ROOT / "kernels" / "tolerance.py"
    assert (shim / "train" / "distill.py").resolve() == ROOT / "train" / "distill.py"
    assert (shim / "models" / "turbo_vaed.py").resolve() == ROOT / "videovae" / "models" / "turbo_vaed.py"
