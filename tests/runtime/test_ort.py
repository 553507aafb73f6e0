"""The one onnxruntime import: a missing install is a one-line error that says how to install it."""

from __future__ import annotations

import builtins
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


def test_ctrl_c_during_the_import_is_an_interrupt_not_a_missing_install(monkeypatch):
    """pybind11 reports an exception raised while its module initialises (Ctrl-C here) as an ImportError."""
    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "onnxruntime":
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                raise ImportError("initialization failed") from e
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    with pytest.raises(KeyboardInterrupt):
        import_onnxruntime()
