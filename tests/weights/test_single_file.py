"""`--transformer FILE` on the tiny checkpoint: single safetensors files (bf16, plain and ComfyUI scaled fp8, bare
or prefixed keys) and GGUF, end to end through `qimg generate`; `--quantize fp8`; every refusal one line."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import lightning_lora, lora_layers, one_line, pixels
from PIL import Image
from quant_files import raw_gguf, write_gguf
from safetensors.torch import save_file

from qimg.errors import QimgWarning
from qimg.model.quant import PackedLinear
from qimg.model.transformer import QwenImageTransformer, TransformerConfig
from qimg.weights.folders import load_module, read_config
from qimg.weights.single_file import folder_weights
from qimg.weights.transformer import Source, load_transformer

pytestmark = pytest.mark.usefixtures("one_thread")
PREFIX = "model.diffusion_model."
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def state(tiny_model_dir):
    with folder_weights(tiny_model_dir / "transformer") as found:
        return {k: w.read() for k, w in found.weights.items()}


@pytest.fixture(scope="module")
def cfg(tiny_model_dir):
    return TransformerConfig.from_dict(read_config(tiny_model_dir / "transformer"))


def linear_weights(state):
    return [k for k, v in state.items() if v.ndim == 2]


def fp8_file(path, state, fmt, dtype=torch.float8_e4m3fn):
    """state with every linear weight as fp8: plain (w.to(fp8)), legacy scaled (`scaled_fp8` marker,
    .scale_weight, .scale_input) or comfy_quant (per-layer JSON tensor, or the header's metadata). Returns the
    float32 weights the file stands for."""
    tensors, held, layers = {}, dict(state), {}
    for i, key in enumerate(linear_weights(state)):
        layer, w = key.removesuffix(".weight"), state[key]
        scale = torch.tensor(1.0) if fmt == "plain" else w.abs().amax() / 200 * (1 + i / 10)
        q = (w / scale).to(dtype)
        tensors[key], held[key] = q, q.float() * scale
        if fmt == "legacy":
            tensors[f"{layer}.scale_weight"], tensors[f"{layer}.scale_input"] = scale.reshape(1), torch.tensor(1.0)
        elif fmt in ("comfy_quant", "header"):
            tensors[f"{layer}.weight_scale"], tensors[f"{layer}.input_scale"] = scale, torch.tensor(1.0)
            spec = {"format": "float8_e4m3fn" if dtype == torch.float8_e4m3fn else "float8_e5m2"}
            if fmt == "header":
                layers[layer] = spec
            else:
                tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(spec).encode()), dtype=torch.uint8)
    rest = {k: v.to(torch.bfloat16) for k, v in state.items() if k not in tensors}
    held.update({k: v.float() for k, v in rest.items()})
    if fmt == "legacy":
        tensors["scaled_fp8"] = torch.empty(0, dtype=dtype)
    meta = {"_quantization_metadata": json.dumps({"layers": layers})} if layers else None
    save_file({**tensors, **rest}, path, metadata=meta)
    return held


def loaded(cfg, tiny_model_dir, path, dtype=torch.float32, dequantize=True):
    return load_transformer(cfg, tiny_model_dir / "transformer", Source(path, dequantize), dtype, CPU).state_dict()


@pytest.mark.parametrize("prefix", ["", PREFIX, "all-in-one"])
def test_bf16_file_bare_or_prefixed_gives_the_folder_weights(tmp_path, tiny_model_dir, state, cfg, prefix):
    path = tmp_path / "t.safetensors"
    others = {"first_stage_model.decoder.x": torch.zeros(2), "cond_stage_model.y": torch.zeros(2)}
    tensors = {(prefix if prefix != "all-in-one" else PREFIX) + k: v.to(torch.bfloat16) for k, v in state.items()}
    save_file({**tensors, **(others if prefix == "all-in-one" else {})}, path)
    folder = load_module(lambda: QwenImageTransformer(cfg), tiny_model_dir / "transformer", torch.bfloat16, CPU)
    if prefix == "all-in-one":  # only the transformer's keys, and a warning says so
        with pytest.warns(QimgWarning, match=f"all-in-one checkpoint: using its {len(state)} transformer weights .* "
                                             "ignoring 2 keys of other components"):
            ours = loaded(cfg, tiny_model_dir, path, torch.bfloat16)
    else:
        ours = loaded(cfg, tiny_model_dir, path, torch.bfloat16)
    assert ours.keys() == folder.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in folder.state_dict().items())


@pytest.mark.parametrize("fmt, dtype", [("plain", torch.float8_e4m3fn), ("plain", torch.float8_e5m2),
                                        ("legacy", torch.float8_e4m3fn), ("comfy_quant", torch.float8_e4m3fn),
                                        ("header", torch.float8_e5m2)])
def test_fp8_files_give_their_weights_times_their_scales(tmp_path, tiny_model_dir, state, cfg, fmt, dtype):
    path = tmp_path / "t.safetensors"
    held = fp8_file(path, state, fmt, dtype)
    unpacked = loaded(cfg, tiny_model_dir, path)
    assert all(torch.equal(unpacked[k], v) for k, v in held.items())
    packed = load_transformer(cfg, tiny_model_dir / "transformer", Source(path, False), torch.float32, CPU)
    layer = packed.transformer_blocks[0].attn.to_q
    assert isinstance(layer, PackedLinear) and layer.weight.dtype == torch.uint8
    assert torch.equal(layer.unpacked(), held["transformer_blocks.0.attn.to_q.weight"])
    if fmt == "plain":  # plain fp8 is w.to(dtype)
        raw = (state["transformer_blocks.0.attn.to_q.weight"]).to(dtype)
        assert torch.equal(held["transformer_blocks.0.attn.to_q.weight"], raw.float())


# --- end to end ---------------------------------------------------------------------------------------------


def dense_folder(tmp_path, tiny_model_dir, weights, name):
    """A copy of the tiny model whose transformer holds `weights` (float32)."""
    folder = tmp_path / name
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors*"),
                    dirs_exist_ok=False)
    for part in ("text_encoder", "vae"):
        for f in (tiny_model_dir / part).glob("*.safetensors*"):
            shutil.copy(f, folder / part / f.name)
    save_file({k: v.float().contiguous() for k, v in weights.items()}, folder / "transformer" / "model.safetensors")
    return folder


def generate(cli, model, out, *args):
    code, stdout, err = cli("generate", "-m", model, "-p", "a red circle", "--size", "32x32", "--steps", "2", "--seed",
                            "5", "--device", "cpu", "-o", out, "--json", "--no-cache", *args)
    assert code == 0, err
    return pixels(out).astype(int), json.loads(stdout)


def test_generate_from_scaled_fp8_equals_a_folder_of_its_weights(tmp_path, tiny_model_dir, state, cli,
                                                                 monkeypatch):
    legacy, comfy = tmp_path / "legacy.safetensors", tmp_path / "presets" / "comfy.safetensors"
    comfy.parent.mkdir()
    held = fp8_file(legacy, state, "legacy")
    assert all(torch.equal(held[k], v) for k, v in fp8_file(comfy, state, "comfy_quant").items())
    expected, plain = generate(cli, dense_folder(tmp_path, tiny_model_dir, held, "dense"), tmp_path / "d.png")
    assert expected.std() > 1
    image, report = generate(cli, tiny_model_dir, tmp_path / "a.png", "--transformer", legacy, "--no-dequantize")
    assert np.abs(image - expected).max() <= 1
    info = report["transformer"]
    assert info["name"] == "legacy.safetensors" and info["format"] == "safetensors F8_E4M3+BF16 scaled_fp8"
    assert info["sha256"] == __import__("hashlib").sha256(legacy.read_bytes()).hexdigest()
    assert report["model_fingerprint"] != plain["model_fingerprint"] and "transformer" not in plain
    # from a preset, the file named relative to the preset; then from $QIMG_TRANSFORMER
    (comfy.parent / "p.yaml").write_text("transformer: comfy.safetensors\ndequantize: false\n")
    image, report = generate(cli, tiny_model_dir, tmp_path / "b.png", "--preset", comfy.parent / "p.yaml")
    assert np.abs(image - expected).max() <= 1 and report["transformer"]["format"].endswith("comfy_quant")
    monkeypatch.setenv("QIMG_TRANSFORMER", str(comfy))
    image, report = generate(cli, tiny_model_dir, tmp_path / "c.png")
    assert np.abs(image - expected).max() <= 1 and report["transformer"]["name"] == "comfy.safetensors"


def test_quantize_fp8_equals_a_folder_of_the_rounded_weights(tmp_path, tiny_model_dir, state, cli):
    from qimg.model.quant import dequantize, quantize_fp8

    def rounded_weight(w):
        data, scale = quantize_fp8(w)
        return dequantize("F8_E4M3", data, w.shape, scale)

    rounded = {k: rounded_weight(v) if k.startswith("transformer_blocks.") and v.ndim == 2 else v
               for k, v in state.items()}
    expected, _ = generate(cli, dense_folder(tmp_path, tiny_model_dir, rounded, "rounded"), tmp_path / "d.png")
    image, report = generate(cli, tiny_model_dir, tmp_path / "q.png", "--quantize", "fp8", "--no-dequantize")
    assert np.array_equal(image, expected) and report["transformer"] == {"quantize": "fp8"}
    assert not np.array_equal(generate(cli, tiny_model_dir, tmp_path / "p.png")[0], expected)  # fp8 shows


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, state):
    """The tiny transformer as GGUF, its linear layers in every 32-block type (its rows are 32-128 wide), and the
    float32 weights the file holds."""
    kinds = dict(zip(linear_weights(state), ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"] * 20))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_gguf(path, state, kinds)


@pytest.mark.parity
def test_generate_from_gguf_matches_diffusers_gguf_pipeline(tmp_path, tiny_model_dir, tiny_gguf, cli):
    from diffusers import GGUFQuantizationConfig, QwenImagePipeline, QwenImageTransformer2DModel

    path, _ = tiny_gguf
    image, report = generate(cli, tiny_model_dir, tmp_path / "g.png", "--transformer", path, "--no-dequantize")
    assert report["transformer"]["format"].startswith("gguf ")
    transformer = QwenImageTransformer2DModel.from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(tiny_model_dir), subfolder="transformer", dtype=torch.float32)
    pipe = QwenImagePipeline.from_pretrained(tiny_model_dir, transformer=transformer, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red circle", negative_prompt=" ", true_cfg_scale=4.0, width=32, height=32, num_inference_steps=2,
               generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.abs(image - np.asarray(ref).astype(int)).max() <= 2


def test_lora_on_packed_gguf_and_fp8_equals_it_fused_into_their_dense_weights(tmp_path, tiny_model_dir, state,
                                                                            tiny_gguf, cli):
    lora = tmp_path / "lora.safetensors"
    save_file(lightning_lora(lora_layers(tiny_model_dir)), lora)
    fp8 = tmp_path / "fp8.safetensors"
    for file, held in ((tiny_gguf[0], tiny_gguf[1]), (fp8, fp8_file(fp8, state, "comfy_quant"))):
        expected, _ = generate(cli, dense_folder(tmp_path, tiny_model_dir, held, file.stem), tmp_path / "d.png",
                               "--lora", f"{lora}:0.7", "--overwrite")
        image, report = generate(cli, tiny_model_dir, tmp_path / "p.png", "--transformer", file, "--no-dequantize",
                                 "--lora", f"{lora}:0.7", "--overwrite")
        assert np.abs(image - expected).max() <= 1, file
        without, _ = generate(cli, tiny_model_dir, tmp_path / "n.png", "--transformer", file, "--overwrite")
        assert np.abs(without - expected).max() > 5  # the LoRA shows
        assert report["loras"][0]["name"] == "lora.safetensors" and report["transformer"]["name"] == file.name


# --- refusals -----------------------------------------------------------------------------------------------


def bad_files(tmp_path, state):
    """name -> (file, what the one error line must say)."""
    w = state["transformer_blocks.0.attn.to_q.weight"]
    nvfp4 = {**{k: v for k, v in state.items()}, "transformer_blocks.0.attn.to_q.comfy_quant":
             torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}
    blockwise = {**state, "transformer_blocks.0.attn.to_q.weight": w.to(torch.float8_e4m3fn),
                 "transformer_blocks.0.attn.to_q.weight_scale": torch.ones(w.shape[0], 1)}
    int8 = {**state, "transformer_blocks.0.attn.to_q.weight": w.to(torch.int8)}
    wrong = {**state, "transformer_blocks.0.attn.to_q.weight": torch.zeros(3, 32)}
    aio = {"first_stage_model.decoder.conv.weight": torch.zeros(2), "cond_stage_model.x": torch.zeros(2)}
    files = {}
    for name, tensors in (("nvfp4", nvfp4), ("blockwise", blockwise), ("int8", int8), ("shape", wrong),
                          ("aio", aio)):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        files[name] = tmp_path / f"{name}.safetensors"
    truncated = raw_gguf(tmp_path / "truncated.gguf")
    truncated.write_bytes(truncated.read_bytes()[:-10])
    files.update(flux=raw_gguf(tmp_path / "flux.gguf", "flux"), iq=raw_gguf(tmp_path / "iq.gguf", kind="IQ4_XS"),
                 tq=raw_gguf(tmp_path / "tq.gguf", kind="TQ1_0"), truncated=truncated)
    cut = tmp_path / "cut.safetensors"
    save_file(state, cut)
    cut.write_bytes(cut.read_bytes()[:-1000])
    files["cut"] = cut
    (tmp_path / "t.ckpt").write_bytes(b"pickle")
    files["pickle"] = tmp_path / "t.ckpt"
    nan = w.clone()
    nan[1, 2] = float("nan")
    tensors = {"nan": {**state, "transformer_blocks.0.attn.to_q.weight": nan},
               "zeros": {k: torch.zeros_like(v) for k, v in state.items()},
               "fp8-nan": {**state, "transformer_blocks.0.attn.to_q.weight": nan.to(torch.float8_e4m3fn)},
               "e5m2-inf": {**state, "transformer_blocks.0.attn.to_q.weight": (w * float("inf")).to(torch.float8_e5m2)}}
    for value in ("nan", "inf", "0", "-1"):
        tensors[f"scale-{value}"] = {**state, "transformer_blocks.0.attn.to_q.weight": w.to(torch.float8_e4m3fn),
                                     "transformer_blocks.0.attn.to_q.scale_weight": torch.tensor([float(value)])}
    for name, t in tensors.items():
        save_file(t, tmp_path / f"{name}.safetensors")
        files[name] = tmp_path / f"{name}.safetensors"
    for name, kind in (("gguf-nan", "F32"), ("gguf-q8-nan", "Q8_0")):
        files[name] = tmp_path / f"{name}.gguf"
        write_gguf(files[name], tensors["nan"], {"transformer_blocks.0.attn.to_q.weight": kind})
    return files


REFUSALS = {
    "nvfp4": "layer transformer_blocks.0.attn.to_q is NVFP4", "blockwise": "block-wise or per-channel scales",
    "int8": "to_q.weight is int8",
    "shape": "weights of the wrong shape for this config: transformer_blocks.0.attn.to_q",
    "aio": "holds no transformer weights", "flux": "architecture 'flux'", "iq": "IQ4_XS, which qimg does not read",
    "tq": "TQ1_0, which qimg does not read", "truncated": "is truncated", "pickle": "the suffix of pickle files",
    "cut": "is neither a GGUF file nor a readable safetensors file",
    **dict.fromkeys(["nan", "fp8-nan", "e5m2-inf", "gguf-nan", "gguf-q8-nan"],
                    "tensor transformer_blocks.0.attn.to_q.weight holds NaN or infinity; the file is damaged"),
    "zeros": "every weight is zero; the file is damaged",
    **{f"scale-{v}": f"the scale transformer_blocks.0.attn.to_q.scale_weight is {float(v)}, not a positive finite"
       for v in ("nan", "inf", "0", "-1")},
}


def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, tiny_model_dir, state, cli):
    files = bad_files(tmp_path, state)
    for name, message in REFUSALS.items():
        out = tmp_path / f"{name}.png"
        code, _, err = cli("generate", "-m", tiny_model_dir, "-p", "x", "--size", "32x32", "--steps", "1",
                           "--device", "cpu", "--no-cache", "-o", out, "--transformer", files[name])
        err = err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert err.startswith("qimg: error: --transformer ") and message in err, (name, err)
        assert not out.exists()


@pytest.mark.slow
def test_the_worker_keeps_an_engine_only_for_the_same_transformer_file(tmp_path, tiny_model_dir, monkeypatch):
    from qimg.jobs import kept_engine
    from qimg.jobs.spec import ModelSpec

    monkeypatch.setattr(kept_engine, "enabled", True)
    monkeypatch.setattr(kept_engine, "_key", None)
    monkeypatch.setattr(kept_engine, "_engine", None)
    file = tmp_path / "t.safetensors"
    file.write_bytes(b"one")
    made = []

    def engine(spec):
        return kept_engine.engine(tiny_model_dir, "cpu", "float32", spec.speed(), lambda: made.append(1) or len(made))

    assert engine(ModelSpec(transformer=file)) == engine(ModelSpec(transformer=file)) == 1
    file.write_bytes(b"two")  # the same name, other weights: another model
    assert engine(ModelSpec(transformer=file)) == 2
    assert engine(ModelSpec(transformer=file, quantize="fp8")) == 3
    assert engine(ModelSpec()) == 4


def test_quantize_refuses_a_gguf_file(tmp_path):
    from qimg.errors import UsageError

    (tmp_path / "t.gguf").write_bytes(b"GGUF")
    with pytest.raises(UsageError, match="is GGUF, already quantized"):
        Source(tmp_path / "t.gguf", None, "fp8")


@pytest.mark.slow
def test_qimg_transformer_for_another_kind_of_model_is_refused(tmp_path, tiny_model_dir, tiny_edit_dir, state, cli,
                                                               monkeypatch):
    """$QIMG_TRANSFORMER, set once for one model, would silently replace another kind of model's transformer (the
    Edit models share Qwen-Image's layout): refused by the name of the file, unless given as --transformer."""
    generation, edit = tmp_path / "qwen-image-bf16.safetensors", tmp_path / "Qwen_Image_Edit-bf16.safetensors"
    for path in (generation, edit):
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, path)
    Image.new("RGB", (64, 48)).save(tmp_path / "in.png")
    out = tmp_path / "o.png"
    edit_args = ["edit", tmp_path / "in.png", "-p", "make it red", "-m", tiny_edit_dir, "--steps", "1", "--edit-area",
                 "3072", "--vision-area", "1024", "--device", "cpu", "--no-cache", "--no-worker", "-o", out,
                 "--overwrite"]
    (tmp_path / "c.yaml").write_text("edits:\n  - edit: {prompt: make it red, edit_area: 3072}\n")
    for env, args in [(generation, edit_args),
                      (generation, ["chain", tmp_path / "in.png", tmp_path / "c.yaml", "-m", tiny_edit_dir,
                                    "--device", "cpu", "-o", out]),
                      (edit, ["generate", "-p", "x", "-m", tiny_model_dir, "-o", out])]:
        monkeypatch.setenv("QIMG_TRANSFORMER", str(env))
        code, _, err = cli(*args)
        assert code == 2, err
        one_line(err, f"QIMG_TRANSFORMER={env}", "--transformer to use it anyway")
        assert not out.exists()
    monkeypatch.setenv("QIMG_TRANSFORMER", str(edit))  # the file its name says it is for
    code, _, err = cli(*edit_args)
    assert code == 0, err
    monkeypatch.delenv("QIMG_TRANSFORMER")
    code, _, err = cli(*edit_args, "--transformer", generation)  # asked for: taken
    assert code == 0, err
