"""One export per configuration, shared by the tests of this folder (tracing is the slow part)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def export_progress() -> list[str]:
    """Progress lines printed by the fp32 export."""
    return []


@pytest.fixture(scope="session")
def fp32_export(tiny_checkpoint, tmp_path_factory, export_progress) -> Path:
    """The tiny checkpoint exported in float32 (validated) through the Python API."""
    from codegen_deploy.export.pipeline import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-fp32"
    return export_model(tiny_checkpoint, out, progress=export_progress.append)


@pytest.fixture(scope="session")
def fp16_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported in float16 with external data forced, through the CLI."""
    from codegen_deploy.cli.export import main

    out = tmp_path_factory.mktemp("exports") / "tiny-fp16"
    code = main(["--model", str(tiny_checkpoint), "--output", str(out), "--fp16", "--external-data"])
    assert code == 0
    return out
