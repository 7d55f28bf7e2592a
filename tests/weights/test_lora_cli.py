"""--lora and --shift end to end: the lightning-4 preset against QwenImagePipeline with Lightning's scheduler
config and the same LoRA fused, provenance in the metadata, presets' relative paths, `qimg info` on a LoRA, and
every refusal (one line, exit 2, nothing written)."""

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import lightning_lora, lora_layers
from PIL import Image
from safetensors.torch import save_file

from qimg.sampling import ScheduleConfig, flow_sigmas, shifted
from qimg.weights.fingerprint import fingerprint

# Qwen-Image-Lightning's scheduler (ModelTC generate_with_diffusers.py), as users pass it to diffusers
LIGHTNING = {"base_image_seq_len": 256, "base_shift": 1.0986122886681098, "invert_sigmas": False,
             "max_image_seq_len": 8192, "max_shift": 1.0986122886681098, "num_train_timesteps": 1000, "shift": 1.0,
             "shift_terminal": None, "stochastic_sampling": False, "time_shift_type": "exponential",
             "use_beta_sigmas": False, "use_dynamic_shifting": True, "use_exponential_sigmas": False,
             "use_karras_sigmas": False}
PROMPT = "a red circle on a blue background"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def layers(tiny_model_dir):
    return lora_layers(tiny_model_dir)


@pytest.fixture(scope="module")
def lora_file(layers, tmp_path_factory):
    file = tmp_path_factory.mktemp("lora") / "lightning.safetensors"
    save_file(lightning_lora(layers), file)
    return file


@pytest.mark.parity
@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("seq_len", [64, 1024, 4096, 16384])
def test_shift_gives_the_lightning_schedulers_sigmas(steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING)
    mu = calculate_shift(seq_len, LIGHTNING["base_image_seq_len"], LIGHTNING["max_image_seq_len"],
                         LIGHTNING["base_shift"], LIGHTNING["max_shift"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flow_sigmas(steps, seq_len, shifted(ScheduleConfig(), 3.0))  # from Qwen-Image's own config
    assert torch.equal(ours, scheduler.sigmas.float())


@pytest.mark.parity
def test_lightning_4_matches_the_pipeline_with_the_lora_fused(tiny_model_dir, reference_pipeline, lora_file,
                                                              cli, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    out, plain = tmp_path / "lightning.png", tmp_path / "plain.png"
    common = ["-m", tiny_model_dir, "-p", PROMPT, "--size", "64x64", "--seed", "5", "--device", "cpu", "--json"]
    code, report, err = cli("generate", "--preset", "lightning-4", "--lora", lora_file, "-o", out, *common)
    assert code == 0, err
    report = json.loads(report)
    assert (report["steps"], report["cfg"], report["shift"], report["calls"]) == (4, 1.0, 3.0, 4)  # one call a step
    sha = __import__("hashlib").sha256(lora_file.read_bytes()).hexdigest()
    assert report["loras"] == [dict(name=lora_file.name, sha256=sha, scale=1.0, format="lightning")]
    assert report["model_fingerprint"] != fingerprint(tiny_model_dir)

    r = reference_pipeline
    pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING), r.vae, r.text_encoder,
                             r.tokenizer, copy.deepcopy(r.transformer))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora()
    calls = []
    pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    ref = pipe(PROMPT, negative_prompt=" ", true_cfg_scale=1.0, width=64, height=64, num_inference_steps=4,
               generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert len(calls) == 4
    model_schedule = ScheduleConfig.from_dict(json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json")
                                                         .read_text()))
    assert torch.equal(flow_sigmas(4, 16, shifted(model_schedule, 3.0)), pipe.scheduler.sigmas.float())
    ours, ref = np.asarray(Image.open(out).convert("RGB")).astype(int), np.asarray(ref).astype(int)
    assert np.abs(ours - ref).max() <= 1 and ref.std() > 1

    code, _, err = cli("generate", "--steps", "4", "--cfg", "1", "--shift", "3", "-o", plain, *common)
    assert code == 0, err
    assert np.abs(np.asarray(Image.open(plain)).astype(int) - ours).mean() > 2  # the LoRA made a difference


def test_preset_lora_paths_are_relative_to_the_preset(tiny_model_dir, lora_file, cli, tmp_path, monkeypatch):
    folder = tmp_path / "presets"
    (folder / "loras").mkdir(parents=True)
    (folder / "loras" / "style.safetensors").write_bytes(lora_file.read_bytes())
    (folder / "mine.yaml").write_text("steps: 1\nlora: [loras/style.safetensors:0.5]\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.png"
    code, report, err = cli("generate", "--preset", folder / "mine.yaml", "-m", tiny_model_dir, "-p", "x",
                            "--size", "32x32", "--device", "cpu", "-o", out, "--json")
    assert code == 0, err
    (entry,) = json.loads(report)["loras"]
    assert (entry["name"], entry["scale"]) == ("style.safetensors", 0.5)
    assert json.loads(Image.open(out).text["qimg"])["loras"] == [entry]


def test_info_on_a_lora(lora_file, cli):
    code, out, err = cli("info", lora_file, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["format"], info["rank"], info["alpha"], info["file"]) == ("lightning", 8, 4.0, lora_file.name)
    assert info["modules"] == 34 and "transformer_blocks.*.img_mod.1 x2" in info["targets"]


def test_a_lora_whose_header_length_ends_in_0x80_is_no_pickle(layers, cli, tmp_path):
    """A safetensors file starts with its header's length, low byte first: 0x80, a pickle's first opcode, in one
    file of 256, and the next byte may be 2 to 5, a pickle's protocol. Its header parses: it is a LoRA."""
    file, (out, inp) = tmp_path / "padded.safetensors", layers["img_in"]
    tensors = {"img_in.lora_down.weight": torch.ones(2, inp), "img_in.lora_up.weight": torch.ones(out, 2)}
    save_file(tensors, file, metadata={"pad": ""})
    short = 0x280 - int.from_bytes(file.read_bytes()[:8], "little")  # the header's length padded to 8 bytes
    for pad in range(max(short - 8, 0), short + 8):
        save_file(tensors, file, metadata={"pad": "x" * pad})
        if file.read_bytes()[:2] == b"\x80\x02":
            break
    assert file.read_bytes()[:2] == b"\x80\x02"
    code, report, err = cli("info", file, "--json")
    assert code == 0, err
    assert (json.loads(report)["format"], json.loads(report)["modules"]) == ("lightning", 1)


def refusal_files(layers, tmp_path):
    base = lightning_lora(layers, std=1.0)
    m = "transformer_blocks.0.attn.to_q"
    out, inp = layers[m]
    cases = {
        "dora": (base | {f"{m}.dora_scale": torch.ones(out, 1)}, "DoRA"),
        "text-encoder": (base | {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(4, 8)},
                         "text-encoder"),
        "diff": (base | {f"{m}.diff": torch.ones(out, inp)}, ".diff"),
        "diff_b": (base | {f"{m}.diff_b": torch.ones(out)}, ".diff_b"),
        "oft": (base | {f"{m}.oft_blocks": torch.ones(4, 4, 4)}, "OFT"),
        "boft": (base | {f"{m}.boft_R.weight": torch.ones(4, 4, 4)}, "BOFT"),
        "unmatched": (base | {"transformer_blocks.9.attn.to_q.lora_down.weight": torch.ones(8, inp)},
                      "transformer_blocks.9.attn.to_q.lora_down.weight"),
        "shape": ({**base, f"{m}.lora_up.weight": torch.ones(out + 1, 8)}, f"but {m} is [{out}, {inp}]"),
        "no-tensors": ({}, "holds no tensors"),
    }
    files = {}
    for name, (sd, fragment) in cases.items():
        files[name] = (tmp_path / f"{name}.safetensors", fragment)
        save_file(sd, files[name][0])
    files["empty"] = (tmp_path / "empty.safetensors", "is empty")
    files["empty"][0].write_bytes(b"")
    files["pickle"] = (tmp_path / "pickled.safetensors", "pickle")
    torch.save(base, files["pickle"][0])
    files["pt"] = (tmp_path / "lora.pt", "pickle")
    files["pickle-bytes"] = (tmp_path / "pickle-bytes.safetensors", "pickle")
    files["pickle-bytes"][0].write_bytes(pickle.dumps({"a": 1}, protocol=4))
    files["pt"][0].write_bytes(b"\x80\x04")
    files["missing"] = (tmp_path / "nope.safetensors", "no such file")
    files["garbage"] = (tmp_path / "garbage.safetensors", "not a readable safetensors")
    files["garbage"][0].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return files


@pytest.mark.slow
def test_every_refusal_is_one_line_exit_2_nothing_written(configs_only, layers, cli, tmp_path):
    """On the weightless model folder: a LoRA is refused before any weight loads."""
    for name, (file, fragment) in refusal_files(layers, tmp_path).items():
        out = tmp_path / f"{name}.png"
        for command in (["generate", "-p", "x"], ["chain", tmp_path / "in.png", tmp_path / "c.yaml"]):
            if command[0] == "chain":
                Image.new("RGB", (32, 32)).save(command[1])
                command[2].write_text("edits:\n  - inpaint: {prompt: x, rect: ['0,0,8,8']}\n")
            code, _, err = cli(*command, "-m", configs_only, "--lora", f"{file}:0.5", "--device", "cpu",
                               "-o", out)
            assert code == 2, (name, err)
            assert err.count("\n") == 1 and err.startswith("qimg: error: ") and fragment in err, (name, err)
            assert str(file) in err, (name, err)
            assert not out.exists()


@pytest.mark.subprocess
@pytest.mark.parametrize("pattern", ["(.*.*)*#", "(a+)+$"])
def test_a_header_pattern_that_is_no_module_name_is_refused_in_seconds(configs_only, layers, tmp_path, pattern):
    """As a regex, `(.*\\.)?((.*.*)*#)$` takes exponential time on a layer's name: matching the keys as names (and
    refusing any other key) keeps it out of the run. In a process with a timeout: the old way never returns."""
    file = tmp_path / "peft.safetensors"
    meta = {"r": 8, "lora_alpha": 8, "alpha_pattern": {pattern: 4}}
    save_file({k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
               for k, v in lightning_lora(layers).items() if not k.endswith(".alpha")}, file,
              {"lora_adapter_metadata": json.dumps(meta)})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    for args in (["info", file], ["generate", "-p", "x", "-m", configs_only, "--lora", file, "--device", "cpu",
                                  "-o", tmp_path / "o.png"]):
        result = subprocess.run([sys.executable, "-m", "qimg", *map(str, args)], env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and str(file) in result.stderr, result.stderr
        assert f"alpha_pattern key {pattern!r} is not a module name" in result.stderr, result.stderr
    assert not (tmp_path / "o.png").exists()


def test_chain_takes_the_loras_for_the_whole_chain_and_the_shift_for_every_edit(tiny_model_dir, lora_file, cli,
                                                                                 tmp_path):
    image, plan, out = tmp_path / "in.png", tmp_path / "c.yaml", tmp_path / "out.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    plan.write_text("edits:\n  - inpaint: {prompt: x, rect: ['0,0,16,16']}\n  - outpaint: {prompt: y, right: 16}\n")
    code, report, err = cli("chain", image, plan, "-m", tiny_model_dir, "--lora", f"{lora_file}:0.5",
                            "--shift", "3", "--steps", "2", "--cfg", "1", "--device", "cpu", "-o", out, "--json")
    assert code == 0, err
    report = json.loads(report)
    assert [entry["scale"] for entry in report["loras"]] == [0.5]
    assert [entry["shift"] for entry in report["lineage"]] == [3.0, 3.0]


@pytest.mark.slow
def test_the_worker_keeps_an_engine_only_for_the_same_lora_files_and_scales(tiny_model_dir, layers, tmp_path,
                                                                            monkeypatch):
    from qimg.jobs import kept_engine
    from qimg.jobs.common import open_engine
    from qimg.jobs.spec import ModelSpec
    from qimg.weights.lora import LoraSpec

    file = tmp_path / "style.safetensors"
    save_file(lightning_lora(layers, seed=1), file)

    def engine(*loras):
        return open_engine(tiny_model_dir, ModelSpec(device="cpu", dtype="float32", loras=loras), None)

    monkeypatch.setattr(kept_engine, "enabled", True)
    try:
        first = engine(LoraSpec(file, 0.5))
        assert engine(LoraSpec(file, 0.5)) is first
        other_scale = engine(LoraSpec(file, 1.0))
        assert other_scale is not first and other_scale.model_fingerprint != first.model_fingerprint
        save_file(lightning_lora(layers, seed=2), file)  # the same name, other weights
        changed = engine(LoraSpec(file, 1.0))
        assert changed is not other_scale and changed.model_fingerprint != other_scale.model_fingerprint
        assert engine().loras == () and engine().model_fingerprint == fingerprint(tiny_model_dir)
    finally:
        kept_engine.drop()


@pytest.mark.slow
def test_offload_modes_apply_the_lora_alike_and_again_after_a_reload(tiny_model_dir, lora_file):
    from qimg.engine.components import Loading
    from qimg.engine.engine import Engine
    from qimg.engine.request import Sampling
    from qimg.weights.lora import LoraSpec

    job = dict(sampling=Sampling(PROMPT, " ", steps=2, cfg=1.0, seed=3), width=32, height=32)
    loras = (LoraSpec(lora_file, 0.7),)
    baseline = Engine(tiny_model_dir, "cpu", "float32", loading=Loading(loras=loras)).generate(**job).image
    assert not np.array_equal(baseline, Engine(tiny_model_dir, "cpu", "float32").generate(**job).image)
    for offload in ("model", "blocks"):
        engine = Engine(tiny_model_dir, "cpu", "float32", loading=Loading(offload=offload, loras=loras))
        assert np.array_equal(engine.generate(**job).image, baseline), offload
        assert np.array_equal(engine.generate(**job).image, baseline), offload  # model: reloaded, fused once again
