"""A model folder's fingerprint: stable, and different for other weights even when only sampled chunks differ."""

import os

from qimg.weights.fingerprint import fingerprint


def test_fingerprint_tells_apart_other_weights_of_the_same_size_and_header(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weights = bytearray(os.urandom(3_000_000))
    (tmp_path / "model.safetensors").write_bytes(weights)
    before = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == before
    weights[300_000:] = os.urandom(2_700_000)  # a fine-tune: same size and header, other values everywhere
    (tmp_path / "model.safetensors").write_bytes(weights)
    assert fingerprint(tmp_path) != before
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert len({before, fingerprint(tmp_path)}) == 2
