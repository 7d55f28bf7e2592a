"""The content-addressed store: round trips, damaged entries, least-recently-used eviction, keys, fingerprints."""

import os

import numpy as np
import pytest
import torch

from qimg.cache import Store, default_cache_dir, parse_bytes, pixel_key, prompt_key

KEY = "ab" * 32
ARANGE = {"latent": ("float32", (64,))}


def test_round_trip_keeps_values_dtypes_and_record(store):
    tensors = {"latent": torch.randn(1, 16, 4, 6), "embed": torch.randn(7, 64).to(torch.bfloat16)}
    store.put("latent", KEY, tensors, {"vae": "f00d"})
    got, record = store.get("latent", KEY, {"latent": ("float32", (1, 16, 4, 6)), "embed": ("bfloat16", (7, 64))})
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)
    assert record["vae"] == "f00d" and record["key"] == KEY and record["kind"] == "latent"
    assert store.messages == []


def test_missing_entry_is_none(store):
    assert store.get("latent", KEY, ARANGE) is None and store.messages == []


@pytest.mark.parametrize("damage", ["truncate", "flip a weight byte", "garbage"])
def test_damaged_entry_is_reported_removed_and_rebuilt(store, damage):
    t = {"latent": torch.arange(64, dtype=torch.float32)}
    store.put("latent", KEY, t)
    path = store.path("latent", KEY)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "flip a weight byte":
        data[-5] ^= 0x40
    else:
        data = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(data))
    assert store.get("latent", KEY, ARANGE) is None
    assert len(store.messages) == 1 and str(path) in store.messages[0] and "damaged" in store.messages[0]
    assert not path.exists()
    store.put("latent", KEY, t)
    assert torch.equal(store.get("latent", KEY, ARANGE)[0]["latent"], t["latent"])


def test_least_recently_used_entries_go_first(tmp_path):
    one = {"x": torch.zeros(250_000, dtype=torch.uint8)}  # ~250 KB an entry
    store = Store(tmp_path, max_bytes=800_000)
    keys = [f"{i:02x}" * 32 for i in range(3)]
    for age, key in zip((300, 200, 100), keys):
        store.put("latent", key, one)
        os.utime(store.path("latent", key), (0, 1_000_000 - age))  # oldest first
    # a hit makes the oldest the most recent
    assert store.get("latent", keys[0], {"x": ("uint8", (250_000,))}) is not None
    store.put("latent", "ff" * 32, one)  # a fourth entry overflows the cap: the least recently used goes
    present = [k for k in keys + ["ff" * 32] if store.path("latent", k).exists()]
    assert present == [keys[0], keys[2], "ff" * 32]
    assert store.size() <= 800_000


def test_entry_larger_than_the_cap_is_not_stored(tmp_path):
    store = Store(tmp_path, max_bytes=1000)
    store.put("latent", KEY, {"x": torch.zeros(1000)})
    assert store.get("latent", KEY, {"x": ("float32", (1000,))}) is None


def test_unwritable_cache_folder_warns_and_carries_on(tmp_path):
    (tmp_path / "file").write_text("")  # a cache folder under a file: no one can create it, root included
    messages = []
    Store(tmp_path / "file" / "cache", warn=messages.append).put("latent", KEY, {"x": torch.zeros(3)})
    assert len(messages) == 1 and "cannot write to the cache" in messages[0]


def test_keys_depend_on_exactly_their_inputs():
    img = np.zeros((16, 16, 3), np.uint8)
    other = img.copy()
    other[3, 4, 1] = 1
    assert pixel_key(img, "vae") == pixel_key(img.copy(), "vae")
    assert len({pixel_key(img, "vae"), pixel_key(other, "vae"), pixel_key(img, "vae2"),
                pixel_key(img.reshape(8, 32, 3), "vae")}) == 4
    assert len({prompt_key("a cat", "te"), prompt_key("a cat ", "te"), prompt_key("a cat", "te2")}) == 3


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("QIMG_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("QIMG_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "qimg"


@pytest.mark.parametrize("text, expected", [("2GB", 2 * 10**9), ("500m", 500 * 10**6), ("1.5G", 1.5e9),
                                            ("1234", 1234), ("10 kb", 10_000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "2XB", "-1GB", "10KiB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)
