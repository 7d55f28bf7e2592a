"""The store deletes only what it wrote, reads only sane entries of what its caller expects, and never caches
or saves non-finite values: foreign folders, hostile entries (FIFOs, links, huge files, crafted tensors with
matching hashes), random damage, oversized --cache-size values."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from qimg.cache import FORMAT, MAX_BYTES, Store, _tensor_hash, parse_bytes
from qimg.cache_folder import TAG
from qimg.errors import QimgError

KEY = "cd" * 32
SPEC = {"latent": ("float32", (1, 16, 2, 2))}
GOOD = {"latent": torch.ones(1, 16, 2, 2)}


def foreign_folder(folder):
    """A model folder with shards and a LoRA three folders deep, an old .tmp file, and a file in the store's
    own layout: none of them the store's."""
    files = [folder / "Qwen-Image" / "transformer" / "model-00001.safetensors",
             folder / "loras" / "mine" / "a.safetensors",
             folder / "latent" / "ab" / f"{'ab' * 32}.safetensors", folder / "x" / "y" / ".0123456789abcdef.zz.tmp"]
    for file in files:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"\0" * 5000)
        os.utime(file, (0, 0))
    return files


def test_a_folder_of_other_files_is_left_alone_and_a_marked_qimg_subfolder_used(tmp_path):
    files = foreign_folder(tmp_path / "models")
    store = Store(tmp_path / "models", max_bytes=1000)  # every foreign file is above the cap, and old
    store.put("latent", KEY, {"latent": torch.zeros(16)})
    store.evict()
    assert all(f.read_bytes() == b"\0" * 5000 for f in files)
    assert (tmp_path / "models" / "qimg" / TAG).read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    assert not (tmp_path / "models" / TAG).exists()


@pytest.mark.parametrize("exists", [False, True])
def test_a_new_or_empty_folder_is_marked_and_used(tmp_path, exists):
    if exists:
        (tmp_path / "c").mkdir()
    store = Store(tmp_path / "c")
    store.put("latent", KEY, GOOD)
    assert "qimg" in (tmp_path / "c" / TAG).read_text()
    assert store.path("latent", KEY).parent.parent.parent == tmp_path / "c"
    assert torch.equal(Store(tmp_path / "c").get("latent", KEY, SPEC)[0]["latent"], GOOD["latent"])


def test_no_usable_folder_warns_once_and_writes_nothing(tmp_path):
    foreign_folder(tmp_path / "models")
    foreign_folder(tmp_path / "models" / "qimg")
    messages = []
    store = Store(tmp_path / "models", warn=messages.append)
    for _ in range(3):
        store.put("latent", KEY, GOOD)
    assert len(messages) == 1 and "did not write" in messages[0]
    assert not any(p.name == TAG for p in (tmp_path / "models").rglob("*"))


def test_unwritable_folder_warns_once_per_store(tmp_path):
    (tmp_path / "file").write_text("")
    messages = []
    store = Store(tmp_path / "file" / "cache", warn=messages.append)
    for _ in range(3):
        store.put("latent", KEY, GOOD)
    assert len(messages) == 1 and "cannot write to the cache" in messages[0]


@pytest.mark.parametrize("kind", ["prompt", "latent", "chain"])
def test_a_file_where_a_kind_s_folder_goes_is_warned_once_and_the_other_kinds_go_on(store, kind):
    store.put("latent" if kind != "latent" else "prompt", KEY, GOOD)  # claims the folder, another kind's entry
    (store.root / kind).write_text("someone's notes")
    for _ in range(3):
        assert store.get(kind, KEY, SPEC) is None
        store.put(kind, KEY, GOOD)
    assert store.messages == [f"{store.root / kind} is not a folder: no {kind} entries are cached; remove it to "
                              "cache them again"]
    assert (store.root / kind).read_text() == "someone's notes"
    other = "chain" if kind != "chain" else "latent"
    store.put(other, KEY, GOOD)
    assert store.get(other, KEY, SPEC) is not None and len(store.messages) == 1


def hostile(store, tmp_path, kind):
    path = store.path("latent", KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "outside":
        path.symlink_to(tmp_path / "precious.safetensors")
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(10 * 1000**3)  # sparse: no disk used
    return path


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "outside", "huge"])
def test_hostile_entry_is_removed_never_followed_and_recomputed(store, tmp_path, kind):
    store.put("latent", "00" * 32, GOOD)  # claims the folder
    precious = tmp_path / "precious.safetensors"
    precious.write_bytes(save(GOOD))
    path = hostile(store, tmp_path, kind)
    assert store.get("latent", KEY, SPEC) is None
    assert len(store.messages) == 1 and "damaged" in store.messages[0]
    assert not os.path.lexists(path) and precious.read_bytes() == save(GOOD)
    store.put("latent", KEY, GOOD)
    assert torch.equal(store.get("latent", KEY, SPEC)[0]["latent"], GOOD["latent"])


def test_a_folder_in_an_entry_s_place_is_removed_if_empty_and_never_breaks_the_store(store):
    store.put("latent", "00" * 32, GOOD)
    path = store.path("latent", KEY)
    path.mkdir(parents=True)
    assert store.get("latent", KEY, SPEC) is None
    assert store.messages[-1].endswith("; removed, recomputing") and not path.exists()
    store.put("latent", KEY, GOOD)
    assert torch.equal(store.get("latent", KEY, SPEC)[0]["latent"], GOOD["latent"])

    other = "ef" * 32
    full = store.path("latent", other)
    full.mkdir(parents=True)
    (full / "notes.txt").write_text("someone's")
    assert store.get("latent", other, SPEC) is None
    assert "left alone (a folder with files in it)" in store.messages[-1]
    store.put("latent", other, GOOD)  # not stored there, and the store still works
    assert (full / "notes.txt").read_text() == "someone's"
    store.put("latent", "12" * 32, GOOD)
    assert store.get("latent", "12" * 32, SPEC) is not None and not store.broken


@pytest.mark.parametrize("kind", ["fifo", "outside"])
def test_eviction_removes_links_and_specials_of_entry_names_but_never_their_targets(store, tmp_path, kind):
    store.put("latent", "00" * 32, GOOD)
    precious = tmp_path / "precious.safetensors"
    precious.write_bytes(b"mine")
    path = hostile(store, tmp_path, kind)
    store.evict()
    assert not os.path.lexists(path) and precious.read_bytes() == b"mine"


def test_a_linked_kind_folder_is_never_written_through(store, tmp_path):
    store.put("chain", "00" * 32, GOOD)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / KEY[:2]).mkdir(parents=True)
    (elsewhere / KEY[:2] / f"{KEY}.safetensors").write_bytes(b"mine")
    (store.root / "latent").symlink_to(elsewhere)
    assert store.get("latent", KEY, SPEC) is None
    store.put("latent", KEY, GOOD)
    store.evict()
    assert (elsewhere / KEY[:2] / f"{KEY}.safetensors").read_bytes() == b"mine"
    assert torch.equal(store.get("latent", KEY, SPEC)[0]["latent"], GOOD["latent"])


def craft(store, tensors, **record):
    """An entry written past put's checks, with a hash that matches its tensors."""
    record = {"format": FORMAT, "kind": "latent", "key": KEY, "sha256": _tensor_hash(tensors), **record}
    store.put("latent", "00" * 32, GOOD)
    path = store.path("latent", KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(save(tensors, metadata={"qimg": json.dumps(record)}))
    return path


@pytest.mark.parametrize("tensors, record", [
    ({"embed": torch.ones(1, 16, 2, 2)}, {}),
    ({"latent": torch.ones(1, 16, 2, 2), "x": torch.ones(1)}, {}),
    ({"latent": torch.ones(1, 4, 2, 2)}, {}),
    ({"latent": torch.ones(1, 16, 5, 5)}, {}),
    ({"latent": torch.ones(16, 2, 2)}, {}),
    ({"latent": torch.ones(1, 16, 2, 2, dtype=torch.float16)}, {}),
    ({"latent": torch.full((1, 16, 2, 2), float("nan"))}, {}),
    ({"latent": torch.full((1, 16, 2, 2), float("inf"))}, {}),
    (GOOD, {"format": FORMAT + 1}),
    (GOOD, {"format": None}),
    (GOOD, {"key": "ef" * 32}),
    (GOOD, {"kind": "prompt"}),
])
def test_entry_with_a_matching_hash_but_not_what_is_expected_is_removed(store, tensors, record):
    path = craft(store, tensors, **record)
    assert store.get("latent", KEY, SPEC) is None
    assert len(store.messages) == 1 and "damaged" in store.messages[0] and not path.exists()


def test_put_refuses_non_finite_tensors(store):
    store.put("latent", KEY, {"latent": torch.tensor([1.0, float("nan")])})
    assert not store.path("latent", KEY).exists() and "non-finite" in store.messages[0]


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4), st.integers(0, 10**6))
def test_randomly_damaged_entry_is_recomputed_or_unchanged(store, flips, cut):
    store.messages.clear()
    store.put("latent", KEY, GOOD)
    path = store.path("latent", KEY)
    data = bytearray(path.read_bytes())
    for at, xor in flips:
        data[at % len(data)] ^= xor
    path.write_bytes(bytes(data[: len(data) - cut % 50]))
    got = store.get("latent", KEY, SPEC)
    if got is None:
        assert len(store.messages) == 1 and "damaged" in store.messages[0] and not path.exists()
    else:  # the damage hit nothing that matters (the record's timestamp, say): the values are the stored ones
        assert torch.equal(got[0]["latent"], GOOD["latent"]) and store.messages == []


@pytest.mark.parametrize("text", ["9" * 400, "1e999", "inf", "nan", "1001TB", "9" * 40 + "T"])
def test_parse_bytes_refuses_huge_and_non_numbers(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789.kKmMgGtTbB eE-+inf"), max_size=40) | st.text(max_size=20))
def test_parse_bytes_gives_a_bounded_int_or_value_error(text):
    try:
        size = parse_bytes(text)
    except ValueError:
        return
    assert isinstance(size, int) and 0 <= size <= MAX_BYTES


@pytest.mark.subprocess
@pytest.mark.parametrize("size", ["abc", "9" * 400, "inf"])
def test_bad_cache_size_is_refused_before_torch_loads(size):
    probe = ("import sys; from qimg.cli.app import run; code = run(['generate', '-p', 'x', '--cache-size', "
             f"{size!r}]); print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-2:] == ["2", "False"]
    assert result.stderr.count("\n") == 1 and "--cache-size" in result.stderr


@pytest.mark.slow
def test_cache_size_zero_neither_reads_nor_writes(tiny_model_dir, tmp_path, cli, cache_dir):
    args = ["generate", "-p", "x", "-m", tiny_model_dir, "--size", "32x32", "--steps", "1", "--device", "cpu", "--json"]
    code, report, err = cli.json(*args, "-o", tmp_path / "1.png", "--cache-size", "0")
    assert code == 0 and report["prompt_cache"] == "off" and not cache_dir.exists(), err


def test_preset_may_not_choose_the_cache(tmp_path, cli):
    for key, value in [("cache_dir", "models"), ("cache_size", "1KB"), ("no_cache", "true")]:
        (tmp_path / "p.yaml").write_text(f"{key}: {value}\n")
        code, _, err = cli.json("generate", "-p", "x", "-m", tmp_path, "--preset", tmp_path / "p.yaml")
        assert code == 2 and f"unknown key {key!r}" in err and err.count("\n") == 1


def test_non_finite_result_stops_with_one_line_and_caches_and_saves_nothing(tiny_model_dir, tmp_path, cli,
                                                                             cache_dir, monkeypatch):
    from qimg.engine import latents

    monkeypatch.setattr(latents, "euler", lambda velocity, x, *args, **kwargs: torch.full_like(x, float("nan")))
    out = tmp_path / "o.png"
    code, _, err = cli.json("generate", "-p", "x", "-m", tiny_model_dir, "--size", "32x32", "--steps", "1",
                            "--device", "cpu", "--dtype", "float32", "-o", out)
    assert code == 1 and err.count("\n") == 1 and "non-finite values (NaN/inf) in float32; its weights" in err
    assert "--dtype" not in err  # float32 is not the cause: only float16's small range is
    assert not out.exists() and not list(cache_dir.glob("latent/*/*")) and not list(cache_dir.glob("chain/*/*"))


def test_a_non_finite_result_names_a_dtype_only_in_float16():
    from qimg.engine.latents import finite

    nan = torch.tensor([float("nan")])
    with pytest.raises(QimgError, match=r"in float16, whose range is small; use --dtype bfloat16 or float32$"):
        finite(nan, torch.float16)
    for dtype in (torch.bfloat16, torch.float32):
        with pytest.raises(QimgError, match="lower scale$"):
            finite(nan, dtype)


def test_chain_entry_of_another_size_is_not_what_a_chain_expects(tiny_model_dir):
    from qimg.cache import mismatch
    from qimg.engine.canvas import Canvas
    from qimg.engine.chain import expected
    from qimg.engine.engine import Engine

    specs = expected(Engine(tiny_model_dir, "cpu"), Canvas.start(np.zeros((128, 128, 3), np.uint8)))
    for fits, tensors in [(False, {"pixels": torch.zeros(40, 40, 3, dtype=torch.uint8)}),
                          (False, {"latent": torch.zeros(1, 16, 5, 5)}),
                          (True, {"pixels": torch.zeros(128, 128, 3, dtype=torch.uint8)}),
                          (True, {"latent": torch.zeros(1, 16, 16, 16)})]:
        assert any(mismatch(tensors, spec) is None for spec in specs) == fits


def test_a_bad_cache_size_from_the_environment_names_the_variable(monkeypatch, capsys, cli, tmp_path):
    from qimg.cli.app import run

    monkeypatch.setenv("QIMG_CACHE_SIZE", "9x")
    assert run(["generate", "-p", "x", "-o", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err == "qimg: error: QIMG_CACHE_SIZE '9x' is not a size like 2GB, 500MB or 123456\n"
