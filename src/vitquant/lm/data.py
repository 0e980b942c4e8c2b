"""WikiText-format corpora for the DiffQ language-model example.

Reads the token files of WikiText-103 / WikiText-2 (Merity et al., 2016, arXiv 1609.07843) as
DiffQ's fairseq example trains on them (Défossez et al., 2021, arXiv 2104.09987): the text is
already tokenised (words separated by spaces, ``<unk>`` for rare words, `` = Title = `` and
`` = = Section = = `` headings kept as tokens), and every line, blank lines included, ends with
an end-of-sentence token ``<eos>`` (fairseq's ``</s>``). The vocabulary comes from the training
split; words it lacks map to ``<unk>``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from vitquant.errors import DataError

__all__ = ["EOS", "UNK", "Vocab", "Corpus", "read_tokens", "load_corpus", "lm_batches"]

EOS = "<eos>"
UNK = "<unk>"
_SPLIT_FILES = {
    "train": ("wiki.train.tokens", "train.txt"),
    "valid": ("wiki.valid.tokens", "valid.txt"),
    "test": ("wiki.test.tokens", "test.txt"),
}


def read_tokens(path: str | Path) -> list[str]:
    """The tokens of a WikiText file: each line's words, then ``<eos>``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no WikiText file at {path}")
    tokens: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens.extend(line.split())
            tokens.append(EOS)
    if not tokens:
        raise DataError(f"{path} is empty")
    return tokens


@dataclass
class Vocab:
    """Word <-> id maps; ids are by decreasing training frequency (ties by first occurrence)."""

    words: list[str]

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, tokens: list[str], max_size: int = 0) -> Vocab:
        """Vocabulary of ``tokens`` (the ``max_size`` most frequent words if > 0, plus
        ``<unk>`` and ``<eos>``)."""
        counts = Counter(tokens)
        words = [w for w, _ in counts.most_common() if w not in (UNK, EOS)]
        if max_size > 0:
            words = words[: max(0, max_size - 2)]
        return cls([EOS, UNK, *words])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: list[str]) -> Tensor:
        """Token ids (int64); unknown words become ``<unk>``."""
        unk = self.index[UNK]
        return torch.tensor([self.index.get(t, unk) for t in tokens], dtype=torch.long)


@dataclass
class Corpus:
    """The three splits as id streams, and the vocabulary."""

    vocab: Vocab
    train: Tensor
    valid: Tensor
    test: Tensor


def _split_path(folder: Path, split: str) -> Path:
    for name in _SPLIT_FILES[split]:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder} has no {split} split (expected {' or '.join(_SPLIT_FILES[split])})")


def load_corpus(folder: str | Path, max_vocab: int = 0) -> Corpus:
    """Reads ``wiki.{train,valid,test}.tokens`` (or ``{train,valid,test}.txt``) in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"WikiText folder not found: {folder}")
    train = read_tokens(_split_path(folder, "train"))
    vocab = Vocab.build(train, max_vocab)
    return Corpus(
        vocab=vocab,
        train=vocab.encode(train),
        valid=vocab.encode(read_tokens(_split_path(folder, "valid"))),
        test=vocab.encode(read_tokens(_split_path(folder, "test"))),
    )


def lm_batches(
    ids: Tensor,
    seq_len: int,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(inputs, targets)`` batches of ``[B, seq_len]`` from non-overlapping windows.

    Windows start every ``seq_len`` tokens; targets are the inputs shifted by one. With a
    ``generator`` the windows are shuffled (training), otherwise they come in order and the last
    partial window is kept, so every token but the first is predicted exactly once (evaluation).
    """
    n = ids.numel() - 1
    if n < 1:
        raise DataError("the token stream is too short")
    starts = torch.arange(0, n, seq_len)
    full, tail = starts[starts + seq_len <= n], starts[starts + seq_len > n]
    if generator is not None:
        full = full[torch.randperm(full.numel(), generator=generator)]
        if not full.numel():  # a stream shorter than one window: train on what there is
            full, tail = tail, tail[:0]
        tail = tail[:0]
    for i in range(0, full.numel(), batch_size):
        chunk = full[i : i + batch_size].tolist()
        length = min(seq_len, n - max(chunk))
        x = torch.stack([ids[s : s + length] for s in chunk])
        y = torch.stack([ids[s + 1 : s + 1 + length] for s in chunk])
        yield x, y
    for s in tail.tolist():
        yield ids[s:n][None], ids[s + 1 : n + 1][None]
