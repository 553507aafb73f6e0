"""lm-evaluation-harness against codegen-serve: its `local-completions` model runs a log-likelihood task (defined
from local files, nothing downloaded) through the server's prompt log-probabilities, and gets the
log-likelihoods the model itself gives (codegen-eval's scoring, verify.quality)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from codegen_deploy.runtime import open_session
from codegen_deploy.runtime.sampling import log_softmax
from codegen_deploy.verify.quality import Window, window_logits

DOCS = [
    {"context": "def add(a, b):\n    return", "target": " a + b"},
    {"context": "import os\n\n\ndef main():\n", "target": "    print(os.getcwd())"},
    {"context": "for i in range(10):\n", "target": "    print(i)\n"},
    {"context": "class Stack:\n    def push(self, item):\n", "target": "        self.items.append(item)"},
]


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "code_ll.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "code_ll.yaml").write_text(
        "task: code_ll\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: "{{target}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tmp_path


@pytest.mark.slow
def test_lm_eval_local_completions_gets_the_models_log_likelihoods(server, fp32_export, task_dir, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = (
        f"model=tiny,base_url={server.base_url}/completions,tokenizer={fp32_export},"
        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1"
    )
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["code_ll"],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
    )
    samples = sorted(results["samples"]["code_ll"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    tokenizer = AutoTokenizer.from_pretrained(str(fp32_export))
    with open_session("onnxruntime", fp32_export, threads=1) as session:
        session.open_slots(1)
        for sample, doc in zip(samples, DOCS, strict=True):
            # lm-eval's split: the context's trailing whitespace goes with the target; the target's tokens are
            # those of the whole text after the context's.
            text = doc["context"].rstrip()
            context = tokenizer.encode(text)
            whole = tokenizer.encode(doc["context"] + doc["target"])
            assert whole[: len(context)] == context
            window = Window(0, 0, len(whole), len(context))
            lp = log_softmax(window_logits(session, whole, window))
            expected = float(lp[np.arange(len(whole) - len(context)), whole[len(context) :]].sum())
            got, greedy = sample["resps"][0][0]
            assert float(got) == pytest.approx(expected, abs=1e-3)
            assert bool(greedy) == bool((lp.argmax(-1) == whole[len(context) :]).all())
