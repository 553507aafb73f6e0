"""The generation loop: stopping, streaming, batches and bad inputs, on scripted tokens and a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from codegen_deploy.errors import InputError
from codegen_deploy.runtime.backends.torch import TorchSession
from codegen_deploy.runtime.generate import GenerationConfig, generate, stream
from codegen_deploy.runtime.sampling import SamplingConfig

MULTIBYTE = 'x = "héllo 🎉 你好世界"  # ünïcödé\nprint(x)\n'


# --- scripted tokens: exactly chosen outputs --------------------------------------------------------------


def test_stream_splits_multibyte_characters_cleanly(scripted_session, real_tokenizer):
    script = real_tokenizer.encode(MULTIBYTE)
    session = scripted_session([script], real_tokenizer.vocab_size + 9)
    pieces = list(stream(session, real_tokenizer, "a", max_new_tokens=len(script)))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE
    assert len(pieces) > 5  # it streamed, not one piece at the end
    full = generate(
        scripted_session([script], real_tokenizer.vocab_size + 9), real_tokenizer, "a", max_new_tokens=len(script)
    )
    assert full.text == MULTIBYTE and full.ids == script and full.completions[0].finish_reason == "length"


def test_stop_sequence_trims_text_and_stream_agrees(scripted_session, real_tokenizer):
    script = real_tokenizer.encode(MULTIBYTE)
    options = {"max_new_tokens": len(script), "stop": ["世界", "print"]}
    result = generate(scripted_session([script], 60000), real_tokenizer, "a", **options)
    assert result.text == 'x = "héllo 🎉 你好'
    assert result.completions[0].finish_reason == "stop"
    assert len(result.ids) < len(script)  # stopped early
    pieces = list(stream(scripted_session([script], 60000), real_tokenizer, "a", **options))
    assert "".join(pieces) == result.text


def test_stream_holds_back_a_possible_stop_start(scripted_session, real_tokenizer):
    script = real_tokenizer.encode("ab\n\ndef g(): pass\n\nprint")
    stop = ["\n\n\n"]  # never completes: the held-back "\n\n" must come out later
    pieces = list(stream(scripted_session([script], 60000), real_tokenizer, "a", max_new_tokens=len(script), stop=stop))
    assert "".join(pieces) == "ab\n\ndef g(): pass\n\nprint"


def test_eos_ends_a_row_and_finished_rows_feed_pad(scripted_session, real_tokenizer):
    eos = real_tokenizer.eos_token_id
    short = [*real_tokenizer.encode("ab"), eos]
    long = real_tokenizer.encode("abcdefgh ijkl")
    session = scripted_session([short, long], 60000)
    result = generate(session, real_tokenizer, ["x", "y z"], max_new_tokens=len(long))
    first, second = result.completions
    assert first.ids == short and first.text == "ab" and first.finish_reason == "eos"
    assert second.ids == long and second.finish_reason == "length"
    fed_to_first = [int(f[0, 0]) for f in session.fed[1:]]
    assert fed_to_first[len(short) - 1 :] == [eos] * (len(fed_to_first) - len(short) + 1)
    # The prompt batch was left-padded with the pad (= eos) id.
    assert int(session.fed[0][0, 0]) == eos


def test_all_rows_done_stops_the_loop(scripted_session, real_tokenizer):
    eos = real_tokenizer.eos_token_id
    session = scripted_session([[5, 6, eos]], 60000)
    result = generate(session, real_tokenizer, "a", max_new_tokens=50)
    assert result.ids == [5, 6, eos] and len(session.fed) == 3  # prefill + 2 steps


# --- bad inputs -----------------------------------------------------------------------------------------


def test_empty_prompt_is_refused(scripted_session, real_tokenizer):
    with pytest.raises(InputError, match="empty"):
        generate(scripted_session([[1]], 60000), real_tokenizer, "")
    with pytest.raises(InputError, match="prompt 1 is empty"):
        generate(scripted_session([[1], [1]], 60000), real_tokenizer, ["a", ""])


def test_prompt_longer_than_context_names_the_numbers(scripted_session, real_tokenizer):
    session = scripted_session([[1]], 60000, n_positions=16)
    with pytest.raises(InputError, match=r"12 tokens and max_new_tokens is 8: 20 exceeds the context of 16"):
        generate(session, real_tokenizer, [list(range(12))], max_new_tokens=8)


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -3},
        {"repetition_penalty": 0},
        {"max_new_tokens": 0},
        {"stop": [""]},
    ],
)
def test_bad_options_are_refused(scripted_session, real_tokenizer, options):
    with pytest.raises(InputError):
        generate(scripted_session([[1]], 60000), real_tokenizer, "a", **options)


# --- a tiny random model ------------------------------------------------------------------------------------


@pytest.fixture
def session(tiny_model):
    return TorchSession(tiny_model)


PROMPTS = ["def add(a, b):\n    return", "import os\n", "class Stack:\n    def push(self, item):\n        self"]


def test_batch_rows_equal_running_alone_greedy(session, tiny_tokenizer):
    batch = generate(session, tiny_tokenizer, PROMPTS, max_new_tokens=12)
    for prompt, completion in zip(PROMPTS, batch.completions, strict=True):
        alone = generate(session, tiny_tokenizer, prompt, max_new_tokens=12)
        assert completion.ids == alone.ids
        assert completion.text == alone.text


def test_batch_rows_equal_running_alone_sampled(session, tiny_tokenizer):
    options = {
        "max_new_tokens": 12,
        "temperature": 0.9,
        "top_k": 50,
        "top_p": 0.95,
        "seed": 11,
        "repetition_penalty": 1.2,
    }
    batch = generate(session, tiny_tokenizer, PROMPTS, **options)
    for prompt, completion in zip(PROMPTS, batch.completions, strict=True):
        assert completion.ids == generate(session, tiny_tokenizer, prompt, **options).ids


def test_seeded_sampling_is_reproducible(session, tiny_tokenizer):
    config = GenerationConfig(max_new_tokens=16, sampling=SamplingConfig(temperature=1.0, top_p=0.9, seed=5))
    a = generate(session, tiny_tokenizer, PROMPTS[0], config)
    b = generate(session, tiny_tokenizer, PROMPTS[0], config)
    assert a.ids == b.ids
    other = GenerationConfig(max_new_tokens=16, sampling=SamplingConfig(temperature=1.0, top_p=0.9, seed=6))
    assert generate(session, tiny_tokenizer, PROMPTS[0], other).ids != a.ids


def test_stream_equals_generate_on_a_model(session, tiny_tokenizer):
    result = generate(session, tiny_tokenizer, PROMPTS[1], max_new_tokens=24, temperature=1.0, seed=2)
    pieces = list(stream(session, tiny_tokenizer, PROMPTS[1], max_new_tokens=24, temperature=1.0, seed=2))
    assert "".join(pieces) == result.text and len(result.ids) == 24


def test_eos_and_stop_on_a_model(session, tiny_tokenizer):
    free = generate(session, tiny_tokenizer, PROMPTS[0], max_new_tokens=10)
    # Declare the 4th greedy token an eos: generation must end right there.
    ended = generate(session, tiny_tokenizer, PROMPTS[0], max_new_tokens=10, eos_token_ids=[free.ids[3]])
    assert ended.ids == free.ids[: free.ids.index(free.ids[3]) + 1]
    assert ended.completions[0].finish_reason == "eos"
    # A stop string taken from the middle of the free text cuts the text before it.
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = generate(session, tiny_tokenizer, PROMPTS[0], max_new_tokens=10, stop=[stop])
    assert stopped.text == text[: text.index(stop)] and stopped.completions[0].finish_reason == "stop"


def test_timings_are_filled(session, tiny_tokenizer):
    t = generate(session, tiny_tokenizer, PROMPTS[0], max_new_tokens=8).timings
    assert t.prefill_s > 0 and t.decode_steps == 7 and t.decode_tokens_per_s > 0
    assert set(t.to_dict()) >= {"prefill_s", "decode_tokens_per_s", "time_to_first_token_s"}


def test_generation_never_outgrows_the_context(tiny_model, tiny_tokenizer):
    session = TorchSession(tiny_model, max_context=40)
    prompt = list(range(30))
    assert len(generate(session, tiny_tokenizer, [prompt], max_new_tokens=10).ids) == 10
    with pytest.raises(InputError, match="exceeds the context of 40"):
        generate(session, tiny_tokenizer, [prompt], max_new_tokens=11)
    assert np.all(session.attention_mask == 1)


def test_unknown_option_is_refused(scripted_session, real_tokenizer):
    with pytest.raises(InputError, match="unknown generation option temprature"):
        generate(scripted_session([[1]], 60000), real_tokenizer, "a", temprature=1.0)


def test_logit_bias_and_penalties_change_greedy_tokens(session, tiny_tokenizer):
    """The server's sampling extras in the one loop: a -100 bias on each greedy token removes it from the
    output, a large presence penalty stops repeats, and an id outside the vocabulary is one line."""
    prompt = "def add(a, b):"
    plain = generate(session, tiny_tokenizer, prompt, max_new_tokens=8)
    banned = tuple((t, -100.0) for t in set(plain.ids))
    biased = generate(session, tiny_tokenizer, prompt, max_new_tokens=8, logit_bias=banned)
    assert not set(biased.ids) & set(plain.ids)
    penalised = generate(session, tiny_tokenizer, prompt, max_new_tokens=8, presence_penalty=2.0, frequency_penalty=2.0)
    if len(set(plain.ids)) < len(plain.ids):  # the plain greedy run repeats a token
        assert len(set(penalised.ids)) > len(set(plain.ids))
    with pytest.raises(InputError, match="outside the vocabulary"):
        generate(session, tiny_tokenizer, prompt, max_new_tokens=2, logit_bias=((10**6, 1.0),))


FIM_PREFIX, FIM_SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def codegen2(codegen2_checkpoint):
    from codegen_deploy.model.tokenizer import load_tokenizer
    from codegen_deploy.runtime import open_session

    with open_session("torch", codegen2_checkpoint, threads=1) as session:
        yield session, load_tokenizer(codegen2_checkpoint)


def test_a_suffix_fills_in_the_middle(codegen2):
    session, tokenizer = codegen2
    ids = tokenizer.infill(FIM_PREFIX, FIM_SUFFIX)
    config = GenerationConfig(max_new_tokens=6, eos_token_ids=(-1,))  # as long as asked: the tokens compare
    result = generate(session, tokenizer, FIM_PREFIX, config, suffix=FIM_SUFFIX)
    assert result.completions[0].prompt_ids == ids
    assert result.ids == generate(session, tokenizer, [ids], config).ids
    text = "".join(stream(session, tokenizer, FIM_PREFIX, config, suffix=FIM_SUFFIX))
    assert text == result.text
    # The middle ends at <eom>, which is not part of its text; the default end ids hold it.
    eom = tokenizer.fim.eom
    result = generate(session, tokenizer, FIM_PREFIX, suffix=FIM_SUFFIX, max_new_tokens=6, logit_bias=((eom, 100.0),))
    completion = result.completions[0]
    assert completion.ids == [eom] and completion.finish_reason == "eos" and completion.text == ""


def test_a_suffix_is_refused_where_it_cannot_be_filled_in(codegen2, session, tiny_tokenizer):
    with pytest.raises(InputError, match="cannot fill in the middle"):
        generate(session, tiny_tokenizer, FIM_PREFIX, suffix=FIM_SUFFIX, max_new_tokens=2)
    codegen2_session, tokenizer = codegen2
    with pytest.raises(InputError, match="one text prompt"):
        generate(codegen2_session, tokenizer, [FIM_PREFIX, FIM_PREFIX], suffix=FIM_SUFFIX, max_new_tokens=2)
