"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Legend: B batch, V vocabulary.

Filters never multiply logits by a 0/1 mask (a zeroed logit is still a finite score, and
exp(0) = 1 gives the token probability mass); they set removed entries to -inf, so the softmax
gives them exactly zero. Order, as in most libraries: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    """0 = greedy (argmax), as is anything below float32's smallest normal number; otherwise logits
    are divided by it before the filters."""
    top_k: int | None = None
    """Keep the k highest logits (exactly k, ties broken by lower token id); None = all."""
    top_p: float | None = None
    """Keep the smallest set of most probable tokens whose probability reaches p, in (0, 1]; None = all."""
    vocab_size: int | None = None
    """The tokenizer's vocabulary size. The model's output layer is padded past it (to a multiple of
    64, for the GEMMs); ids at or above it decode to nothing, so they are never chosen. None = all."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not _positive_int_or_none(self.top_k):
            raise ValueError(f"top_k must be a positive integer or unset, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _positive_int_or_none(self.vocab_size):
            raise ValueError(f"vocab_size must be a positive integer or unset, got {self.vocab_size!r}")

    @property
    def greedy(self) -> bool:
        # Below float32's smallest normal number the fp32 logits cannot be divided by it (it rounds
        # to 0, and 0 / 0 is NaN); a temperature that small is greedy in all but name.
        return self.temperature < torch.finfo(torch.float32).tiny


def _positive_int_or_none(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def top_k_filter(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with all but the k largest entries of each row set to -inf (exactly k survive)."""
    if k >= logits_BV.shape[-1]:
        return logits_BV
    # Indices, not a threshold (a value tied with the k-th would survive too); a stable sort so
    # that ties go to the lower token id (torch.topk leaves their order unspecified).
    keep_BK = torch.sort(logits_BV, dim=-1, descending=True, stable=True).indices[..., :k]
    kept_BV = torch.zeros_like(logits_BV, dtype=torch.bool).scatter_(-1, keep_BK, True)
    return logits_BV.masked_fill(~kept_BV, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Logits with everything outside each row's nucleus set to -inf: the smallest set of most
    probable tokens whose total probability is >= p (the most probable token is always kept)."""
    if p >= 1:
        return logits_BV
    probs_BV = torch.softmax(logits_BV.float(), dim=-1)
    sorted_probs, order = torch.sort(probs_BV, dim=-1, descending=True, stable=True)
    # The sum of the tokens ranked above, as an exclusive cumulative sum: `cumsum - probs` rounds,
    # and where the mass reaches p exactly (ten equal tokens, p=0.6) it kept one token too many.
    mass_before = torch.cat([torch.zeros_like(sorted_probs[..., :1]), sorted_probs.cumsum(dim=-1)[..., :-1]], dim=-1)
    # A token is needed while the tokens ranked above it have not yet reached p.
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True
    kept_BV = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits_BV.masked_fill(~kept_BV, float("-inf"))


def without_padding(logits_BV: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Logits with the padded ids (>= vocab_size, rows of the output layer no token maps to) at -inf."""
    if vocab_size is None or vocab_size >= logits_BV.shape[-1]:
        return logits_BV
    return logits_BV.index_fill(-1, torch.arange(vocab_size, logits_BV.shape[-1], device=logits_BV.device), float("-inf"))


def filtered_logits(logits_BV: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature-scaled, top-k and top-p filtered logits (fp32) that sampling draws from."""
    logits_BV = without_padding(logits_BV.float(), config.vocab_size)
    if not config.greedy:
        # Shift the row maximum to 0 first: a tiny temperature would otherwise overflow every
        # logit to +-inf, and inf - inf in the softmax gives NaN. The shift leaves the softmax as it is.
        logits_BV = (logits_BV - logits_BV.amax(dim=-1, keepdim=True)) / config.temperature
    if config.top_k is not None:
        logits_BV = top_k_filter(logits_BV, config.top_k)
    if config.top_p is not None:
        logits_BV = top_p_filter(logits_BV, config.top_p)
    return logits_BV


def next_token(logits_BV: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row ([B] int64). Greedy takes the argmax (lowest id on ties); otherwise a draw
    from the softmax of the filtered logits with `generator`, so a seed reproduces the text.
    NaN or +inf logits (a model whose output is not finite) raise ValueError: argmax would pick a NaN,
    and a draw would fail on inf - inf. (-inf is a masked token, as the filters make them.)"""
    if bool(torch.isnan(logits_BV).any() | torch.isposinf(logits_BV).any()):
        raise ValueError("the logits hold NaN or +inf: the model's output is not finite")
    if config.greedy:
        return without_padding(logits_BV, config.vocab_size).argmax(dim=-1)
    probs_BV = torch.softmax(filtered_logits(logits_BV, config), dim=-1)
    return torch.multinomial(probs_BV.cpu(), 1, generator=generator).squeeze(-1).to(logits_BV.device)
