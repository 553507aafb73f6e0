"""The backend registry's refusals from the library: threads beyond the cores and missing paths, before any
model is loaded."""

from __future__ import annotations

import pytest

from codegen_deploy.config import check_threads, max_threads
from codegen_deploy.errors import CheckpointError, ConfigError
from codegen_deploy.runtime.backends import backend_options, open_session


def test_check_threads_takes_one_to_the_cores():
    assert check_threads(None) is None
    assert check_threads(1) == 1 and check_threads(max_threads()) == max_threads()
    for bad in (0, -1, max_threads() + 1, 100000, True, 1.5, "2"):
        with pytest.raises(ConfigError, match=f"threads must be a whole number from 1 to {max_threads()}"):
            check_threads(bad)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_backend_options_refuse_threads_beyond_the_cores(backend):
    assert backend_options(backend, threads=1) == {"threads": 1}
    with pytest.raises(ConfigError, match="not 100000"):
        backend_options(backend, threads=100000)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_open_session_refuses_threads_beyond_the_cores_before_loading(backend, tmp_path):
    # tmp_path is no model: had the threads passed, loading would have failed with another message.
    with pytest.raises(ConfigError, match="not 100000"):
        open_session(backend, tmp_path, threads=100000)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tensorrt"])
def test_open_session_says_no_such_folder(backend, tmp_path):
    missing = tmp_path / "exports" / "codegen-350M-mono"
    with pytest.raises(CheckpointError, match=f"^no such folder: {missing}: check the path"):
        open_session(backend, missing)
