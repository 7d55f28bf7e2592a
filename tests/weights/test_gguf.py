"""GGUF transformer weights: qimg's reader and torch dequantization against the `gguf` package, and a dim-256
transformer (K-quants need rows of 256) in a mixed "Q4_K_M-like" file against a dense model and diffusers."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from quant_files import raw_gguf, write_gguf

from qimg.errors import UsageError
from qimg.model.offload import place_for_streaming
from qimg.model.quant import PackedLinear, dequantize
from qimg.model.transformer import QwenImageTransformer, TransformerConfig
from qimg.weights.single_file import open_weights
from qimg.weights.transformer import Source, load_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
WIDE = TransformerConfig(in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128, num_attention_heads=2,
                         joint_attention_dim=64, axes_dims_rope=(16, 56, 56))
# city96's Q4_K_M rules, shrunk to one block: in/out layers BF16, 1-D F32, the rest Q4_K with upgrades; plus one
# layer of each other type so a forward crosses every unpacker
MIX = {"attn.to_v": "Q6_K", "attn.add_v_proj": "Q6_K", "img_mlp.net.2": "Q6_K", "txt_mlp.net.2": "Q6_K",
       "img_mod.1": "Q5_K", "txt_mod.1": "Q3_K", "attn.to_k": "Q2_K", "attn.to_out.0": "Q8_0",
       "attn.add_q_proj": "Q5_0", "attn.to_add_out": "Q4_1"}


def mixed_kinds(state: dict) -> dict[str, str]:
    kinds = {}
    for name, t in state.items():
        if t.ndim == 1:
            kinds[name] = "F32"
        elif not name.startswith("transformer_blocks."):
            kinds[name] = "BF16"
        else:
            layer = name.removesuffix(".weight").split(".", 2)[2]
            kinds[name] = MIX.get(layer, "Q4_K")
    return kinds


# --- every type, alone --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "every.gguf"
    g = torch.Generator().manual_seed(0)
    state = {f"{kind}.weight": torch.randn(3, 512, generator=g) for kind in TYPES}
    write_gguf(path, state, {f"{kind}.weight": kind for kind in TYPES})
    return path


@pytest.mark.parity
def test_every_type_dequantizes_like_gguf(every_type):
    reference = {t.name: t for t in GGUFReader(every_type).tensors}
    with open_weights(every_type) as found:
        assert set(found.weights) == set(reference)
        for name, w in found.weights.items():
            t = reference[name]
            expected = torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type), np.float32)).reshape(w.shape)
            kind = GGMLQuantizationType(t.tensor_type).name
            assert w.shape == (3, 512) and w.stored == kind
            if w.kind == "dense":  # F32, F16, BF16: exactly the stored values, in their own dtype
                got = w.read()
                assert got.dtype == {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]
                assert torch.equal(got.float(), expected), kind
            else:
                got = dequantize(w.kind, w.read(), w.shape)
                assert ((got - expected).abs().max() <= 1e-6 * expected.abs().max()), kind
                assert expected.std() > 0.01, kind  # real values, not zeros


# --- refusals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, kind, message", [
    ("flux", "Q8_0", r"architecture 'flux'; --transformer takes Qwen-Image \(architecture qwen_image\)$"),
    ("qwen_image", "IQ4_XS", "to_q.weight is IQ4_XS, which qimg does not read"),
    ("qwen_image", "TQ1_0", "to_q.weight is TQ1_0, which qimg does not read"),
])
def test_refused_by_name(tmp_path, arch, kind, message):
    with pytest.raises(UsageError, match=message):
        with open_weights(raw_gguf(tmp_path / "f.gguf", arch, kind)):
            pass


def test_truncated_file_is_refused_naming_the_tensor(tmp_path):
    path = raw_gguf(tmp_path / "f.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match="truncated: tensor transformer_blocks.0.attn.to_q.weight ends at byte"):
        with open_weights(path):
            pass
    path.write_bytes(path.read_bytes()[:40])  # inside the metadata
    with pytest.raises(UsageError, match="truncated"):
        with open_weights(path):
            pass


# --- a dim-256 model, packed --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """(folder with transformer/config.json, the mixed GGUF file, the float32 weights the file holds)."""
    from diffusers import QwenImageTransformer2DModel

    folder = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(**dataclasses.asdict(WIDE))
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in ref.state_dict().items()}
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "QwenImageTransformer2DModel", **dataclasses.asdict(WIDE)}))
    path = folder / "wide-Q4_K_M.gguf"
    held = write_gguf(path, state, mixed_kinds(state))
    return folder, path, held


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, 16, WIDE.in_channels, generator=g)
    txt = torch.randn(1, 5, WIDE.joint_attention_dim, generator=g)
    return img, txt, None, torch.tensor([0.7]), (4, 4)


def dense(held):
    with torch.device("meta"):
        model = QwenImageTransformer(WIDE)
    model.load_state_dict(held, assign=True)
    return model.eval()


@pytest.fixture(scope="module")
def packed(wide):
    folder, path, _ = wide
    return load_transformer(WIDE, folder / "transformer", Source(path, dequantize=False), torch.float32,
                            torch.device("cpu"))


@torch.no_grad()
def test_packed_forward_matches_dense_model_of_the_same_weights(wide, packed):
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 14 and {m.kind for m in layers.values()} == set(MIX.values()) | {"Q4_K"}
    assert all(m.weight.dtype == torch.uint8 for m in layers.values())  # stayed packed
    expected = dense(wide[2])(*inputs())
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(packed(*inputs()), expected, rtol=0, atol=1e-4)


@torch.no_grad()
def test_dequantize_at_load_and_streamed_blocks_give_the_same(wide, packed):
    folder, path, _ = wide
    expected = packed(*inputs())
    unpacked = load_transformer(WIDE, folder / "transformer", Source(path), torch.float32, torch.device("cpu"))
    assert not any(isinstance(m, PackedLinear) for m in unpacked.modules())  # the CPU default: unpack once
    torch.testing.assert_close(unpacked(*inputs()), expected, rtol=0, atol=1e-5)
    streamed = load_transformer(WIDE, folder / "transformer", Source(path, dequantize=False), torch.float32,
                                torch.device("cpu"))
    place_for_streaming(streamed, torch.device("cpu"))  # the blocks run from their state dicts: packed buffers
    torch.testing.assert_close(streamed(*inputs()), expected, rtol=0, atol=0)


@pytest.mark.parity
@torch.no_grad()
def test_packed_forward_matches_diffusers_gguf(wide, packed):
    from diffusers import GGUFQuantizationConfig, QwenImageTransformer2DModel

    folder, path, _ = wide
    ref = QwenImageTransformer2DModel.from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=str(folder),
        subfolder="transformer", dtype=torch.float32).eval()
    img, txt, mask, t, (h, w) = inputs()
    expected = ref(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=mask, timestep=t,
                   img_shapes=[[(1, h, w)]], return_dict=False)[0]
    torch.testing.assert_close(packed(*inputs()), expected, rtol=0, atol=2e-3)  # diffusers unpacks in fp16


@torch.no_grad()
def test_lora_runs_beside_packed_weights(wide, packed):
    """add_branch (the LoRA apply step's hook for non-Linear layers) vs the dense model with the delta fused."""
    held = dict(wide[2])
    before = {n: b.clone() for n, b in packed.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    deltas = {}
    for i, (name, layer) in enumerate(n_m for n_m in packed.named_modules() if isinstance(n_m[1], PackedLinear)):
        if i % 2:  # a rank-4 LoRA, its scale folded into up
            down = torch.randn(4, layer.in_features, generator=g) * 0.05
            up = torch.randn(layer.out_features, 4, generator=g) * 0.05
            layer.add_branch(down, up)
            deltas[name] = up @ down
        else:  # a dense delta (LoKr, LoHa)
            delta = torch.randn(layer.shape, generator=g) * 0.01
            layer.add_branch(delta, None)
            deltas[name] = delta
    for name, delta in deltas.items():
        held[f"{name}.weight"] = held[f"{name}.weight"] + delta
    try:
        torch.testing.assert_close(packed(*inputs()), dense(held)(*inputs()), rtol=0, atol=1e-4)
        after = packed.state_dict()
        assert all(torch.equal(after[n], b) for n, b in before.items())  # never fused into the blocks
    finally:
        for m in packed.modules():  # the module-scoped model goes back to no branches
            if isinstance(m, PackedLinear):
                for i in range(m.branches):
                    delattr(m, f"branch{i}_down")
                    delattr(m, f"branch{i}_up")
                m.branches = 0


def test_branch_of_the_wrong_shape_is_refused(packed):
    layer = packed.transformer_blocks[0].attn.to_q
    with pytest.raises(ValueError, match="does not fit"):
        layer.add_branch(torch.zeros(4, 255), torch.zeros(256, 4))
    with pytest.raises(ValueError, match="does not fit"):
        layer.add_branch(torch.zeros(256, 128), None)
    assert layer.branches == 0


def handmade(path, offsets, values=16):
    """A GGUF file written byte by byte: F32 tensors of `values` values at `offsets` in the data section."""
    def string(text):
        return len(text).to_bytes(8, "little") + text.encode()

    head = b"GGUF" + (3).to_bytes(4, "little") + len(offsets).to_bytes(8, "little") + (1).to_bytes(8, "little")
    head += string("general.architecture") + (8).to_bytes(4, "little") + string("qwen_image")
    for i, offset in enumerate(offsets):
        head += string(f"t{i}.weight") + (1).to_bytes(4, "little") + values.to_bytes(8, "little")
        head += (0).to_bytes(4, "little") + offset.to_bytes(8, "little")
    path.write_bytes(head + bytes(-len(head) % 32) + np.ones(values * 8, np.float32).tobytes())
    return path


@pytest.mark.parametrize("offsets, message", [
    ([0, 64], None), ([64, 0], None),
    ([0, 32], "tensor t1.weight overlaps tensor t0.weight"), ([32, 0], "tensor t0.weight overlaps tensor t1.weight"),
    ([0, 0], "overlaps"), ([0, 68], "tensor t1.weight starts at offset 68, not a multiple of the file's alignment 32"),
])
def test_tensors_must_be_aligned_and_apart(tmp_path, offsets, message):
    from qimg.weights.gguf_file import read_header

    if message is None:  # each tensor at the data section's start plus its offset
        starts = [t.start for t in read_header(handmade(tmp_path / "f.gguf", offsets))[1]]
        assert len({start - offset for start, offset in zip(starts, offsets)}) == 1
        return
    with pytest.raises(UsageError, match=message + ".*the file is damaged"):
        read_header(handmade(tmp_path / "f.gguf", offsets))


@pytest.mark.parity
@pytest.mark.parametrize("kind", TYPES[3:])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_packed_weight_that_unpacks_to_nan_is_found_from_its_scales(kind, bad):
    """quant.finite against the gguf package's own dequantization: a block whose fp16 scale field is NaN or inf
    (each field in turn) unpacks to non-finite values, and quant.finite says so; finite scales pass."""
    from gguf.constants import GGML_QUANT_SIZES
    from quant_files import pack

    from qimg.model.quant import SCALE_BYTES, finite

    rng = np.random.default_rng(0)
    good = pack(rng.standard_normal((2, 512)).astype(np.float32), kind, rng)
    assert finite(kind, torch.from_numpy(good.copy()))
    nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]][1]
    for at in SCALE_BYTES[kind]:
        blocks = good.reshape(-1, nbytes).copy()
        blocks[3, at:at + 2] = np.array([bad], np.float16).view(np.uint8)
        with np.errstate(invalid="ignore"):
            assert not np.isfinite(gguf_dequantize(blocks, GGMLQuantizationType[kind])).all(), (kind, at)
        assert not finite(kind, torch.from_numpy(blocks.reshape(good.shape))), (kind, at)


@pytest.mark.parametrize("header, message", [
    (b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little") + bytes(8), "claims 1099511627776 tensors"),
    (b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (2**40).to_bytes(8, "little"),
     "claims 1099511627776 metadata entries"),
    (b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (1).to_bytes(8, "little") + (2**62).to_bytes(8, "little"),
     "truncated"),  # a key 2**62 bytes long: refused before reading, never allocated
    (b"GGUF" + (2**24).to_bytes(4, "little"), "GGUF version 16777216"),
])
def test_damaged_headers_are_refused_without_huge_reads(tmp_path, header, message):
    path = tmp_path / "f.gguf"
    path.write_bytes(header + bytes(64))
    with pytest.raises(UsageError, match=message):
        with open_weights(path):
            pass


@pytest.mark.parity
def test_generate_with_the_mixed_file_matches_the_diffusers_gguf_pipeline(wide, tiny_model_dir, tmp_path, capsys):
    """The tiny checkpoint's text encoder and VAE around the dim-256 transformer (its text width is theirs)."""
    import shutil

    from diffusers import GGUFQuantizationConfig, QwenImagePipeline, QwenImageTransformer2DModel
    from PIL import Image

    from qimg.cli.app import run

    folder, path, _ = wide
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("transformer"))
    shutil.copytree(folder / "transformer", model / "transformer")
    out = tmp_path / "o.png"
    code = run(["generate", "-m", str(model), "--transformer", str(path), "--no-dequantize", "-p", "a red circle",
                "--size", "32x32", "--steps", "2", "--seed", "3", "--device", "cpu", "-o", str(out), "--no-cache"])
    assert code == 0, capsys.readouterr().err
    transformer = QwenImageTransformer2DModel.from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=str(folder),
        subfolder="transformer", dtype=torch.float32)
    pipe = QwenImagePipeline.from_pretrained(model, transformer=transformer, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red circle", negative_prompt=" ", true_cfg_scale=4.0, width=32, height=32, num_inference_steps=2,
               generator=torch.Generator("cpu").manual_seed(3)).images[0]
    ours, ref = np.asarray(Image.open(out).convert("RGB")).astype(int), np.asarray(ref).astype(int)
    assert np.abs(ours - ref).max() <= 2 and ref.std() > 1
