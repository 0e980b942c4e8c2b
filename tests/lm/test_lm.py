"""The DiffQ language-model example on a small WikiText-format corpus written by the test."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from vitquant.errors import DataError
from vitquant.lm import (
    LMConfig,
    LMTrainConfig,
    TransformerLM,
    evaluate_lm,
    lm_batches,
    load_corpus,
    read_tokens,
)
from vitquant.lm.__main__ import main
from vitquant.methods.diffq import load_quantized_state, restore_quantized_state
from vitquant.methods.diffq.method import DiffQMethodConfig

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the <unk> robot"]
VERBS = ["eats", "sees", "likes", "paints", "finds"]
OBJECTS = ["an apple", "the river", "a small house", "the red car", "some bread"]


def _article(rng: random.Random, title: str, sentences: int) -> list[str]:
    lines = [" ", f" = {title} = ", " "]
    for section in range(2):
        lines += [f" = = Part {section} = = ", " "]
        para = []
        for _ in range(sentences):
            para.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} .")
        lines.append(" " + " ".join(para) + " ")
    return lines


def write_wikitext(folder: Path, seed: int = 0) -> Path:
    """A WikiText-shaped corpus: headings, blank lines, space-separated tokens, <unk>."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, articles in (("train", 40), ("valid", 4), ("test", 4)):
        lines = []
        for i in range(articles):
            lines += _article(rng, f"Story {split} {i}", 12)
        (folder / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_reader(tmp_path: Path) -> None:
    path = tmp_path / "wiki.train.tokens"
    path.write_text(" \n = Title = \n \n a <unk> b . \n")
    assert read_tokens(path) == ["<eos>", "=", "Title", "=", "<eos>", "<eos>"] + [
        "a",
        "<unk>",
        "b",
        ".",
        "<eos>",
    ]
    with pytest.raises(DataError, match="no WikiText file"):
        read_tokens(tmp_path / "missing")
    with pytest.raises(DataError, match="no valid split"):
        load_corpus(tmp_path)


def test_batches_cover_every_token_once() -> None:
    ids = torch.arange(103)
    seen = torch.cat([y.flatten() for _, y in lm_batches(ids, 10, 4)])
    assert torch.equal(seen, ids[1:])
    for x, y in lm_batches(ids, 10, 4, torch.Generator().manual_seed(0)):
        assert x.shape == (x.shape[0], 10) and torch.equal(x + 1, y)


def test_model_is_causal() -> None:
    model = TransformerLM(LMConfig(vocab_size=30, dim=32, depth=1, heads=2, max_len=16)).eval()
    ids = torch.randint(0, 30, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 30
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[0, :8], b[0, :8])
    assert not torch.allclose(a[0, 8:], b[0, 8:])
    assert model.head.weight is model.embed.weight


def _cfg(data: Path, out: Path | None, **quant: object) -> LMTrainConfig:
    return LMTrainConfig(
        data=str(data),
        out=str(out) if out else None,
        quant=DiffQMethodConfig(min_size=0.002, **quant),  # type: ignore[arg-type]
        dim=64,
        depth=1,
        heads=2,
        seq_len=32,
        epochs=2,
        batch_size=16,
        dropout=0.0,
    )


def test_diffq_trains_and_restores(tmp_path: Path) -> None:
    from vitquant.lm import train_lm

    data = write_wikitext(tmp_path / "wt")
    corpus = load_corpus(data)
    report = train_lm(
        _cfg(data, tmp_path / "run", penalty=5.0, group_size=16, bits_lr=0.1), corpus, True
    )
    vocab = len(corpus.vocab)
    assert report["valid_ppl"] < vocab / 4  # learnt the grammar, quantized
    assert report["model_size_mb"] < report["float_size_mb"] / 4
    assert report["bits_per_weight"] < 6  # from 8: the penalty lowered the bits
    assert len(report["history"]) == 2
    # the saved packed state rebuilds exactly the quantized model that was tested
    state = load_quantized_state(tmp_path / "run" / "quantized.th")
    fresh = TransformerLM(LMConfig(vocab_size=vocab, dim=64, depth=1, heads=2, max_len=32))
    restore_quantized_state(fresh, state)
    test = evaluate_lm(fresh, corpus.test, 32, 64)
    assert test == pytest.approx(report["test_loss"], rel=1e-6)
    assert math.exp(test) == pytest.approx(report["test_ppl"], rel=1e-6)


def test_cli_qat_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_wikitext(tmp_path / "wt", seed=1)
    argv = ["--data", str(data), "--dim", "32", "--depth", "1", "--heads", "2", "--epochs", "1"]
    argv += ["--seq-len", "16", "--max-steps-per-epoch", "5", "--min-size", "0.001"]
    assert main([*argv, "-b", "4"]) == 0
    out = capsys.readouterr().out
    assert "valid on 'valid' subset" in out and "size" in out and "| test |" in out
    assert main([*argv, "-b", "3", "--lsq"]) == 0
    assert main([*argv, "-p", "1", "-b", "4"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "nope")]) == 2
