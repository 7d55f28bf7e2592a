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


def test_pickle_weights_are_refused(tmp_path):
    torch.save(weights(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(QimgError, match="pickle.*safetensors only"):
        load(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(QimgError, match="no .safetensors"):
        load(tmp_path)
