"""Training a small transformer LM with DiffQ (or the QAT / LSQ baselines) on WikiText.

The language-model side of DiffQ (Défossez et al., 2021, arXiv 2104.09987; its fairseq
WikiText-103 example): the loss is ``cross-entropy + penalty * quantizer.model_size()``, the
bit logits train with their own learning rate and no weight decay, validation runs the truly
quantized model, and every epoch reports perplexity and model size. DiffQ is model-agnostic:
the same :class:`vitquant.methods.diffq.DiffQuantizer` that compresses the ViTs compresses this LM.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vitquant._atomic import atomic_write
from vitquant.errors import ConfigError
from vitquant.lm.data import Corpus, lm_batches, load_corpus
from vitquant.lm.model import LMConfig, TransformerLM
from vitquant.methods.diffq import BaseQuantizer, DiffQuantizer, save_quantized_state
from vitquant.methods.diffq.method import DiffQMethodConfig, build_quantizer, size_report

__all__ = ["LMTrainConfig", "train_lm", "evaluate_lm"]


@dataclass
class LMTrainConfig:
    """Options of :func:`train_lm`.

    ``quant`` selects the method as ``vitquant diffq run`` does: ``penalty``/``group_size`` for
    DiffQ, ``bits`` for QAT, ``bits`` + ``lsq`` for LSQ; ``method="float"`` trains without any.
    """

    data: str
    out: str | None = None
    method: str = "diffq"
    quant: DiffQMethodConfig = field(default_factory=DiffQMethodConfig)
    dim: int = 128
    depth: int = 2
    heads: int = 4
    seq_len: int = 64
    dropout: float = 0.1
    max_vocab: int = 0
    epochs: int = 5
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    max_steps_per_epoch: int = 0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in ("float", "diffq"):
            raise ConfigError(f"method {self.method!r}: use 'diffq' or 'float'")
        if isinstance(self.quant, dict):
            self.quant = DiffQMethodConfig.from_dict(self.quant)  # type: ignore[assignment]
        if self.epochs < 1 or self.batch_size < 1 or self.seq_len < 1:
            raise ConfigError("epochs, batch_size and seq_len must be >= 1")


@torch.no_grad()
def evaluate_lm(model: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int) -> float:
    """Mean negative log-likelihood (nats per token) of ``ids``; perplexity is ``exp`` of it."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in lm_batches(ids, seq_len, batch_size):
        logits = model(x.to(device))
        total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum")
        count += y.numel()
    return float(total) / max(1, count)


def _line(record: dict[str, Any]) -> str:
    parts = [
        f"| epoch {record['epoch']:03d} | valid on 'valid' subset",
        f"loss {record['valid_loss']:.3f}",
        f"ppl {record['valid_ppl']:.2f}",
    ]
    if "model_size_mb" in record:
        parts.append(f"size {record['model_size_mb']:.4f} MB (x{record['compression']:.2f})")
    if "bits_per_weight" in record:
        parts.append(f"{record['bits_per_weight']:.2f} bits/w")
    return " | ".join(parts)


def train_lm(cfg: LMTrainConfig, corpus: Corpus | None = None, quiet: bool = False) -> dict:
    """Trains the LM, validates every epoch, tests at the end; returns the report.

    Writes to ``cfg.out`` (if set): ``history.jsonl``, ``report.json``, ``model.json`` (shape and
    options), ``vocab.txt`` and ``quantized.th`` (the packed state of the quantized model).

    Returns:
        ``{"test_loss", "test_ppl", "valid_ppl", "model_size_mb", "float_size_mb",
        "compression", "bits_per_weight", "history", ...}``.
    """
    torch.manual_seed(cfg.seed)
    corpus = corpus or load_corpus(cfg.data, cfg.max_vocab)
    device = torch.device(cfg.device)
    shape = LMConfig(
        vocab_size=len(corpus.vocab),
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        max_len=cfg.seq_len,
        dropout=cfg.dropout,
    )
    model = TransformerLM(shape).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    quantizer: BaseQuantizer | None = None
    if cfg.method == "diffq":
        quantizer = build_quantizer(model, cfg.quant)
        if isinstance(quantizer, DiffQuantizer):
            quantizer.setup_optimizer(opt, lr=cfg.quant.bits_lr)
        else:
            quantizer.setup_optimizer(opt)  # LSQ steps: the model's lr (Uniform: nothing)
    penalty = cfg.quant.penalty if isinstance(quantizer, DiffQuantizer) else 0.0
    n_windows = max(1, (corpus.train.numel() - 1) // cfg.seq_len)
    steps = math.ceil(n_windows / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out) if cfg.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "vocab.txt").write_text("\n".join(corpus.vocab.words) + "\n", encoding="utf-8")
        model_info = {"model": shape.to_dict(), "train": _config_dict(cfg)}
        (out / "model.json").write_text(json.dumps(model_info, indent=2))
    history = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.monotonic()
        model.train()
        total, seen = 0.0, 0
        for step, (x, y) in enumerate(lm_batches(corpus.train, cfg.seq_len, cfg.batch_size, gen)):
            if step >= steps:
                break
            x, y = x.to(device), y.to(device)
            ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss = ce + penalty * quantizer.model_size() if penalty else ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            sched.step()
            total, seen = total + float(ce.detach()) * y.numel(), seen + y.numel()
        valid = evaluate_lm(model, corpus.valid, cfg.seq_len, cfg.eval_batch_size)
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": total / max(1, seen),
            "valid_loss": valid,
            "valid_ppl": math.exp(valid),
            "epoch_time_s": time.monotonic() - t0,
        }
        if quantizer is not None:
            record.update(size_report(quantizer, model))
        history.append(record)
        if out:
            with open(out / "history.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if not quiet:
            print(_line(record), flush=True)
    test = evaluate_lm(model, corpus.test, cfg.seq_len, cfg.eval_batch_size)
    report: dict[str, Any] = {
        "test_loss": test,
        "test_ppl": math.exp(test),
        "valid_ppl": history[-1]["valid_ppl"],
        "params": sum(p.numel() for p in set(model.parameters())),
        "method": cfg.method,
        **({k: v for k, v in history[-1].items() if "size" in k or k == "compression"}),
        "history": history,
    }
    if quantizer is not None and isinstance(quantizer, DiffQuantizer):
        report["bits_per_weight"] = quantizer.bits_per_weight()
    if out:
        if quantizer is not None:
            save_quantized_state(quantizer, out / "quantized.th")
        text = json.dumps(report, indent=2, sort_keys=True).encode()
        atomic_write(out / "report.json", lambda f: f.write(text))
    if not quiet:
        size = f" | size {report['model_size_mb']:.4f} MB" if "model_size_mb" in report else ""
        print(f"| test | loss {test:.3f} | ppl {report['test_ppl']:.2f}{size}", flush=True)
    report["model"] = model
    report["quantizer"] = quantizer
    return report


def _config_dict(cfg: LMTrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["quant"] = cfg.quant.to_dict()
    return d
