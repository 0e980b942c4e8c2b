"""DiffQ on a language model: a WikiText reader, a small causal transformer, a training loop.

DiffQ (Défossez et al., 2021, arXiv 2104.09987) is model-agnostic; its fairseq example compresses
a WikiText-103 transformer LM. ``python -m vitquant.lm --data DIR -p 1 -g 16`` trains this
package's small LM the same way and reports perplexity and model size (see ``docs/diffq.md``).
"""

from __future__ import annotations

from vitquant.lm.data import Corpus, Vocab, lm_batches, load_corpus, read_tokens
from vitquant.lm.model import LMConfig, TransformerLM
from vitquant.lm.train import LMTrainConfig, evaluate_lm, train_lm

__all__ = [
    "Corpus",
    "Vocab",
    "lm_batches",
    "load_corpus",
    "read_tokens",
    "LMConfig",
    "TransformerLM",
    "LMTrainConfig",
    "evaluate_lm",
    "train_lm",
]
