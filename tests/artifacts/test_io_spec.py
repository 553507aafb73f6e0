"""io_spec's one check of a graph's or engine's decoder I/O names: any order by default, one-line errors."""

from __future__ import annotations

import pytest

from codegen_deploy.artifacts import io_spec
from codegen_deploy.errors import ArtifactError


def test_the_decoders_names_pass_in_any_order():
    names_in, names_out = io_spec.decoder_input_names(2), io_spec.decoder_output_names(2)
    assert names_in[:3] == ["input_ids", "attention_mask", "position_ids"] and len(names_in) == 3 + 4
    assert names_out == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    io_spec.check_decoder_io(names_in, names_out, 2, "g")
    io_spec.check_decoder_io(reversed(names_in), reversed(names_out), 2, "g")
    with pytest.raises(ArtifactError, match=r"^g does not have the 2-layer decoder's outputs \(in another order"):
        io_spec.check_decoder_io(names_in, list(reversed(names_out)), 2, "g", ordered=True)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (3, r"inputs \(missing past_key_values.2.key, past_key_values.2.value\): export it again"),
        (1, r"inputs \(unexpected past_key_values.1.key, past_key_values.1.value\)"),
    ],
)
def test_wrong_names_are_one_line(layers, message):
    with pytest.raises(ArtifactError, match=message) as info:
        io_spec.check_decoder_io(io_spec.decoder_input_names(2), io_spec.decoder_output_names(2), layers, "g")
    assert "\n" not in str(info.value)
