"""Sampling filters against hand-made distributions and a brute-force nucleus."""

from __future__ import annotations

import math

import pytest
import torch

from train.sampling import SamplingConfig, filtered_logits, next_token, top_k_filter, top_p_filter


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float64).log().float()


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 2.0]])
    for k in (1, 2, 3, 4, 6):
        out = top_k_filter(logits, k)
        kept = torch.isfinite(out)
        assert int(kept.sum()) == k
        assert torch.isneginf(out[~kept]).all()
        torch.testing.assert_close(out[kept], logits[kept])  # kept logits are untouched, not rescaled
    # Ties at the boundary are broken towards the lower token id (torch.topk), never by keeping more.
    assert torch.isfinite(top_k_filter(logits, 2)).nonzero()[:, 1].tolist() == [1, 2]


def test_top_k_larger_than_vocabulary_keeps_all():
    logits = torch.randn(2, 5)
    assert torch.equal(top_k_filter(logits, 50), logits)


@pytest.mark.parametrize(
    "p, kept",
    [(0.01, [0]), (0.49, [0]), (0.51, [0, 1]), (0.79, [0, 1]), (0.81, [0, 1, 2]), (0.94, [0, 1, 2]),
     (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_smallest_set_reaching_p(p, kept):
    # Token order shuffled on purpose: the nucleus is by probability, not by id.
    probs = [0.15, 0.5, 0.05, 0.3]
    by_rank = [1, 3, 0, 2]  # ids from most to least probable
    out = top_p_filter(_logits(probs), p)
    assert sorted(torch.isfinite(out[0]).nonzero()[:, 0].tolist()) == sorted(by_rank[i] for i in kept)
    assert torch.isneginf(out[~torch.isfinite(out)]).all()


def _nucleus_reference(probs: list[float], p: float) -> set[int]:
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i])
    total = 0.0
    for size, token in enumerate(ranked, start=1):
        total += probs[token]
        if total >= p:
            return set(ranked[:size])
    return set(ranked)


def test_top_p_matches_brute_force_on_random_distributions():
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(300):
        logits = torch.randn(1, 12, generator=generator, dtype=torch.float64) * 2
        probs = torch.softmax(logits, -1)[0].tolist()
        p = float(torch.rand((), generator=generator, dtype=torch.float64)) * 0.99 + 0.01
        cumulative = sorted(probs, reverse=True)
        running = [sum(cumulative[: i + 1]) for i in range(len(cumulative))]
        if min(abs(r - p) for r in running) < 1e-5:
            continue  # p on a boundary: fp32 rounding may legitimately decide either way
        out = top_p_filter(logits.float(), p)
        assert set(torch.isfinite(out[0]).nonzero()[:, 0].tolist()) == _nucleus_reference(probs, p)
        checked += 1
    assert checked > 250


@pytest.mark.parametrize("tokens, p, kept", [(10, 0.6, 6), (3, 2 / 3, 2), (4, 0.5, 2), (5, 0.4, 2)])
def test_top_p_on_equal_tokens_whose_mass_reaches_p_exactly(tokens, p, kept):
    # The nucleus is complete with `kept` tokens; subtracting each token from the running sum
    # rounded their mass to just under p and let one more in.
    out = top_p_filter(torch.zeros(1, tokens), p)
    assert int(torch.isfinite(out).sum()) == kept


def test_filters_compose_and_only_write_minus_infinity():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.0]])
    out = filtered_logits(logits, SamplingConfig(temperature=0.5, top_k=4, top_p=0.9))
    finite = torch.isfinite(out)
    assert torch.isneginf(out[~finite]).all()
    # Scaled by the temperature after the row maximum is shifted to 0 (which leaves the softmax alone).
    torch.testing.assert_close(out[finite], ((logits - logits.max()) / 0.5)[finite])
    # Both filters apply, on the tempered scores: top-k keeps four, then top-p two (0.82 + 0.11 >= 0.9);
    # at temperature 1 top-p keeps three of the four. With a wide top-p, top-k decides.
    assert finite[0].nonzero()[:, 0].tolist() == [0, 1]
    wide = filtered_logits(logits, SamplingConfig(temperature=0.5, top_k=2, top_p=0.999))
    assert torch.isfinite(wide[0]).nonzero()[:, 0].tolist() == [0, 1]
    assert torch.isfinite(filtered_logits(logits, SamplingConfig(top_k=4, top_p=0.9))[0]).nonzero()[:, 0].tolist() == [0, 1, 2]
    # A zero logit that is kept stays a real score (it is not a mask value).
    assert not torch.isfinite(filtered_logits(torch.tensor([[5.0, 0.0, 0.0]]), SamplingConfig(top_k=1))[0, 1:]).any()


def test_temperature_zero_is_greedy():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(1))
    for config in (SamplingConfig(temperature=0), SamplingConfig(temperature=0, top_k=5, top_p=0.3)):
        assert torch.equal(next_token(logits, config, torch.Generator().manual_seed(3)), logits.argmax(-1))


def test_samples_only_from_the_kept_set_and_seed_reproduces():
    logits = torch.zeros(1, 100)  # uniform: any token could come out
    logits[0, 10:13] = 0.1
    config = SamplingConfig(temperature=1.0, top_k=3)
    draws = [int(next_token(logits, config, g)) for g in [torch.Generator().manual_seed(0)] for _ in range(200)]
    assert set(draws) <= {10, 11, 12} and len(set(draws)) == 3

    def sequence(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [int(next_token(torch.zeros(1, 1000), SamplingConfig(), generator)) for _ in range(20)]

    assert sequence(5) == sequence(5)
    assert sequence(5) != sequence(6)


def test_sampling_frequencies_follow_the_distribution():
    probs = [0.6, 0.3, 0.1]
    generator = torch.Generator().manual_seed(0)
    logits = _logits(probs).expand(20000, 3)
    counts = torch.bincount(next_token(logits, SamplingConfig(), generator), minlength=3).double() / 20000
    for observed, expected in zip(counts.tolist(), probs):
        assert math.isclose(observed, expected, abs_tol=0.015)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"top_p": 0.0}, "top_p must be in"), ({"top_p": 1.5}, "top_p must be in"), ({"top_k": 0}, "top_k must be"),
     ({"temperature": -1.0}, "temperature must be"), ({"vocab_size": 0}, "vocab_size must be")],
)
def test_bad_sampling_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_tiny_temperature_is_near_greedy_not_nan():
    # logits / 1e-40 overflows to +-inf and the softmax of inf - inf is NaN; the shifted form stays finite.
    logits = torch.tensor([[3.0, 2.0, -1.0], [0.5, 4.0, 4.0 - 1e-3]])
    probs = torch.softmax(filtered_logits(logits, SamplingConfig(temperature=1e-40)), dim=-1)
    assert not probs.isnan().any()
    assert torch.equal(next_token(logits, SamplingConfig(temperature=1e-40), torch.Generator().manual_seed(0)),
                       torch.tensor([0, 1]))
    # Below float32's range the temperature would round to 0 (0 / 0 = NaN): greedy.
    assert SamplingConfig(temperature=1e-300).greedy and not SamplingConfig(temperature=1e-30).greedy
    assert torch.equal(next_token(logits, SamplingConfig(temperature=1e-300)), torch.tensor([0, 1]))


def test_padded_vocabulary_ids_are_never_chosen():
    # The output layer is padded past the tokenizer's vocabulary; give the padding the highest logits.
    logits = torch.zeros(4, 16)
    logits[:, 10:] = 50.0
    logits[:, 3] = 1.0
    config = SamplingConfig(temperature=0, vocab_size=10)
    assert next_token(logits, config).tolist() == [3, 3, 3, 3]
    for config in (SamplingConfig(vocab_size=10), SamplingConfig(vocab_size=10, top_k=2, top_p=0.99)):
        out = filtered_logits(logits, config)
        assert torch.isneginf(out[:, 10:]).all() and torch.isfinite(out[:, 3]).all()
        draws = next_token(logits[:1].expand(2000, 16), config, torch.Generator().manual_seed(0))
        assert int(draws.max()) < 10
    # Without the size the padding wins, so the test above can fail.
    assert next_token(logits, SamplingConfig(temperature=0)).tolist() == [10, 10, 10, 10]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_are_refused_not_sampled(bad, temperature):
    logits = torch.tensor([[1.0, 2.0, 3.0, bad]])
    with pytest.raises(ValueError, match=r"^the logits hold NaN or \+inf"):
        next_token(logits, SamplingConfig(temperature=temperature))
    masked = torch.tensor([[1.0, float("-inf"), 3.0, 0.0]])  # -inf is a masked token, not an error
    assert int(next_token(masked, SamplingConfig(temperature=temperature), torch.Generator().manual_seed(0))[0]) != 1
