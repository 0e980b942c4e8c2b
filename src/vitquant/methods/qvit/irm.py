"""Q-ViT's information rectification module (IRM) for queries and keys, and its inference fold.

Li et al., "Q-ViT: Accurate and Fully Quantized Low-bit Vision Transformer" (NeurIPS 2022,
arXiv 2210.06707), Eq. 10: before quantization, queries and keys are re-normalised by their mean
``μ`` and variance ``σ²`` and reshaped by learnable ``γ`` and ``β`` (per head and channel here), so
that their quantized distribution keeps maximal information (entropy): the entropy of a Gaussian
depends only on its variance, and the learnable parameters set the variance (and centre) of what
the quantizer sees, whatever the statistics of the incoming q and k. Three forms (``stats``,
``--irm-stats``):

* ``"dynamic"``: the paper's IRM. ``q̃ = γ · (q − μ(q)) / sqrt(σ²(q) + ε) + β`` with ``μ`` and
  ``σ²`` of the *current* q (k) tensor in every forward, training and inference alike: per image,
  head and channel over the tokens (an image's output does not depend on the rest of its batch).
  Every output channel then has mean ``β`` and standard deviation ``γ``, independent of the input.
  The paper writes ``β`` inside the normalisation (``γ(q − μ + β)/σ``); with statistics of the
  current tensor that would make the output mean ``γβ/σ(q)`` move with the input's spread, so
  ``β`` is applied after ``γ`` (BatchNorm's affine): ``γ`` and ``β`` are exactly the spread and
  centre the paper's entropy argument is about. Being a function of the current statistics, this
  form **cannot be folded** into the q/k projection.
* ``"channel"`` (default): ``γ · (q − μ + β) / σ`` with ``μ``, ``σ`` per head and channel fixed
  at calibration (buffers): a learnable per-channel affine map that starts as the identity
  (``γ = σ``, ``β = μ``) and moves each channel's distribution within the quantizer's grid; it
  does not re-normalise inputs whose statistics drift from the calibration batches. At inference
  it folds into the q and k rows of the projection (:func:`fold_irm`).
* ``"token"``: ``γ · (q − μ + β) / σ`` per token over the head dimension, the released code's
  ``LayerNorm(head_dim)`` on q and k. It discards each token's norm (the temperature of its
  attention row), so it changes a pretrained model's function: on the demo ViT, inserting it costs
  9 points of *float* top-1 before any quantization, whatever γ and β start at. Cannot fold.

To fine-tune from a float checkpoint the module is *calibrated* first: while ``calibrating`` it
passes its input through unchanged and records statistics; :meth:`finish_calibration` sets
``μ``/``σ`` (``"channel"``) and ``γ``/``β`` so that the rectified q and k start at the float ones
(exactly for ``"channel"``; ``"dynamic"``: ``γ``, ``β`` = the mean over images of each image's
``σ``, ``μ`` per head and channel; ``"token"``: ``γ = mean σ``, ``β = mean μ`` per head; these two
are exact only when every image, or token, has the same statistics).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitquant.errors import ConfigError
from vitquant.methods.qat.quantize import SCHEME_CHOICES, SCHEME_TRANSFORMS, QATModule, QATScheme

__all__ = [
    "IRM_STATS",
    "check_irm_stats",
    "InformationRectification",
    "insert_irm",
    "irm_modules",
    "fold_irm",
]

#: where IRM's μ and σ come from: fixed per channel (default), the current tensor's (the
#: paper's), per token (the released code's LayerNorm)
IRM_STATS = ("channel", "dynamic", "token")


def check_irm_stats(stats: str, name: str = "irm_stats") -> str:
    """``stats`` if it is one of :data:`IRM_STATS`; a ``ConfigError`` naming ``name`` if not."""
    if stats not in IRM_STATS:
        raise ConfigError(f"{name} must be one of {', '.join(IRM_STATS)}, not {stats!r}")
    return stats


class InformationRectification(QATModule):
    """Q-ViT's rectification of q or k, ``[B, heads, N, head_dim]`` in and out.

    ``"dynamic"``: ``γ · (x − μ(x)) / sqrt(σ²(x) + ε) + β``, statistics of the current ``x`` per
    image, head and channel over the tokens; ``"channel"`` and ``"token"``:
    ``γ · (x − μ + β) / sqrt(σ² + ε)`` (see the module docstring).

    Args:
        num_heads: heads of the attention.
        head_dim: channels per head.
        eps: ``ε`` of the variance.
        stats: ``"channel"`` (μ, σ per head and channel, fixed at calibration), ``"dynamic"``
            (the paper's: of the current tensor) or ``"token"`` (per token over the head
            dimension, as ``LayerNorm``).
    """

    def __init__(
        self, num_heads: int, head_dim: int, eps: float = 1e-5, stats: str = "channel"
    ) -> None:
        super().__init__()
        check_irm_stats(stats, "IRM stats")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.eps = eps
        self.stats = stats
        self.gamma = nn.Parameter(torch.ones(num_heads, 1, head_dim))
        self.beta = nn.Parameter(torch.zeros(num_heads, 1, head_dim))
        if stats == "channel":
            self.register_buffer("mean", torch.zeros(num_heads, 1, head_dim))
            self.register_buffer("std", torch.ones(num_heads, 1, head_dim))
        self.calibrating = False
        self._sums: Tensor | None = None
        self._n = 0

    def _token_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = x.mean(dim=-1, keepdim=True)
        return mu, torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + self.eps)

    def _image_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per image, head and channel over the tokens: ``[B, heads, 1, head_dim]`` each."""
        mu = x.mean(dim=-2, keepdim=True)
        return mu, torch.sqrt(x.var(dim=-2, unbiased=False, keepdim=True) + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self._observe(x.detach())
            return x
        if self.stats == "channel":
            return self.gamma * (x - self.mean + self.beta) / self.std
        if self.stats == "dynamic":
            mu, sd = self._image_stats(x)
            return self.gamma * (x - mu) / sd + self.beta
        mu, sd = self._token_stats(x)
        return self.gamma * (x - mu + self.beta) / sd

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        if self.stats == "channel":
            # per head and channel: count, sum, sum of squares over batch and tokens
            x64 = x.double()
            n = torch.full_like(x64[0, :, 0, :], x64.shape[0] * x64.shape[2])
            stats = torch.stack([n, x64.sum(dim=(0, 2)), x64.pow(2).sum(dim=(0, 2))])
        elif self.stats == "dynamic":
            mu, sd = self._image_stats(x.double())
            stats = torch.stack([sd.mean(dim=(0, 2)), mu.mean(dim=(0, 2))])  # [2, heads, dim]
        else:
            mu, sd = self._token_stats(x)
            stats = torch.stack([sd.mean(dim=(0, 2, 3)), mu.mean(dim=(0, 2, 3))])
        self._sums = stats if self._sums is None else self._sums + stats
        self._n += 1

    def start_calibration(self) -> None:
        """Passes inputs through unchanged and records their statistics."""
        self.calibrating = True
        self._sums, self._n = None, 0

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Sets the statistics, ``γ`` and ``β`` from what was recorded (unchanged if nothing)."""
        self.calibrating = False
        if self._sums is None:
            return
        if self.stats == "channel":
            n, s, s2 = self._sums.unbind(0)
            mu = s / n
            sd = torch.sqrt((s2 / n - mu.pow(2)).clamp_min(0) + self.eps)
            shape = self.mean.shape
            self.mean.copy_(mu.reshape(shape))
            self.std.copy_(sd.reshape(shape))
            self.gamma.copy_(sd.reshape(shape))
            self.beta.copy_(mu.reshape(shape))
        elif self.stats == "dynamic":
            sigma, mu = (self._sums / self._n).unbind(0)
            self.gamma.copy_(sigma.reshape(self.gamma.shape))
            self.beta.copy_(mu.reshape(self.beta.shape))
        else:
            sigma, mu = (self._sums / self._n).unbind(0)
            self.gamma.copy_(sigma.reshape(-1, 1, 1).expand_as(self.gamma))
            self.beta.copy_(mu.reshape(-1, 1, 1).expand_as(self.beta))
        self._sums, self._n = None, 0

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}, "
            f"stats={self.stats!r}"
        )


# --- inference fold ------------------------------------------------------------------------------
def insert_irm(model: nn.Module, scheme: QATScheme) -> None:
    """Puts an IRM on q and k of every attention layer (its identity ``q_norm``/``k_norm``).

    Raises:
        ConfigError: the model has no attention layer with identity ``q_norm``/``k_norm``.
    """
    count = 0
    for m in model.modules():
        if hasattr(m, "qk_matmul") and isinstance(getattr(m, "q_norm", None), nn.Identity):
            heads, dim = int(m.num_heads), int(m.head_dim)
            m.q_norm = InformationRectification(heads, dim, stats=scheme.irm_stats)
            m.k_norm = InformationRectification(heads, dim, stats=scheme.irm_stats)
            count += 1
    if count == 0:
        raise ConfigError("IRM needs attention layers with identity q_norm/k_norm")


def irm_modules(model: nn.Module) -> list[InformationRectification]:
    """The information rectification modules of ``model``."""
    return [m for m in model.modules() if isinstance(m, InformationRectification)]


SCHEME_TRANSFORMS["irm"] = insert_irm
SCHEME_CHOICES["irm_stats"] = IRM_STATS


def _qk_rows(attn: nn.Module) -> list[tuple[str, nn.Linear, slice]]:
    """``(norm name, projection, its output rows)`` of q and k of one attention module."""
    dim = int(attn.num_heads) * int(attn.head_dim)
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        return [("q_norm", qkv, slice(0, dim)), ("k_norm", qkv, slice(dim, 2 * dim))]
    rows = []
    for norm, proj in (("q_norm", "q_proj"), ("k_norm", "k_proj")):
        lin = getattr(attn, proj, None)
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"cannot fold IRM: {type(attn).__name__} has no qkv or {proj}")
        rows.append((norm, lin, slice(0, dim)))
    return rows


def _affine(irm: InformationRectification, where: str) -> tuple[Tensor, Tensor]:
    """``(a, c)`` with ``irm(x) = a·x + c`` per channel, flattened to ``[heads · head_dim]``."""
    if irm.stats != "channel":
        raise ConfigError(
            f"IRM at {where} uses the statistics of the current tensor (--irm-stats "
            f"{irm.stats}) and cannot be folded; only --irm-stats channel folds"
        )
    if irm.calibrating:
        raise ConfigError(f"IRM at {where} is calibrating: finish its calibration first")
    a = (irm.gamma / irm.std).detach()
    c = (irm.gamma * (irm.beta - irm.mean) / irm.std).detach()
    return a.reshape(-1), c.reshape(-1)


def _check_grid(lin: nn.Module, a: Tensor, where: str) -> None:
    """Raises unless scaling rows of ``lin``'s weight by ``a`` keeps its quantized weight exact."""
    from vitquant.quant.quantizers.base import gran_kind

    oq = getattr(lin, "output_quantizer", None)
    if oq is not None and (oq.active or oq.calibrating):
        raise ConfigError(f"cannot fold IRM at {where}: its projection quantizes its GEMM output")
    wq = getattr(lin, "weight_quantizer", None)
    if wq is None or not wq.is_calibrated:
        return
    g = wq.granularity
    if gran_kind(g) != "channel" or int(g.axis) % 2 != 0 or wq.scale.numel() != lin.out_features:
        raise ConfigError(
            f"cannot fold IRM at {where} exactly: its projection's weight steps are not per "
            "output channel"
        )
    if bool((a <= 0).any()):
        raise ConfigError(
            f"cannot fold IRM at {where} exactly: γ is negative or zero in some channels, which "
            "the weight grid cannot follow"
        )


@torch.no_grad()
def fold_irm(model: nn.Module) -> int:
    """Folds every fixed-statistics IRM (``"channel"``) into its attention's q/k projection.

    ``γ · (x − μ + β) / σ`` is ``a·x + c`` per channel, so the q (k) rows of ``qkv`` (or
    ``q_proj`` / ``k_proj``) become ``a·W`` and ``a·b + c`` (a bias is added if there was none)
    and ``q_norm`` / ``k_norm`` become ``nn.Identity``: q and k are unchanged up to rounding.
    A quantized projection keeps its quantized weight: its per-output-channel weight steps are
    scaled by ``a`` too (which needs ``a > 0``). Inference only (the learnable γ, β are gone).

    Returns:
        The number of IRM modules folded.

    Raises:
        ConfigError: an IRM is ``"dynamic"`` or ``"token"`` (statistics of the current tensor:
            they cannot fold), is calibrating, or its projection's quantized weight could not
            stay exact (steps not per output channel, a non-positive factor, a quantized GEMM
            output). Nothing is changed then.
    """
    plan = []
    for name, attn in model.named_modules():
        norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
        if not any(isinstance(m, InformationRectification) for m in norms):
            continue
        for norm, lin, rows in _qk_rows(attn):
            irm = getattr(attn, norm)
            if not isinstance(irm, InformationRectification):
                continue
            where = f"{name}.{norm}" if name else norm
            a, c = _affine(irm, where)
            _check_grid(lin, a, where)
            plan.append((attn, norm, lin, rows, a, c))
    for attn, norm, lin, rows, a, c in plan:
        a, c = a.to(lin.weight), c.to(lin.weight)
        lin.weight[rows] *= a[:, None]
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(lin.out_features).to(lin.weight))
        lin.bias[rows] = a * lin.bias[rows] + c
        wq = getattr(lin, "weight_quantizer", None)
        if wq is not None and wq.is_calibrated:
            wq.scale[rows] *= a.to(wq.scale)
            if wq.amax.numel() == wq.scale.numel():
                wq.amax[rows] *= a.to(wq.amax)
            if wq.amin.numel() == wq.scale.numel():
                wq.amin[rows] *= a.to(wq.amin)
        setattr(attn, norm, nn.Identity())
    return len(plan)
