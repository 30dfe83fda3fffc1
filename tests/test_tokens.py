"""Token files: round trip, index dtypes, validation errors naming the file, atomic writes, the
model check and rate statistics."""

from __future__ import annotations

import json
import lzma
import math
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import videovae.tokens as tokens_mod
from videovae.engine import VideoGeometry
from videovae.quantizers import FSQ
from videovae.tokens import TokenFileError, TokenMeta, check_model_matches, load_tokens, save_tokens, token_stats

# 15 frames of 60x100, padded to 17 frames of 64x104 for a 4x8x8 model: tokens (1, g, 5, 8, 13)
GEOMETRY = VideoGeometry(frames=15, height=60, width=100, padded_frames=17, padded_height=64, padded_width=104)


def _meta(levels=(8, 5, 5, 5), groups=2, first_frame=False, **kw) -> TokenMeta:
    base = dict(
        family="causal-vae", config={"z_channels": 16, "levels": list(levels)}, weights_sha256="ab" * 32,
        levels=levels, groups=groups, bound="tanh", first_frame=first_frame, time_factor=4, space_factor=8,
        fps=24.0, geometry=GEOMETRY, source="clip.mp4", source_bytes=123456,
    )
    base.update(kw)
    return TokenMeta(**base)


def _tokens(meta: TokenMeta, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    latents = 4 if meta.first_frame else 5  # frame 0 of first-frame models is only in first_tokens
    out = {"tokens": torch.randint(0, meta.codebook_size, (1, meta.groups, latents, 8, 13), generator=gen)}
    if meta.first_frame:
        out["first_tokens"] = torch.randint(0, meta.codebook_size, (1, meta.groups, 1, 16, 26), generator=gen)
    return out


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize("first_frame", [False, True])
@pytest.mark.parametrize(
    ("levels", "dtype"), [((4, 4, 4, 4), torch.uint8), ((8, 5, 5, 5), torch.uint16), ((8, 8, 8, 8, 8, 8), torch.int32)]
)
def test_round_trip(tmp_path, levels, dtype, first_frame):
    meta = _meta(levels=levels, first_frame=first_frame)
    tensors = _tokens(meta)
    tensors["tokens"][0, 0, 0, 0, 0] = meta.codebook_size - 1  # the largest index survives the narrow dtype
    path = tmp_path / "clip.tokens.safetensors"
    save_tokens(path, tensors, meta)
    loaded, meta2 = load_tokens(path)
    assert meta2 == meta and isinstance(meta2.levels, tuple) and isinstance(meta2.geometry, VideoGeometry)
    assert sorted(loaded) == sorted(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == dtype
        assert torch.equal(loaded[name].to(torch.int64), t)
    assert _files(tmp_path) == ["clip.tokens.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        stored = json.loads(f.metadata()["videovae"])
    assert stored["format"] == "videovae-tokens" and stored["format_version"] == 1
    assert stored["geometry"]["padded_height"] == 64 and stored["levels"] == list(levels)
    assert stored["index_dtype"] == str(dtype).removeprefix("torch.")


def test_a_bare_tensor_is_the_tokens(tmp_path):
    meta = _meta()
    t = _tokens(meta)["tokens"].to(torch.int32)
    save_tokens(tmp_path / "t.safetensors", t, meta)
    loaded, _ = load_tokens(tmp_path / "t.safetensors")
    assert list(loaded) == ["tokens"] and torch.equal(loaded["tokens"].long(), t.long())


def test_tokens_decode_through_the_quantizer(tmp_path):
    meta = _meta(bound="isigmoid")
    q = meta.quantizer()
    assert isinstance(q, FSQ) and (q.levels, q.groups, q.bound) == ((8, 5, 5, 5), 2, "isigmoid")
    z = torch.randn(1, q.dim, 5, 8, 13, generator=torch.Generator().manual_seed(4))
    out = q(z)
    save_tokens(tmp_path / "t.safetensors", out.indices, meta)
    loaded, meta2 = load_tokens(tmp_path / "t.safetensors")
    assert torch.equal(meta2.quantizer().indices_to_codes(loaded["tokens"]), out.values)


# --- validation ----------------------------------------------------------------------------------


def _rewrite(path, tensors=None, meta_json=None, metadata=None):
    """Write a file by hand (bypassing save_tokens' checks)."""
    if metadata is None:
        metadata = {"videovae": meta_json}
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _json(meta: TokenMeta, **changes) -> str:
    """The metadata JSON with fields changed (None: removed)."""
    data = {**json.loads(meta.to_json()), **changes}
    return json.dumps({k: v for k, v in data.items() if v is not None})


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m, t: (t, _json(m, format="videovae-latents")), "not a videovae token"),
        (lambda m, t: (t, _json(m, format_version=99)), "version 99"),
        (lambda m, t: (t, "{not json"), "not valid JSON"),
        (lambda m, t: (t, _json(m, levels=None)), "incomplete"),
        (lambda m, t: (t, _json(m, levels=[8, 1])), "invalid FSQ"),
        (lambda m, t: (t, _json(m, space_factor=0)), "space_factor"),
        (lambda m, t: (t, _json(m, index_dtype="int32")), "index_dtype 'int32'"),
        (lambda m, t: ({"tokens": t["tokens"].to(torch.int64)}, m.to_json()), "expected torch.uint16"),
        (lambda m, t: ({"tokens": t["tokens"].to(torch.int32)}, m.to_json()), "expected torch.uint16"),
        (lambda m, t: ({"tokens": t["tokens"][:, :, :4]}, m.to_json()), r"shape \(1, 2, 4, 8, 13\)"),
        (lambda m, t: ({"tokens": t["tokens"][:, :1]}, m.to_json()), "metadata implies"),
        (lambda m, t: ({**t, "first_tokens": t["tokens"][:, :, :1]}, m.to_json()), "first_tokens"),
        (lambda m, t: ({**t, "latent": t["tokens"]}, m.to_json()), "unexpected tensors"),
        (lambda m, t: ({"tokens": torch.full((1, 2, 5, 8, 13), 1000, dtype=torch.uint16)}, m.to_json()),
         r"outside \[0, 1000\)"),
    ],
)
def test_bad_files_raise_naming_the_file(tmp_path, make, match):
    meta = _meta()
    good = {k: v.to(torch.uint16) for k, v in _tokens(meta).items()}
    tensors, meta_json = make(meta, good)
    path = tmp_path / "bad.safetensors"
    _rewrite(path, tensors, meta_json)
    with pytest.raises(TokenFileError, match=match) as info:
        load_tokens(path)
    assert str(path) in str(info.value)


def test_first_frame_files_need_first_tokens(tmp_path):
    meta = _meta(first_frame=True)
    tensors = {k: v.to(torch.uint16) for k, v in _tokens(meta).items()}
    _rewrite(tmp_path / "a.safetensors", {"tokens": tensors["tokens"]}, meta.to_json())
    with pytest.raises(TokenFileError, match="first_frame=True"):
        load_tokens(tmp_path / "a.safetensors")
    _rewrite(tmp_path / "b.safetensors", {**tensors, "first_tokens": tensors["first_tokens"][..., :20]}, meta.to_json())
    with pytest.raises(TokenFileError, match=r"'first_tokens' has shape \(1, 2, 1, 16, 20\)"):
        load_tokens(tmp_path / "b.safetensors")


def test_not_a_token_file(tmp_path):
    with pytest.raises(TokenFileError, match="no such token file"):
        load_tokens(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(TokenFileError, match="junk.safetensors: not a safetensors file"):
        load_tokens(tmp_path / "junk.safetensors")
    _rewrite(tmp_path / "plain.safetensors", {"tokens": torch.zeros(3, dtype=torch.uint8)}, metadata={"x": "y"})
    with pytest.raises(TokenFileError, match="plain.safetensors: not a videovae token file"):
        load_tokens(tmp_path / "plain.safetensors")


def test_geometry_that_does_not_fit_the_factors(tmp_path):
    meta = _meta(geometry=replace(GEOMETRY, padded_height=60))
    with pytest.raises(TokenFileError, match="space factor 8"):
        save_tokens(tmp_path / "t.safetensors", _tokens(_meta()), meta)
    assert _files(tmp_path) == []


def test_save_refuses_bad_tensors_before_writing(tmp_path):
    meta = _meta()
    good = _tokens(meta)
    with pytest.raises(TokenFileError, match=r"outside \[0, 1000\)"):
        save_tokens(tmp_path / "t.safetensors", {"tokens": good["tokens"] + 1000}, meta)
    with pytest.raises(TokenFileError, match="integer"):
        save_tokens(tmp_path / "t.safetensors", {"tokens": good["tokens"].float()}, meta)
    with pytest.raises(TokenFileError, match="first_frame=False"):
        save_tokens(tmp_path / "t.safetensors", {**good, "first_tokens": good["tokens"][:, :, :1]}, meta)
    assert _files(tmp_path) == []


# --- atomic write --------------------------------------------------------------------------------


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    meta = _meta()
    target = tmp_path / "t.safetensors"
    save_tokens(target, _tokens(meta, seed=1), meta)
    before = target.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tokens_mod, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_tokens(target, _tokens(meta, seed=2), meta)
    assert _files(tmp_path) == ["t.safetensors"]  # no temp file left
    assert target.read_bytes() == before  # the old file is untouched
    with pytest.raises(OSError, match="disk full"):
        save_tokens(tmp_path / "new.safetensors", _tokens(meta), meta)
    assert _files(tmp_path) == ["t.safetensors"]


# --- model check ---------------------------------------------------------------------------------


class _Config:
    def __init__(self, data):
        self.data = dict(data)

    def to_dict(self):
        return dict(self.data)

    @classmethod
    def from_dict(cls, data):
        return cls(data)


def _model(config=None, family="causal-vae", quantizer=None):
    return SimpleNamespace(
        family=family, config=_Config(config or {"z_channels": 16, "levels": [8, 5, 5, 5]}),
        config_class=_Config, quantizer=quantizer,
    )


def test_check_model_matches():
    meta = _meta()
    check_model_matches(meta, _model(quantizer=FSQ((8, 5, 5, 5), groups=2)), "ab" * 32, "t.safetensors")
    with pytest.raises(TokenFileError, match=r"t.safetensors: tokens come from a different model .*z_channels"):
        check_model_matches(meta, _model({"z_channels": 8, "levels": [8, 5, 5, 5]}), "ab" * 32, "t.safetensors")
    with pytest.raises(TokenFileError, match="different model"):
        check_model_matches(meta, _model(family="od-vae"), "ab" * 32, "t.safetensors")
    with pytest.raises(TokenFileError, match=r"t.safetensors: tokens were encoded with other weights \(file ababab"):
        check_model_matches(meta, _model(), "cd" * 32, "t.safetensors")
    with pytest.raises(TokenFileError, match="FSQ levels/groups/bound"):
        check_model_matches(meta, _model(quantizer=FSQ((8, 5, 5, 5), groups=2, bound="isigmoid")), "ab" * 32, "t")


# --- statistics ----------------------------------------------------------------------------------


def test_stats_exact_formulas():
    meta = _meta()  # 2 groups x 5 x 8 x 13 = 1040 tokens of log2(1000) bits over 15 x 60 x 100 original pixels
    tensors = _tokens(meta)
    stats = token_stats(tensors, meta)
    pixels = 15 * 60 * 100
    assert stats["tokens"] == 1040
    assert stats["tokens_per_second"] == pytest.approx(1040 / (15 / 24))
    assert stats["bits_per_token"] == pytest.approx(math.log2(1000))
    assert stats["raw_bpp"] == pytest.approx(1040 * math.log2(1000) / pixels)
    assert stats["source_bpp"] == pytest.approx(123456 * 8 / pixels)
    assert token_stats(tensors, meta, source_bytes=1000)["source_bpp"] == pytest.approx(8000 / pixels)
    assert token_stats(tensors, replace(meta, source_bytes=None))["source_bpp"] is None
    assert stats["compressed_bpp"] == pytest.approx(stats["compressed_bytes"] * 8 / pixels)


def test_stats_first_tokens_count():
    meta = _meta(first_frame=True)
    stats = token_stats(_tokens(meta), meta)
    assert stats["tokens"] == 2 * 4 * 8 * 13 + 2 * 16 * 26  # latents 1..4 plus frame 0 at 2x


def test_constant_tokens_compress_far_below_raw():
    meta = _meta()
    constant = {"tokens": torch.full((1, 2, 5, 8, 13), 417)}
    random = _tokens(meta)
    c, r = token_stats(constant, meta), token_stats(random, meta)
    assert c["raw_bpp"] == r["raw_bpp"]
    assert c["compressed_bpp"] < r["raw_bpp"] / 10  # 2080 identical bytes shrink to a frame header
    # random 10-bit indices stored in 16 bits: compression can not beat the entropy by much
    assert r["compressed_bpp"] > 0.9 * r["raw_bpp"]


def test_stats_fall_back_to_lzma(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_zstd(name, *args, **kwargs):
        if name == "zstandard":
            raise ImportError("no zstandard here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zstd)
    meta = _meta()
    tensors = _tokens(meta)
    stats = token_stats(tensors, meta)
    assert stats["compressor"] == "lzma-9"
    data = tensors["tokens"].to(torch.uint16).numpy().tobytes()
    assert stats["compressed_bytes"] == len(lzma.compress(data, preset=9))


def test_stats_use_zstd_when_installed():
    zstandard = pytest.importorskip("zstandard")
    meta = _meta()
    tensors = _tokens(meta)
    stats = token_stats(tensors, meta)
    assert stats["compressor"] == "zstd-19"
    data = tensors["tokens"].to(torch.uint16).numpy().tobytes()
    assert stats["compressed_bytes"] == len(zstandard.ZstdCompressor(level=19).compress(data))
