"""Token choice: greedy, seeded sampling, the filters, the penalties, logit bias, logprobs and value checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from codegen_deploy.errors import InputError
from codegen_deploy.runtime.sampling import (
    SamplingConfig,
    adjust_logits,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    make_generators,
    sample,
    token_logprobs,
)


def _logits(batch=2, vocab=50, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32)


def test_greedy_is_argmax():
    logits = _logits()
    np.testing.assert_array_equal(sample(logits, SamplingConfig()), logits.argmax(-1))


def test_same_seed_same_tokens_different_seed_differs():
    logits = _logits(vocab=1000)
    config = SamplingConfig(temperature=1.5, seed=7)
    draw = lambda c: [sample(logits, c, g).tolist() for g in [make_generators(c, 2)] for _ in range(20)]  # noqa: E731
    assert draw(config) == draw(config)
    assert draw(config) != draw(SamplingConfig(temperature=1.5, seed=8))


def test_rows_of_a_batch_draw_like_alone():
    logits = _logits(batch=3, vocab=200)
    config = SamplingConfig(temperature=1.0, seed=3)
    batch_gens, alone_gens = make_generators(config, 3), make_generators(config, 1)
    for _ in range(10):
        batch = sample(logits, config, batch_gens)
        alone = sample(logits[1:2], config, alone_gens)
        assert batch[1] == alone[0]


@pytest.mark.parametrize("temperature", [5e-324, 1e-320, 1e-300, 1e-30])
@pytest.mark.parametrize("filters", [{}, {"top_p": 0.9}, {"top_k": 2}])
def test_a_tiny_temperature_samples_the_argmax_never_nan(temperature, filters):
    """softmax(logits / T) tends to the argmax as T -> 0: a tiny positive T (inside the API's 0..2) must not
    overflow logits / T to inf (inf - inf = NaN, which made every draw the last token)."""
    logits = np.array([[1.0, 3.0, 2.0, -4.0], [0.5, -1.0, 0.25, 0.0], [2.0, 7.0, 7.0, 1.0]], np.float32)
    config = SamplingConfig(temperature=temperature, seed=0, **filters)
    generators = make_generators(config, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warning from numpy either
        draws = [sample(logits, config, generators).tolist() for _ in range(60)]
    assert {d[0] for d in draws} == {1} and {d[1] for d in draws} == {0}
    assert {d[2] for d in draws} == {1, 2}  # a tie at the top: both, as the limit shares it


def test_a_small_temperature_still_samples_softmax_over_t():
    """Logits 1e-3 apart at T = 1e-3 are softmax([0, 1]): the shift that keeps tiny temperatures finite leaves
    the distribution as it was."""
    logits = np.array([[0.0, 1e-3]], np.float32)
    config = SamplingConfig(temperature=float(logits[0, 1]), seed=3)  # exactly the float32 gap: probs e / (1 + e)
    generators = make_generators(config, 1)
    ones = sum(int(sample(logits, config, generators)[0]) for _ in range(4000))
    assert ones / 4000 == pytest.approx(np.e / (1 + np.e), abs=0.03)


def test_top_k_keeps_k_largest():
    logits = np.array([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_top_k(logits, 2)
    assert np.isfinite(kept).sum() == 2 and np.isfinite(kept[0, [1, 3]]).all()
    config = SamplingConfig(temperature=1.0, top_k=2, seed=0)
    gens = make_generators(config, 1)
    assert {int(sample(logits, config, gens)[0]) for _ in range(200)} == {1, 3}


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs)
    assert np.isfinite(filter_top_p(logits, 0.5)).sum() == 1
    assert np.isfinite(filter_top_p(logits, 0.79)).sum() == 2
    assert np.isfinite(filter_top_p(logits, 0.81)).sum() == 3
    assert np.isfinite(filter_top_p(logits, 1.0)).sum() == 4
    config = SamplingConfig(temperature=1.0, top_p=0.79, seed=1)
    gens = make_generators(config, 1)
    assert {int(sample(logits, config, gens)[0]) for _ in range(200)} == {0, 1}


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = np.array([[2.0, -2.0, 2.0, -2.0]])
    seen = np.array([[True, True, False, False]])
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 2.0, -2.0]])
    # Greedy with a penalty moves off a repeated token.
    assert (
        sample(np.array([[3.0, 2.0]]), SamplingConfig(repetition_penalty=2.0), seen=np.array([[True, False]]))[0] == 1
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
        ({"logit_bias": ((3, float("nan")),)}, "logit_bias"),
    ],
)
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        SamplingConfig(**kwargs)


def test_logit_bias_moves_the_argmax_and_nothing_set_changes_nothing():
    logits = np.array([3.0, 1.0, 2.0], np.float32)
    assert adjust_logits(logits, SamplingConfig()) is logits
    biased = adjust_logits(logits, SamplingConfig(logit_bias=((1, 5.0), (0, -1.0))))
    np.testing.assert_array_equal(biased, [2.0, 6.0, 2.0])
    np.testing.assert_array_equal(logits, [3.0, 1.0, 2.0])  # the caller's logits are left alone
    assert sample(biased[None, :], SamplingConfig())[0] == 1


def test_presence_and_frequency_subtract_after_the_bias():
    logits = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
    counts = np.array([0, 1, 3, 0], np.float32)
    config = SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((3, 2.0),))
    # presence once per seen token, frequency per occurrence; the bias on an unseen token stays whole.
    np.testing.assert_allclose(adjust_logits(logits, config, counts), [1.0, 0.25, -0.25, 3.0])
    # No tokens generated yet: only the bias applies.
    np.testing.assert_allclose(adjust_logits(logits, config, None), [1.0, 1.0, 1.0, 3.0])


def test_token_logprobs_are_the_raw_distribution_ordered():
    logits = np.array([0.0, 2.0, 1.0, -1.0], np.float32)
    lp, top = token_logprobs(logits, 2, 3)
    expected = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    assert lp == pytest.approx(expected[2])
    assert list(top) == [1, 2, 0]  # most likely first
    assert list(top.values()) == pytest.approx(expected[[1, 2, 0]].tolist())
    assert np.exp(expected).sum() == pytest.approx(1.0)
    assert token_logprobs(logits, 3, 0) == (pytest.approx(expected[3]), {})
