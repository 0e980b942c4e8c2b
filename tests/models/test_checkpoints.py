"""Checkpoint loading against timm: its Google ``.npz`` loader, ``resample_abs_pos_embed``,
``resample_patch_embed``, ``adapt_input_conv`` and ``checkpoint_filter_fn``; wrappers, prefixes,
safetensors, new heads and the one-line errors for bad files."""

from __future__ import annotations

import argparse
import logging
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

import vitquant
from vitquant.errors import CheckpointError, ConfigError
from vitquant.models import VisionTransformer
from vitquant.models.checkpoints import (
    convert_checkpoint,
    load_checkpoint,
    load_state_dict,
    resample_patch_embed,
    resolve_pretrained,
)

SMALL = dict(patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)
LOGGER = "vitquant.models.checkpoints"


def _randomize(model: nn.Module, std: float = 0.2) -> nn.Module:
    """Every parameter random (LayerNorm scales, biases, tokens too), so none is trivially 0/1."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor], skip: tuple[str, ...] = ()) -> None:
    keys = {k for k in a if not k.startswith(skip)}
    assert keys == {k for k in b if not k.startswith(skip)}
    for k in sorted(keys):
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


# --- a timm state dict written in Google's layout (the inverse of the loaders) ----------------
def to_google(
    sd: dict[str, Tensor], num_heads: int, big_vision: bool = False, pre_logits: bool = False
) -> dict[str, np.ndarray]:
    """Writes timm-named weights as a vit_jax ``.npz`` (or a scanned big_vision one)."""

    def a(t: Tensor) -> np.ndarray:
        return t.detach().float().numpy().copy()

    d = sd["cls_token"].shape[-1]
    hd = d // num_heads
    p = "params/" if big_vision else ""
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    g = {
        f"{p}embedding/kernel": a(sd["patch_embed.proj.weight"].permute(2, 3, 1, 0)),  # HWIO
        f"{p}embedding/bias": a(sd["patch_embed.proj.bias"]),
        f"{p}cls": a(sd["cls_token"]),
        f"{p}Transformer/encoder_norm/scale": a(sd["norm.weight"]),
        f"{p}Transformer/encoder_norm/bias": a(sd["norm.bias"]),
        f"{p}head/kernel": a(sd["head.weight"].T),
        f"{p}head/bias": a(sd["head.bias"]),
    }
    pos = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
    g[p + pos] = a(sd["pos_embed"])
    if pre_logits:
        g[f"{p}pre_logits/kernel"] = np.random.default_rng(0).normal(size=(d, d)).astype("f4")
        g[f"{p}pre_logits/bias"] = np.zeros(d, "f4")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    blocks: list[dict[str, np.ndarray]] = []
    for i in range(depth):
        b = lambda n, i=i: sd[f"blocks.{i}.{n}"]  # noqa: E731
        blk = {
            "LayerNorm_0/scale": a(b("norm1.weight")),
            "LayerNorm_0/bias": a(b("norm1.bias")),
            f"LayerNorm_{ln2}/scale": a(b("norm2.weight")),
            f"LayerNorm_{ln2}/bias": a(b("norm2.bias")),
            f"MultiHeadDotProductAttention_{mha}/out/kernel": a(
                b("attn.proj.weight").T.reshape(num_heads, hd, d)
            ),
            f"MultiHeadDotProductAttention_{mha}/out/bias": a(b("attn.proj.bias")),
        }
        for n, w, bias in zip(
            ("query", "key", "value"),
            b("attn.qkv.weight").chunk(3),
            b("attn.qkv.bias").chunk(3),
        ):
            blk[f"MultiHeadDotProductAttention_{mha}/{n}/kernel"] = a(w.T.reshape(d, num_heads, hd))
            blk[f"MultiHeadDotProductAttention_{mha}/{n}/bias"] = a(bias.reshape(num_heads, hd))
        for r in range(2):
            blk[f"MlpBlock_{mlp}/Dense_{r}/kernel"] = a(b(f"mlp.fc{r + 1}.weight").T)
            blk[f"MlpBlock_{mlp}/Dense_{r}/bias"] = a(b(f"mlp.fc{r + 1}.bias"))
        blocks.append(blk)
    if big_vision:  # one array per name, blocks stacked on axis 0
        for n in blocks[0]:
            g[f"{p}Transformer/encoderblock/{n}"] = np.stack([blk[n] for blk in blocks])
    else:
        for i, blk in enumerate(blocks):
            g.update({f"Transformer/encoderblock_{i}/{n}": v for n, v in blk.items()})
    return g


def _timm_vit(timm, **kw) -> nn.Module:
    return timm.models.vision_transformer.VisionTransformer(**{**SMALL, **kw})


@pytest.mark.parametrize("big_vision", [False, True])
def test_npz_matches_timm_loader(timm, tmp_path, big_vision: bool) -> None:
    src = _randomize(_timm_vit(timm, img_size=32, num_classes=1000))
    path = tmp_path / "vit.npz"
    np.savez(path, **to_google(src.state_dict(), 3, big_vision=big_vision))
    theirs = _timm_vit(timm, img_size=32, num_classes=1000).eval()
    timm.models.vision_transformer._load_weights(theirs, str(path))
    ours = VisionTransformer(img_size=32, num_classes=1000, **SMALL).eval()
    load_checkpoint(ours, path)
    _assert_same(ours.state_dict(), theirs.state_dict())
    _assert_same(ours.state_dict(), src.state_dict())  # the round trip is exact
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_npz_in21k_new_head(timm, tmp_path, caplog) -> None:
    src = _randomize(_timm_vit(timm, img_size=32, num_classes=21843))
    path = tmp_path / "in21k.npz"
    np.savez(path, **to_google(src.state_dict(), 3, pre_logits=True))
    theirs = _timm_vit(timm, img_size=32, num_classes=10).eval()
    timm.models.vision_transformer._load_weights(theirs, str(path))
    ours = vitquant.create_model(
        "vit_tiny_patch16_224", num_classes=10, **{**SMALL, "img_size": 32}
    )
    ours.eval()
    head = {k: v.clone() for k, v in ours.head.state_dict().items()}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_checkpoint(ours, path, reset_head=True)
    text = caplog.text
    assert "pre_logits" in text and "21843 classes" in text and "newly initialized" in text
    _assert_same(ours.state_dict(), theirs.state_dict(), skip=("head.",))
    _assert_same(ours.head.state_dict(), head)  # the fresh head is kept
    theirs.head.load_state_dict(ours.head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("img", "patch"), [(48, 8), (32, 4)])
def test_npz_resampling_matches_timm(timm, tmp_path, img: int, patch: int) -> None:
    src = _randomize(_timm_vit(timm, img_size=32, num_classes=1000), std=0.5)
    path = tmp_path / "vit.npz"
    np.savez(path, **to_google(src.state_dict(), 3))
    kw = {**SMALL, "patch_size": patch}
    theirs = timm.models.vision_transformer.VisionTransformer(img_size=img, **kw)
    timm.models.vision_transformer._load_weights(theirs, str(path))
    ours = VisionTransformer(img_size=img, **kw)
    load_checkpoint(ours, path)  # .npz: bilinear, no antialiasing, as Google and timm
    assert ours.pos_embed.shape[1] == (img // patch) ** 2 + 1
    _assert_same(ours.state_dict(), theirs.state_dict())


# --- .pth / safetensors ---------------------------------------------------------------------
def _nano(**kw) -> nn.Module:
    return _randomize(vitquant.create_model("vit_nano_patch4_28", **kw))


WRAPPERS = {
    "plain": lambda sd: sd,
    "model": lambda sd: {"model": sd, "epoch": 3},
    "state_dict": lambda sd: {"state_dict": sd, "optimizer": {"lr": torch.tensor(0.1)}},
    "module": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "orig_mod": lambda sd: {"model": {f"_orig_mod.module.{k}": v for k, v in sd.items()}},
    "deit_args": lambda sd: {"model": sd, "args": argparse.Namespace(lr=5e-4, model="deit")},
}


@pytest.mark.parametrize("wrap", sorted(WRAPPERS))
def test_pth_wrappers(tmp_path, wrap: str) -> None:
    src = _nano()
    path = tmp_path / "ck.pth"
    torch.save(WRAPPERS[wrap](src.state_dict()), path)
    ours = vitquant.create_model("vit_nano_patch4_28", checkpoint_path=str(path)).eval()
    _assert_same(ours.state_dict(), src.state_dict())
    _assert_same(load_state_dict(path), src.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src(x))


def test_legacy_pth_and_flat_npz(tmp_path) -> None:
    """The pre-1.6 (non-zip) torch format, an odd suffix, and an ``.npz`` with timm's names."""
    src = _nano()
    torch.save(src.state_dict(), tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    np.savez(tmp_path / "flat.npz", **{k: v.numpy() for k, v in src.state_dict().items()})
    for name in ("old.bin", "flat.npz"):
        ours = vitquant.create_model("vit_nano_patch4_28", checkpoint_path=str(tmp_path / name))
        _assert_same(ours.state_dict(), src.state_dict())


def test_safetensors_and_convert(tmp_path) -> None:
    src = _nano()
    st = tmp_path / "ck.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, st)
    ours = vitquant.create_model("vit_nano_patch4_28", checkpoint_path=str(st))
    _assert_same(ours.state_dict(), src.state_dict())
    pth = tmp_path / "ck.pth"
    torch.save({"model": src.state_dict()}, pth)
    out = convert_checkpoint(pth, tmp_path / "out" / "conv.safetensors")
    _assert_same(load_state_dict(out), src.state_dict())
    assert [p.name for p in out.parent.iterdir()] == ["conv.safetensors"]  # no temp file left
    with pytest.raises(ConfigError, match="safetensors"):
        convert_checkpoint(pth, tmp_path / "conv.pth")


def test_convert_keeps_metadata_and_is_atomic(tmp_path, monkeypatch) -> None:
    from safetensors import safe_open

    src = _nano()
    pth = tmp_path / "ck.pth"
    torch.save(src.state_dict(), pth)
    out = convert_checkpoint(pth, tmp_path / "conv.safetensors")
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "source": "ck.pth"}
    before = out.read_bytes()

    def crash(fd: int) -> None:  # the write dies before the rename
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(pth, out)
    assert out.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth", "conv.safetensors"]


def test_convert_npz(timm, tmp_path) -> None:
    src = _randomize(_timm_vit(timm, img_size=32, num_classes=10))
    path = tmp_path / "vit.npz"
    np.savez(path, **to_google(src.state_dict(), 3))
    out = convert_checkpoint(path, tmp_path / "vit.safetensors")
    _assert_same(load_state_dict(out), src.state_dict())


def test_pos_embed_224_to_384_matches_timm(timm, tmp_path) -> None:
    src = vitquant.create_model("deit_tiny_patch16_224")
    with torch.no_grad():
        src.pos_embed.normal_(0, 0.5)
    path = tmp_path / "deit.pth"
    torch.save({"model": src.state_dict()}, path)
    ours = vitquant.create_model("deit_tiny_patch16_224", img_size=384, checkpoint_path=str(path))
    ref = timm.layers.resample_abs_pos_embed(src.pos_embed, (24, 24), num_prefix_tokens=1)
    torch.testing.assert_close(ours.pos_embed, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.pos_embed[:, :1], src.pos_embed[:, :1])  # class token kept
    _assert_same(ours.state_dict(), src.state_dict(), skip=("pos_embed",))
    # timm's whole filter on the same checkpoint gives the same dict
    tm = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=384)
    sd = torch.load(path, weights_only=True)
    theirs = timm.models.vision_transformer.checkpoint_filter_fn(sd, tm)
    _assert_same(ours.state_dict(), theirs)


@pytest.mark.parametrize(
    ("name", "kw", "prefix"),
    [
        ("deit_nano_distilled_patch4_28", dict(img_size=36), 2),  # two prefix tokens
        ("vit_nano_patch4_28", dict(img_size=(28, 36)), 1),  # 7x7 -> 7x9 grid
        ("vit_nano_patch4_28", dict(patch_size=7), 1),  # kernel 4 -> 7, grid 7 -> 4
    ],
)
def test_grid_changes_match_timm(timm, tmp_path, name: str, kw: dict, prefix: int) -> None:
    src = _randomize(vitquant.create_model(name), std=0.5)
    path = tmp_path / "ck.pth"
    torch.save(src.state_dict(), path)
    ours = vitquant.create_model(name, checkpoint_path=str(path), **kw)
    grid = ours.patch_embed.grid_size
    ref = timm.layers.resample_abs_pos_embed(src.pos_embed, grid, num_prefix_tokens=prefix)
    torch.testing.assert_close(ours.pos_embed, ref, atol=1e-6, rtol=0)
    w = src.patch_embed.proj.weight
    ref_w = timm.layers.resample_patch_embed(w, ours.patch_embed.patch_size)
    torch.testing.assert_close(ours.patch_embed.proj.weight, ref_w, atol=1e-5, rtol=1e-5)
    skip = ("pos_embed", "patch_embed.proj.weight")
    _assert_same(ours.state_dict(), src.state_dict(), skip=skip)


def test_resample_patch_embed_preserves_projections() -> None:
    """FlexiViT's property: the new kernel on a resized patch = the old kernel on the patch."""
    w = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    x = torch.randn(8, 2, 4, 4, dtype=torch.float64)
    w7 = resample_patch_embed(w, (7, 7))
    x7 = F.interpolate(x, size=(7, 7), mode="bicubic", antialias=True)
    torch.testing.assert_close(F.conv2d(x7, w7), F.conv2d(x, w), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_matches_timm(timm, tmp_path, in_chans: int) -> None:
    src = _randomize(vitquant.create_model("vit_nano_patch4_32"))
    path = tmp_path / "ck.safetensors"
    save_file(src.state_dict(), path)
    ours = vitquant.create_model("vit_nano_patch4_32", in_chans=in_chans, checkpoint_path=path)
    from timm.models._manipulate import adapt_input_conv

    ref = adapt_input_conv(in_chans, src.patch_embed.proj.weight)
    torch.testing.assert_close(ours.patch_embed.proj.weight, ref)
    if in_chans == 1:  # a grey image embeds as the same image in RGB
        x = torch.randn(2, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), src(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_classes", [5, 0])
def test_num_classes_change(tmp_path, caplog, num_classes: int) -> None:
    src = _nano()
    path = tmp_path / "ck.pth"
    torch.save(src.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ours = vitquant.create_model(
            "vit_nano_patch4_28",
            num_classes=num_classes,
            checkpoint_path=str(path),
            reset_head=bool(num_classes),
        )
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert ("newly initialized" if num_classes else "num_classes=0") in msgs[0]
    _assert_same(ours.state_dict(), src.state_dict(), skip=("head.",))
    if num_classes:
        assert ours.head.weight.shape == (5, 32)
        assert not torch.equal(ours.head.weight, src.head.weight[:5])


# --- pretrained lookup -------------------------------------------------------------------------
def test_resolve_pretrained(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VITQUANT_HOME", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        vitquant.create_model("vit_nano_patch4_28", pretrained=True)
    assert str(tmp_path) in str(e.value) and "checkpoint_path" in str(e.value)
    assert "\n" not in str(e.value)
    src = _nano()
    torch.save(src.state_dict(), tmp_path / "vit_nano_patch4_28.pth")
    assert resolve_pretrained("vit_nano_patch4_28") == tmp_path / "vit_nano_patch4_28.pth"
    ours = vitquant.create_model("vit_nano_patch4_28", pretrained=True)
    _assert_same(ours.state_dict(), src.state_dict())


# --- bad input: one-line CheckpointError -----------------------------------------------------
def _write_truncated(kind: str, path: pathlib.Path) -> pathlib.Path:
    sd = _nano().state_dict()
    full = path / f"full.{kind}"
    if kind == "pth":
        torch.save(sd, full)
    elif kind == "safetensors":
        save_file(sd, full)
    else:
        np.savez(full, **{k: v.numpy() for k, v in sd.items()})
    data = full.read_bytes()
    out = path / f"cut.{kind}"
    out.write_bytes(data[: len(data) // 2])
    return out


def _one_line_error(path: pathlib.Path | str, name: str = "vit_nano_patch4_28") -> str:
    with pytest.raises(CheckpointError) as e:
        vitquant.create_model(name, checkpoint_path=str(path))
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("kind", ["pth", "safetensors", "npz"])
def test_truncated_files(tmp_path, kind: str) -> None:
    assert "corrupt or truncated" in _one_line_error(_write_truncated(kind, tmp_path))


def test_missing_garbage_and_empty_files(tmp_path) -> None:
    assert "not found" in _one_line_error(tmp_path / "nope.pth")
    assert "is a directory" in _one_line_error(tmp_path)
    (tmp_path / "garbage.pth").write_bytes(np.random.default_rng(0).bytes(1000))
    assert "corrupt or truncated" in _one_line_error(tmp_path / "garbage.pth")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert "corrupt or truncated" in _one_line_error(tmp_path / "empty.safetensors")
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    assert "never unpickles" in _one_line_error(tmp_path / "obj.npz")


def test_pickled_objects_refused_then_converted(tmp_path) -> None:
    src = _nano()
    path = tmp_path / "train.pth"
    torch.save({"model": src.state_dict(), "out_dir": pathlib.PurePosixPath("/runs/1")}, path)
    msg = _one_line_error(path)
    assert "pathlib.PurePosixPath" in msg and "--unsafe-trust-file" in msg
    with pytest.raises(CheckpointError):
        convert_checkpoint(path, tmp_path / "x.safetensors")
    out = convert_checkpoint(path, tmp_path / "x.safetensors", unsafe_trust_file=True)
    ours = vitquant.create_model("vit_nano_patch4_28", checkpoint_path=str(out))
    _assert_same(ours.state_dict(), src.state_dict())


def test_other_architecture(tmp_path) -> None:
    path = tmp_path / "nano.pth"
    torch.save(_nano().state_dict(), path)
    msg = _one_line_error(path, "vit_micro_patch4_28")  # 6 blocks of width 128
    assert "does not fit vit_micro_patch4_28" in msg
    assert "missing keys (blocks.2." in msg and "shape mismatches (" in msg
    assert "pos_embed (1, 50, 32) vs model (1, 50, 128)" in msg
    resnet = {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}
    torch.save({"state_dict": resnet}, tmp_path / "resnet.pth")
    msg = _one_line_error(tmp_path / "resnet.pth")
    n_missing = sum(1 for k in _nano().state_dict() if not k.startswith("head."))
    assert (
        f"{n_missing} missing keys" in msg and "2 unexpected keys (conv1.weight, fc.weight)" in msg
    )
    torch.save(
        _randomize(vitquant.create_model("deit_nano_distilled_patch4_28")).state_dict(),
        tmp_path / "deit.pth",
    )
    msg = _one_line_error(tmp_path / "deit.pth")
    assert "dist_token" in msg and "pos_embed (1, 51, 32) vs model (1, 50, 32)" in msg
