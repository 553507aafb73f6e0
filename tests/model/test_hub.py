"""Resolving folders, hub ids and sizes; what a hub download asks for (huggingface_hub patched: no network)."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import huggingface_hub
import pytest

from codegen_deploy.errors import CheckpointError
from codegen_deploy.model.hub import (
    cached_snapshot,
    check_model_path,
    choose_weight_files,
    is_hub_id,
    resolve_model,
    source_id,
)

SALESFORCE_FILES = [
    ".gitattributes",
    "README.md",
    "config.json",
    "pytorch_model.bin",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
]


def model_info(files: list[str]):
    """What huggingface_hub.model_info answers for a repo holding `files` (the parts we read)."""
    return SimpleNamespace(siblings=[SimpleNamespace(rfilename=name) for name in files])


def test_choose_weight_files_prefers_safetensors():
    assert choose_weight_files(["model.safetensors", "pytorch_model.bin"]) == ["model.safetensors"]
    sharded = [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "pytorch_model.bin",
    ]
    assert choose_weight_files(sharded) == sharded[:3]
    assert choose_weight_files(SALESFORCE_FILES) == ["pytorch_model.bin"]
    assert choose_weight_files(["README.md"]) == []


def test_local_folder_is_used_as_is(tmp_path):
    assert resolve_model(tmp_path) == tmp_path


@pytest.fixture(autouse=True)
def empty_hf_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache of its own for each test, and the network on (tests patch it out)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def test_size_downloads_only_needed_files(monkeypatch, tmp_path):
    calls = {}
    real_snapshot = huggingface_hub.snapshot_download

    def fake_info(repo_id, revision=None):
        calls["listed"] = repo_id
        return model_info(SALESFORCE_FILES)

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:  # the cache look-up runs for real (on the empty cache)
            return real_snapshot(repo_id, revision=revision, local_files_only=True, **kwargs)
        calls["allow"] = allow_patterns
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "model_info", fake_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert resolve_model(size="2B", data="multi") == tmp_path
    assert calls["listed"] == "Salesforce/codegen-2B-multi"
    assert "pytorch_model.bin" in calls["allow"] and "config.json" in calls["allow"]
    assert "README.md" not in calls["allow"] and ".gitattributes" not in calls["allow"]


def test_network_failure_is_one_clear_line(monkeypatch):
    def offline(repo_id, revision=None):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    with pytest.raises(CheckpointError, match=r"could not download Salesforce/codegen-350M-mono \(ConnectionError\)"):
        resolve_model("Salesforce/codegen-350M-mono")


def test_unknown_repo(monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(repo_id, revision=None):
        # Its constructor wants an HTTP response whose type varies between releases: skip it.
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(error, "404 Repository Not Found")
        raise error

    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    with pytest.raises(CheckpointError, match="is not on the hub"):
        resolve_model("someone/not-a-model")


def test_repo_without_weights(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id, revision=None: model_info(["README.md"]))
    with pytest.raises(CheckpointError, match="has no model.safetensors or pytorch_model.bin"):
        resolve_model("someone/dataset-like")


def test_bad_arguments(tmp_path):
    with pytest.raises(CheckpointError, match="not both"):
        resolve_model(tmp_path, size="350M")
    with pytest.raises(CheckpointError, match="no model given: pass --model"):
        resolve_model()
    with pytest.raises(CheckpointError, match="^no such folder: ./missing/folder/here: check the path"):
        resolve_model("./missing/folder/here")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a hub id"):
        resolve_model(tmp_path / "weights.bin")  # a file, not a folder


@pytest.mark.parametrize(
    ("text", "hub"),
    [
        ("Salesforce/codegen-350M-mono", True),
        ("someone/my_model.v2", True),
        ("exports/codegen-350M-mono", False),  # codegen-export's default output folder
        ("models/codegen-350M-mono", False),  # its first component exists here (made below)
        ("./codegen-350M-mono", False),
        ("../codegen-350M-mono", False),
        ("/abs/codegen-350M-mono", False),
        ("~/codegen-350M-mono", False),
        ("a/b/c", False),
        ("Salesforce/codegen-350M-mono/", False),
        ("Salesforce/..", False),
        ("codegen-350M-mono", False),
    ],
)
def test_which_names_are_hub_ids(text, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert is_hub_id(text) is hub


def test_a_missing_path_is_no_such_folder_without_the_network(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def offline(*args, **kwargs):
        raise AssertionError("a local path must not be looked up on the hub")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    for text in ("exports/codegen-350M-mono", "./x", "x/y/z", "codegen-350M-mono"):
        with pytest.raises(CheckpointError, match=f"^no such folder: {text}: check the path"):
            resolve_model(text)
        with pytest.raises(CheckpointError, match=f"^no such folder: {text} \\(given to --draft\\): check"):
            check_model_path(text, "--draft")
    check_model_path("Salesforce/codegen-350M-mono")  # a hub id: the download decides
    check_model_path(tmp_path)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(hf_home, repo_id="Salesforce/codegen-350M-mono", files=("config.json", "model.safetensors")):
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in files:
        (snapshot / name).write_text("{}")
    return snapshot


def no_network(*args, **kwargs):
    raise AssertionError("the network was used although the cache has the model")


def test_cached_model_is_used_without_network(monkeypatch, tmp_path):
    snapshot = fake_cache(tmp_path / "hf-home")
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    assert resolve_model("Salesforce/codegen-350M-mono") == snapshot
    assert resolve_model(size="350M") == snapshot
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("Salesforce/codegen-350M-mono") == snapshot


def test_incomplete_cache_is_not_used(tmp_path):
    fake_cache(tmp_path / "hf-home", files=("config.json", "model.safetensors.index.json"))
    assert cached_snapshot("Salesforce/codegen-350M-mono") is None  # the index names no shard that exists
    fake_cache(tmp_path / "hf-home", "a/b", files=("config.json",))
    assert cached_snapshot("a/b") is None


def test_offline_without_cache_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(CheckpointError, match="is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        resolve_model("Salesforce/codegen-2B-mono")


def test_source_is_absolute_for_folders(tmp_path, monkeypatch):
    (tmp_path / "ck").mkdir()
    monkeypatch.chdir(tmp_path)
    assert source_id("ck") == str(tmp_path / "ck")
    assert source_id("Salesforce/codegen-350M-mono") == "Salesforce/codegen-350M-mono"
    assert source_id(None, size="2B", data="multi") == "Salesforce/codegen-2B-multi"


def test_no_network_fails_at_once_without_retry_noise(monkeypatch, caplog):
    """A hub that cannot be reached (here: a closed local port) is one line at once, not ~25 s of retries."""
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", "http://127.0.0.1:9")  # nothing listens on the discard port
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"could not download Salesforce/codegen-350M-mono \(ConnectError\)"):
        resolve_model("Salesforce/codegen-350M-mono")
    assert time.monotonic() - start < 5
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]
