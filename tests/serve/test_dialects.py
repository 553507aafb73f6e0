"""dialects.py alone: which prompts are fill-in-the-middle layouts (each rendered here as the client's source
renders it), which are not, and the suffix setting."""

from __future__ import annotations

import logging

import pytest

from codegen_deploy.errors import InputError
from codegen_deploy.serve import dialects
from codegen_deploy.serve.dialects import SUFFIX_UNSUPPORTED, check_suffix_mode, handle_suffix, strip_fim
from codegen_deploy.serve.schemas import OpenAIError

P = "\n# demo/fib.py\ndef fib(n):\n    if n < 2:\n        "
S = "\n    return fib(n - 1) + fib(n - 2)\n"

# (layout, prompt, the prefix to keep). Templates as written in Continue 1.3.40's AutocompleteTemplate.ts,
# llama.vscode 0.0.63's openai_prompt_template and Tabby's vllm.md.
LAYOUTS = [
    ("starcoder", f"<fim_prefix>{P}<fim_suffix>{S}<fim_middle>", P),
    ("starcoder", f"<file_sep>a.py\nx = 1<file_sep><fim_prefix>{P}<fim_suffix>{S}<fim_middle>", P),  # starcoder2
    ("qwen", f"<|fim_prefix|>{P}<|fim_suffix|>{S}<|fim_middle|>", P),
    (
        "qwen",  # Continue's Qwen repository-level template
        f"<|repo_name|>demo\n<|file_sep|>a.py\nx = 1\n<|file_sep|>fib.py\n<|fim_prefix|>{P}<|fim_suffix|>{S}"
        "<|fim_middle|>",
        P,
    ),
    ("qwen", f"Context:\n\nimport math\n<|fim_prefix|>{P}<|fim_suffix|>{S}<|fim_middle|>", P),  # llama.vscode
    ("seed-coder", f"<[fim-prefix]>{P}<[fim-suffix]>{S}<[fim-middle]>", P),
    ("codellama", f"<PRE> {P} <SUF>{S} <MID>", P),
    ("deepseek", f"<｜fim▁begin｜>{P}<｜fim▁hole｜>{S}<｜fim▁end｜>", P),
    ("codestral", f"[SUFFIX]{S}[PREFIX]{P}", P),
    (
        "codestral",
        f"[SUFFIX]{S}[PREFIX]+++++ a.py\nx = 1\n\n+++++ fib.py\n{P}",
        f"+++++ a.py\nx = 1\n\n+++++ fib.py\n{P}",
    ),
    (
        "codegeex",
        f"<|user|>\n###PATH:fib.py\n###LANGUAGE:Python\n###MODE:BLOCK\n<|code_suffix|>{S}<|code_prefix|>{P}"
        "<|code_middle|><|assistant|>\n",
        P,
    ),
    ("starcoder", f"<fim_prefix>{P}<fim_suffix><fim_middle>", P),  # at the end of a file
]


@pytest.mark.parametrize(("layout", "prompt", "prefix"), LAYOUTS, ids=[f"{c[0]}-{i}" for i, c in enumerate(LAYOUTS)])
def test_each_layout_keeps_the_text_before_the_cursor(layout, prompt, prefix):
    assert strip_fim(prompt) == (prefix, layout)


NOT_LAYOUTS = [
    P,
    "",
    # Code that talks about the sentinels, even a whole layout, but is not one.
    'TEMPLATE = "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"\nprint(TEMPLATE',
    f"<fim_prefix>{P}<fim_middle>",  # no suffix marker
    f"<fim_prefix>{P}<fim_suffix>{S}",  # not closed
    f"<fim_prefix>{P}<fim_suffix>{S}<fim_middle>\nmore code",  # not at the end
    f"<fim_prefix>{P}<fim_suffix>{S}# see <fim_middle> above\n<fim_middle>",  # a sentinel twice: ambiguous
    f"<|fim_prefix|>{P}<fim_suffix>{S}<|fim_middle|>",  # two layouts mixed
    f"<PRE>{P}<SUF>{S}<MID>",  # CodeLlama's layout has its spaces
    f"x = '[SUFFIX]'\ny = '[PREFIX]'\n{P}",  # codestral's layout starts the prompt
    f"[SUFFIX]{S}[PREFIX]{P}[PREFIX]",
]


@pytest.mark.parametrize("prompt", NOT_LAYOUTS)
def test_other_prompts_are_left_alone(prompt):
    assert strip_fim(prompt) == (prompt, None)


def test_suffix_modes(caplog):
    with pytest.raises(OpenAIError) as info:
        handle_suffix("error", S)
    assert (info.value.status, info.value.message, info.value.param) == (400, SUFFIX_UNSUPPORTED, "suffix")
    assert SUFFIX_UNSUPPORTED == "suffix is not currently supported"  # vLLM's words, which clients match
    with pytest.raises(OpenAIError):
        handle_suffix("error", "")  # as vLLM: any suffix field
    handle_suffix("error", None)
    dialects._noted.discard("suffix")
    with caplog.at_level(logging.WARNING, logger="codegen_deploy.serve.dialects"):
        for _ in range(3):
            handle_suffix("ignore", S)
    assert len(caplog.records) == 1 and "suffix" in caplog.records[0].getMessage()
    check_suffix_mode("ignore")
    with pytest.raises(InputError, match="ignore, error"):
        check_suffix_mode("fill")


def test_prompt_prefix_logs_once_per_layout(caplog):
    dialects._noted.clear()
    with caplog.at_level(logging.WARNING, logger="codegen_deploy.serve.dialects"):
        for _ in range(3):
            assert dialects.prompt_prefix(f"<fim_prefix>{P}<fim_suffix>{S}<fim_middle>") == P
            assert dialects.prompt_prefix(f"<PRE> {P} <SUF>{S} <MID>") == P
            assert dialects.prompt_prefix(P) == P
    assert sorted(r.getMessage().split(" fill-in")[0].split()[-1] for r in caplog.records) == ["codellama", "starcoder"]
