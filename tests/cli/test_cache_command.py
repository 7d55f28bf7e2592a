"""`qimg cache` shows the cache without changing it; `qimg cache clear` removes the store's own entries (one kind,
or all) and nothing else, while other runs may be reading them."""

import json
import os

import pytest

FAST = ["--steps", "1", "--seed", "3", "--device", "cpu", "--cfg", "4", "--size", "32x32"]


def shown(cli, folder) -> dict:
    code, out, err = cli("cache", "--cache-dir", folder, "--json")
    assert code == 0, err
    return json.loads(out)


def test_show_an_unused_cache_creates_nothing(tmp_path, cli):
    folder = tmp_path / "never"
    code, out, _ = cli("cache", "--cache-dir", folder)
    assert code == 0 and f"folder   {folder}  (nothing cached yet)" in out and "latent   0 entries" in out
    assert not folder.exists()
    assert shown(cli, folder)["in_use"] is False


@pytest.mark.slow
def test_counts_and_clear_by_kind(tiny_model_dir, tmp_path, cli):
    folder = tmp_path / "cache"
    out = tmp_path / "o.png"
    code, _, err = cli("generate", "-p", "x", "-m", tiny_model_dir, "-o", out, "--cache-dir", folder, *FAST)
    assert code == 0, err
    before = shown(cli, folder)
    assert before["entries"] == {"latent": 1, "prompt": 2, "edit": 0, "mask": 0}  # the prompt and the negative prompt
    assert before["bytes"] == sum(before["bytes_by_kind"].values()) > 0 and before["cap"] == 2 * 1000**3

    entry = next((folder / "prompt").rglob("*.safetensors"))
    with open(entry, "rb") as reader:  # a run reading an entry while it is cleared reads it whole
        code, _, err = cli("cache", "clear", "--kind", "prompt", "--cache-dir", folder)
        assert reader.read()[:8] and not entry.exists()
    assert code == 0 and err.startswith("removed 2 entries (prompt), ") and err.rstrip().endswith(f"from {folder}")
    assert shown(cli, folder)["entries"] == {"latent": 1, "prompt": 0, "edit": 0, "mask": 0}

    code, stdout, err = cli("generate", "-p", "x", "-m", tiny_model_dir, "-o", tmp_path / "p.png",
                            "--cache-dir", folder, "--json", *FAST)
    assert code == 0 and json.loads(stdout)["prompt_cache"] == "miss", err  # recomputed, and cached again
    code, _, err = cli("cache", "clear", "--cache-dir", folder)
    assert code == 0 and err.startswith("removed 3 entries, ")  # the same image: its latent once
    assert shown(cli, folder)["bytes"] == 0
    assert (folder / "CACHEDIR.TAG").exists()  # still the store's folder


def test_clear_never_touches_what_the_store_did_not_write(tmp_path, cli):
    folder = tmp_path / "models"
    shard = folder / "transformer" / "ab" / ("c" * 62 + "ab.safetensors")[2:]  # not in the store's layout
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"weights")
    lora = folder / "prompt" / "ab" / ("ab" + "0" * 62 + ".safetensors")  # the layout, but no CACHEDIR.TAG
    lora.parent.mkdir(parents=True)
    lora.write_bytes(b"a user's file")
    code, _, err = cli("cache", "clear", "--cache-dir", folder)
    assert code == 0 and err.startswith("removed 0 entries, 0 bytes, ")
    assert shard.read_bytes() == b"weights" and lora.read_bytes() == b"a user's file"


@pytest.mark.slow
def test_clear_leaves_writes_in_progress(tiny_model_dir, tmp_path, cli):
    folder = tmp_path / "cache"
    code, _, _ = cli("generate", "-p", "x", "-m", tiny_model_dir, "-o", tmp_path / "o.png",
                     "--cache-dir", folder, *FAST)
    entry = next((folder / "latent").rglob("*.safetensors"))
    writing = entry.parent / f".{'0' * 16}.abc123.tmp"  # another process's temporary file
    writing.write_bytes(b"half")
    os.utime(writing)
    assert code == 0 and cli("cache", "clear", "--cache-dir", folder)[0] == 0
    assert writing.exists() and not entry.exists()
