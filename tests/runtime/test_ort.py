"""The one onnxruntime import: a missing install is a one-line error that says how to install it."""

from __future__ import annotations

import sys

import pytest

from codegen_deploy.errors import MissingDependencyError
from codegen_deploy.runtime.ort import import_onnxruntime


def test_missing_onnxruntime_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"codegen-deploy\[cpu\]") as info:
        import_onnxruntime()
    assert "\n" not in str(info.value)
    with pytest.raises(MissingDependencyError, match=r"\), or export with --no-validate$"):
        import_onnxruntime("export with --no-validate")


def test_installed_onnxruntime_is_returned():
    ort = pytest.importorskip("onnxruntime")
    assert import_onnxruntime() is ort
