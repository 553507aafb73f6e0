"""Opening an export checks it against its manifest: sizes, sha256 (by default), required entries, n_layer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from codegen_deploy.artifacts import io_spec
from codegen_deploy.artifacts import manifest as manifest_module
from codegen_deploy.artifacts.manifest import BackgroundVerification, check_file_name, read_manifest, sha256_file
from codegen_deploy.errors import ArtifactError
from codegen_deploy.runtime.backends import open_session


@pytest.fixture
def export_copy(tiny_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    return out


def flip_a_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(folder, change):
    path = folder / io_spec.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_flipped_bits_are_caught_by_sha256_not_by_size(export_copy):
    graph = export_copy / io_spec.GRAPH_FILE
    flip_a_byte(graph, graph.stat().st_size // 2)  # a weight's byte, same size: only the hash sees it
    read_manifest(export_copy, verify="size")
    with pytest.raises(ArtifactError, match="decoder.onnx does not match its sha256"):
        read_manifest(export_copy, verify="sha256")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        open_session("onnxruntime", export_copy)  # sha256 is the default on open
    open_session("onnxruntime", export_copy, verify="size").close()  # asked for: sizes only


def test_edited_hash_is_caught(export_copy):
    edit_manifest(export_copy, lambda m: m["files"]["config.json"].update(sha256="0" * 64))
    with pytest.raises(ArtifactError, match="config.json does not match its sha256"):
        open_session("onnxruntime", export_copy)


def test_truncated_file_is_caught_by_size(export_copy):
    graph = export_copy / io_spec.GRAPH_FILE
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="the file is truncated or changed"):
        read_manifest(export_copy)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("files"), "no valid 'files' entry"),
        (lambda m: m.pop("model_config"), "no valid 'model_config' entry"),
        (lambda m: m["files"]["config.json"].pop("sha256"), "config.json lacks bytes or sha256"),
        (lambda m: m["model_config"].pop("n_head"), "invalid model_config"),
        (lambda m: m["model_config"].update(n_layer=3), "cache inputs for 2 layers but .* n_layer 3"),
        (lambda m: m.pop("inputs"), "no inputs entry"),
    ],
)
def test_damaged_manifest_is_one_error(export_copy, change, message):
    edit_manifest(export_copy, change)
    with pytest.raises(ArtifactError, match=message):
        open_session("onnxruntime", export_copy, verify="size")


def test_graph_inputs_must_match_n_layer():
    names_in, names_out = io_spec.fused_input_names(2), io_spec.decoder_output_names(2)
    io_spec.check_decoder_io(names_in, names_out, 2, "g", fused=True)
    with pytest.raises(ArtifactError, match="cache inputs for 2 layers but the model config says n_layer 1"):
        io_spec.check_decoder_io(names_in, names_out, 1, "g", fused=True)


def test_background_verification_reports_in_the_caller(export_copy):
    manifest = read_manifest(export_copy)
    BackgroundVerification(export_copy, manifest).result()
    flip_a_byte(export_copy / "tokenizer.json", 10)
    with pytest.raises(ArtifactError, match="tokenizer.json does not match"):
        BackgroundVerification(export_copy, manifest).result()


def test_corrupted_fused_graph_is_one_error(fp32_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(fp32_export, out)
    (out / io_spec.FUSED_GRAPH_FILE).write_bytes(b"not a protobuf")
    with pytest.raises(ArtifactError, match="decoder_fused.onnx has .* bytes, the manifest says"):
        open_session("onnxruntime", out)
    edit_manifest(out, lambda m: m["files"][io_spec.FUSED_GRAPH_FILE].update(bytes=14))
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot open .*decoder_fused.onnx"):
        open_session("onnxruntime", out, verify="size")


# -- file names and symbolic links: a manifest reads nothing outside its folder -----------------------------


def point_at(folder, target, name=None):
    """List `target` (a file outside `folder`) in its manifest with the right size and sha256, under `name`
    (default: the relative path from the folder, ../../...)."""
    name = name or os.path.relpath(target, folder)
    entry = {"bytes": target.stat().st_size, "sha256": sha256_file(target)}
    edit_manifest(folder, lambda m: m["files"].update({name: entry}))
    return name


@pytest.mark.parametrize("how", ["relative", "absolute"])
def test_a_file_outside_the_folder_is_refused_before_it_is_read(export_copy, tmp_path, monkeypatch, how):
    secret = tmp_path / "secret.txt"
    secret.write_text("password\n")
    name = point_at(export_copy, secret, None if how == "relative" else str(secret))
    hashed = []
    real_sha256 = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda p, *a: hashed.append(p) or real_sha256(p, *a))
    for verify in ("size", "sha256"):
        with pytest.raises(ArtifactError, match="not a plain file name inside the export folder") as e:
            open_session("onnxruntime", export_copy, verify=verify)
        assert repr(name) in str(e.value) and "\n" not in str(e.value)
    assert not any(Path(p).resolve() == secret for p in hashed)


@pytest.mark.parametrize("key", ["graph_file", "data_file"])
def test_a_graph_file_entry_outside_the_folder_is_refused(export_copy, key):
    edit_manifest(export_copy, lambda m: m.update({key: "/etc/hostname"}))
    with pytest.raises(ArtifactError, match=f"its {key} entry names '/etc/hostname', not a plain file name"):
        read_manifest(export_copy, verify="none")


@pytest.mark.parametrize("name", ["", ".", "a/../b", "./config.json", "a//b", "C:config.json", "a\\..\\b", "x\0"])
def test_only_plain_relative_names(name):
    with pytest.raises(ArtifactError, match="not a plain file name"):
        check_file_name(name)
    check_file_name("tokenizer.json")
    check_file_name("sub/file.bin")


def test_a_symbolic_link_that_leaves_the_folder_is_refused(export_copy, tmp_path):
    outside = tmp_path / "elsewhere.json"
    (export_copy / "tokenizer.json").rename(outside)
    (export_copy / "tokenizer.json").symlink_to(outside)  # same bytes: only where it leads is wrong
    with pytest.raises(ArtifactError, match=r"tokenizer.json is a symbolic link to .*elsewhere.json, outside the"):
        open_session("onnxruntime", export_copy, verify="size")


def test_links_inside_the_folder_and_a_linked_folder_open(export_copy, tmp_path):
    (export_copy / "tokenizer-copy.json").write_bytes((export_copy / "tokenizer.json").read_bytes())
    (export_copy / "tokenizer.json").unlink()
    (export_copy / "tokenizer.json").symlink_to("tokenizer-copy.json")
    open_session("onnxruntime", export_copy).close()
    linked = tmp_path / "linked"
    linked.symlink_to(export_copy, target_is_directory=True)
    open_session("onnxruntime", linked).close()


# -- every file a graph reads is listed, so none goes unchecked ---------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "name"),
    [
        ("fp32_export", io_spec.GRAPH_FILE),
        ("fp32_export", io_spec.FUSED_GRAPH_FILE),
        ("fp32_export", io_spec.FUSED_DATA_FILE),
        ("fp16_export", io_spec.DATA_FILE),
    ],
)
def test_a_graph_file_missing_from_the_manifest_is_refused(request, tmp_path, fixture, name):
    out = tmp_path / "export"
    shutil.copytree(request.getfixturevalue(fixture), out)
    flip_a_byte(out / name, (out / name).stat().st_size // 2)  # corrupted, and its entry removed: unchecked
    edit_manifest(out, lambda m: m["files"].pop(name))
    for verify in ("size", "sha256"):
        with pytest.raises(ArtifactError, match=f"does not list {name}, which the .* graph reads"):
            open_session("onnxruntime", out, verify=verify)
