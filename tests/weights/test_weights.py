"""Strict safetensors loading: sharded folders, dtype on load, and one clear error per broken folder."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qimg.errors import QimgError
from qimg.weights.folders import load_module, safetensors_files


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


def weights(**changes):
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Net().state_dict().items()}
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


def load(folder, dtype=torch.float32):
    return load_module(Net, folder, dtype, torch.device("cpu"))


def test_single_file_loads_every_tensor(tmp_path):
    state = weights()
    save_file(state, tmp_path / "model.safetensors")
    net = load(tmp_path)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_sharded_folder_follows_its_index(tmp_path):
    state = weights()
    keys = sorted(state)
    shards = {"m-00001-of-00002.safetensors": keys[:2], "m-00002-of-00002.safetensors": keys[2:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, tmp_path / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    net = load(tmp_path)
    assert torch.equal(net.proj.weight, state["proj.weight"])


def test_missing_shard_is_named(tmp_path):
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-1.safetensors"}}))
    with pytest.raises(QimgError, match="m-1.safetensors"):
        safetensors_files(tmp_path)


def test_weights_arrive_in_the_target_dtype(tmp_path):
    save_file({k: v.bfloat16() for k, v in weights().items()}, tmp_path / "model.safetensors")
    net = load(tmp_path, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert not any(p.is_meta for p in net.parameters())


@pytest.mark.parametrize("change, message", [
    (dict(**{"norm.bias": None}), "missing weights norm.bias"),
    (dict(**{"extra.weight": torch.zeros(2)}), "unexpected weights extra.weight"),
    (dict(**{"proj.weight": torch.zeros(5, 4)}), r"proj.weight \(5, 4\) \(expected \(3, 4\)\)"),
])
def test_key_problems_name_the_keys(tmp_path, change, message):
    save_file(weights(**change), tmp_path / "model.safetensors")
    with pytest.raises(QimgError, match=message):
        load(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_non_finite_weight_is_refused_at_load_naming_its_file_and_key(tmp_path, bad, dtype):
    proj = weights()["proj.weight"]
    proj[1, 2] = bad
    save_file({k: v.to(dtype) for k, v in weights(**{"proj.weight": proj}).items()}, tmp_path / "model.safetensors")
    with pytest.raises(QimgError, match=r"model\.safetensors: tensor proj\.weight holds NaN or infinity; the file is "
                                        "damaged") as e:
        load(tmp_path, torch.bfloat16)
    assert str(tmp_path / "model.safetensors") in str(e.value)


def test_a_value_only_the_run_dtype_cannot_hold_is_not_the_files_fault(tmp_path):
    save_file(weights(**{"norm.bias": torch.full((3,), 1e6)}), tmp_path / "model.safetensors")
    assert load(tmp_path, torch.float16).norm.bias.isinf().all()  # float16 overflows: finite() at sampling says so
    half = {k: v.half() for k, v in weights(**{"norm.bias": torch.full((3,), 60000.0)}).items()}
    save_file(half, tmp_path / "model.safetensors")  # finite values whose float16 sum overflows
    assert load(tmp_path).norm.bias.tolist() == [60000.0] * 3


def test_a_checkpoint_of_zeros_is_refused(tmp_path):
    save_file({k: torch.zeros_like(v) for k, v in weights().items()}, tmp_path / "model.safetensors")
    with pytest.raises(QimgError, match="every weight is zero; the file is damaged"):
        load(tmp_path)
    save_file(weights(**{"proj.weight": torch.zeros(3, 4), "proj.bias": torch.zeros(3)}),
              tmp_path / "model.safetensors")
    load(tmp_path)  # some zero tensors are fine


def test_missing_weights_are_named_as_the_file_names_them(tmp_path):
    state = {"visual." + k: v for k, v in weights(**{"norm.bias": None}).items()}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(QimgError, match=r"missing weights visual\.norm\.bias$"):
        load_module(Net, tmp_path, torch.float32, torch.device("cpu"), remap=lambda k: k.removeprefix("visual."))


def test_pickle_weights_are_refused(tmp_path):
    torch.save(weights(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(QimgError, match="pickle.*safetensors only"):
        load(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(QimgError, match="no .safetensors"):
        load(tmp_path)
