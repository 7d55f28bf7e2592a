"""LoRA files in every layout against the reference's conversion (diffusers' lora_state_dict) and, with peft,
its load_lora_into_transformer + fuse_lora; LoKr and LoHa against their formulas; every refusal."""

import dataclasses
import json

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from safetensors.torch import save_file

from qimg.errors import UsageError
from qimg.model.transformer import QwenImageTransformer, TransformerConfig
from qimg.weights.adapters import apply_adapters, delta, targets
from qimg.weights.lora import LoraSpec, load, map_keys, parse_spec, pattern_value, relative_to, summary

CFG = TransformerConfig.tiny()
RANK, ALPHA = 4, 8.0
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def layers():
    with torch.device("meta"):
        return targets(QwenImageTransformer(CFG))


def factors(layers, seed=0, rank=RANK, std=1.0):
    """A random (down, up) for every linear layer of the tiny transformer."""
    g = torch.Generator().manual_seed(seed)
    return {m: (std * torch.randn(rank, i, generator=g), std * torch.randn(o, rank, generator=g))
            for m, (o, i) in layers.items()}


def write(f, layout: str, alpha=True) -> dict:
    """The factors `f` in one key layout (the module docstring of qimg/weights/lora.py lists them)."""
    sd = {}
    for m, (down, up) in f.items():
        if layout == "peft":
            sd |= {f"transformer.{m}.lora_A.weight": down, f"transformer.{m}.lora_B.weight": up}
        elif layout == "lightning":
            sd |= {f"{m}.lora_down.weight": down, f"{m}.lora_up.weight": up}
            sd |= {f"{m}.alpha": torch.tensor(ALPHA)} if alpha else {}
        elif layout == "kohya":
            name = "lora_unet_" + m.replace(".", "_")
            sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(ALPHA)}
        elif layout == "comfyui":
            sd |= {f"diffusion_model.{m}.lora_A.weight": down, f"diffusion_model.{m}.lora_B.weight": up}
            sd |= {f"diffusion_model.{m}.alpha": torch.tensor(ALPHA)} if alpha else {}
        elif layout == "diffsynth":
            sd |= {f"{m}.lora_A.default.weight": down, f"{m}.lora_B.default.weight": up}
    return sd


CASES = [("peft", True, "diffusers"), ("lightning", True, "lightning"), ("kohya", True, "kohya"),
         ("comfyui", True, "comfyui"), ("comfyui", False, "comfyui"), ("diffsynth", True, "diffsynth")]


@pytest.mark.parity
@pytest.mark.parametrize("layout,alpha,name", CASES, ids=[f"{c[0]}{'' if c[1] else '-no-alpha'}" for c in CASES])
def test_every_layout_maps_like_the_reference(layers, layout, alpha, name):
    f = factors(layers)
    sd = write(f, layout, alpha)
    format, adapters = map_keys(sd, {}, layers, 1.0, "test")
    assert format == name and adapters.keys() == layers.keys()  # every linear layer, img_mod.1 and top level too
    ref = QwenImagePipeline.lora_state_dict(dict(sd))
    for m in layers:
        expected = ref[f"transformer.{m}.lora_B.weight"].double() @ ref[f"transformer.{m}.lora_A.weight"].double()
        got = delta(adapters[m]).double()
        assert (got - expected).norm() <= 1e-6 * expected.norm(), m


@pytest.mark.parity
def test_the_references_silent_failures_work(layers):
    """Bare lora_down/lora_up without alpha (the reference adapts nothing) and `transformer.` keys with alphas
    (the reference fails to match any module): both apply fully, at alpha/rank or 1."""
    f = factors(layers)
    bare = map_keys(write(f, "lightning", alpha=False), {}, layers, 1.0, "test")[1]
    prefixed = {f"transformer.{k}": v for k, v in write(f, "lightning").items()}
    with_alpha = map_keys(prefixed, {}, layers, 1.0, "test")[1]
    assert bare.keys() == with_alpha.keys() == layers.keys()
    for m, (down, up) in f.items():
        torch.testing.assert_close(delta(bare[m]), up @ down)
        torch.testing.assert_close(delta(with_alpha[m]), ALPHA / RANK * up @ down)


@pytest.mark.parametrize("meta,expected", [
    ({"transformer.r": 4, "transformer.lora_alpha": 8}, lambda m: 2.0),
    ({"r": 4, "lora_alpha": 2, "use_rslora": True}, lambda m: 1.0),
    ({"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"attn.to_q": 2}},
     lambda m: 0.5 if m.endswith("attn.to_q") else 2.0),
], ids=["pipeline-header", "rslora", "alpha-pattern"])
def test_peft_header_scales(layers, meta, expected):
    f = factors(layers)
    adapters = map_keys(write(f, "peft"), {"lora_adapter_metadata": json.dumps(meta)}, layers, 0.5, "test")[1]
    for m, a in adapters.items():
        assert a.scale == pytest.approx(0.5 * expected(m))


def test_lokr_and_loha_files(layers):
    m, (out, inp) = "transformer_blocks.0.attn.to_q", layers["transformer_blocks.0.attn.to_q"]
    g = torch.Generator().manual_seed(3)
    w1, w2a, w2b = (torch.randn(2, 2, generator=g), torch.randn(out // 2, 3, generator=g),
                    torch.randn(3, inp // 2, generator=g))
    name = "lora_unet_" + m.replace(".", "_")
    sd = {f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b, f"{name}.alpha": torch.tensor(6.0)}
    format, adapters = map_keys(sd, {}, layers, 0.5, "test")
    assert format == "kohya LoKr"
    torch.testing.assert_close(delta(adapters[m]), 0.5 * 6.0 / 3 * torch.kron(w1, w2a @ w2b))
    h = [torch.randn(s, generator=g) for s in ((out, 2), (2, inp), (out, 2), (2, inp))]
    sd = {f"{m}.hada_{k}": t for k, t in zip(("w1_a", "w1_b", "w2_a", "w2_b"), h)} | {f"{m}.alpha": torch.tensor(1.0)}
    format, adapters = map_keys(sd, {}, layers, 1.0, "test")
    assert format == "diffusers LoHa"
    torch.testing.assert_close(delta(adapters[m]), 0.5 * (h[0] @ h[1]) * (h[2] @ h[3]))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(**dataclasses.asdict(CFG)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def ours_from(ref):
    with torch.device("meta"):
        ours = QwenImageTransformer(CFG)
    ours.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, strict=True, assign=True)
    return ours.eval()


@torch.no_grad()
def forward_both(ref, ours):
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(1, 16, CFG.in_channels, generator=g), torch.randn(1, 5, CFG.joint_attention_dim, generator=g)
    t = torch.tensor([0.6])
    expected = ref(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_shapes=[[(1, 4, 4)]],
                   return_dict=False)[0]
    return ours(img, txt, None, t, (4, 4)), expected


@pytest.mark.parity
def test_forward_parity_with_peft_fuse(layers, models, tmp_path):
    """--lora f:0.7 (kohya, alpha 8) alone, then stacked with a PEFT file whose header gives lora_alpha/r."""
    import copy

    kohya, peft = tmp_path / "kohya.safetensors", tmp_path / "peft.safetensors"
    save_file(write(factors(layers, 1, std=0.1), "kohya"), kohya)
    save_file(write(factors(layers, 2, std=0.1), "peft"), peft, {"lora_adapter_metadata": json.dumps(
        {"transformer.r": RANK, "transformer.lora_alpha": 2, "transformer.target_modules": sorted(layers)})})
    base = forward_both(models, ours_from(models))[0]
    for files, scales in (([kohya], [0.7]), ([kohya, peft], [0.7, 1.0])):
        ref = copy.deepcopy(models)
        ours = ours_from(ref)
        apply_adapters(ours, [load(LoraSpec(f, s), layers).adapters for f, s in zip(files, scales)])
        for i, f in enumerate(files):
            sd, meta = QwenImagePipeline.lora_state_dict(str(f), return_lora_metadata=True)
            QwenImagePipeline.load_lora_into_transformer(sd, transformer=ref, adapter_name=f"a{i}", metadata=meta)
        ref.set_adapters([f"a{i}" for i in range(len(files))], scales)
        ref.fuse_lora()
        got, expected = forward_both(ref, ours)
        assert (got - expected).abs().max() <= 1e-4, files
        assert (got - base).abs().max() > 0.1  # the LoRAs change the output


def test_spec_parsing(tmp_path):
    assert parse_spec("a.safetensors") == LoraSpec(__import__("pathlib").Path("a.safetensors"), 1.0)
    assert parse_spec("dir/a.safetensors:0.7").scale == 0.7
    assert [parse_spec(f"a:{s}").scale for s in ("-1", "+2", ".5", "3.", "1000")] == [-1, 2, 0.5, 3, 1000]
    assert parse_spec("C:/x/a.safetensors").path.as_posix() == "C:/x/a.safetensors"
    assert relative_to(tmp_path, "a.safetensors") == str(tmp_path / "a.safetensors")
    assert relative_to(tmp_path, "b/a.safetensors:.50") == str(tmp_path / "b" / "a.safetensors") + ":.50"


@pytest.mark.parametrize("scale,fragment", [
    ("1001", "beyond 1000"), ("-1e3", "not a plain decimal"), ("1" + "0" * 30, "not a plain decimal"),
    ("inf", "not a plain decimal"), ("nan", "not a plain decimal"), ("\u0661", "not a plain decimal"),
    ("1_0", "not a plain decimal"), (" 1", "not a plain decimal"), ("0x10", "not a plain decimal"),
])
def test_a_scale_that_is_no_plain_decimal_or_absurd_is_refused(tmp_path, scale, fragment):
    """Python's float() takes Arabic-Indic digits, underscores, exponents and spaces; a scale is a plain decimal."""
    file = tmp_path / "l.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(UsageError, match=fragment) as e:
        parse_spec(f"{file}:{scale}")
    assert str(file) in str(e.value)


def test_summary_of_a_lora(layers, tmp_path):
    file = tmp_path / "k.safetensors"
    save_file(write(factors(layers), "kohya"), file)
    info = summary(file, layers)
    assert info["format"] == "kohya" and info["rank"] == RANK and info["alpha"] == ALPHA
    assert info["modules"] == len(layers)
    assert f"transformer_blocks.*.attn.to_q x{CFG.num_layers}" in info["targets"] and "img_in" in info["targets"]


@pytest.mark.parametrize("meta,fragment", [
    ("{not json", "not valid JSON"), ('["r"]', "not a JSON object"), ('{"r": "4"}', "header's r must be"),
    ('{"lora_alpha": 0}', "header's lora_alpha must be"), ('{"alpha_pattern": {"(": 2}}', "'(' is not a module"),
    ('{"rank_pattern": {"to-q": 4}}', "rank_pattern key 'to-q' is not a module name"),
    ('{"use_dora": true}', "DoRA"), ('{"r": 8}', "says rank 8"),
])
def test_bad_peft_headers_are_refused(layers, meta, fragment):
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(")):
        map_keys(write(factors(layers), "peft"), {"lora_adapter_metadata": meta}, layers, 1.0, "test")


PEFT_KEYS = ["attn.to_q", "to_q", "o_q", "img_in", "transformer_blocks.0.attn.to_q", "0.attn.to_q",
             "blocks.0.attn.to_q", "transformer_blocks.1", "attn", "to_out.0", "img_mod.1",
             "transformer_blocks.1.img_mod.1", "_q", "in"]


@pytest.mark.parity
def test_header_patterns_match_module_names_as_peft_does(layers):
    """peft's get_pattern_key matches a key as the regex `(.*\\.)?(key)$`; as names, a key is the layer's whole name
    or its end after a dot, the same answer for every module-name key."""
    from peft.utils.other import get_pattern_key

    for key in PEFT_KEYS:
        for name in layers:
            assert (pattern_value({key: 1}, name, 0) == 1) == (get_pattern_key([key], name) == key), (key, name)
    assert pattern_value({"to_q": 1, "attn.to_q": 2}, "transformer_blocks.0.attn.to_q", 0) == 1  # the first wins


def test_an_alpha_that_is_no_number_is_refused(layers):
    sd = write(factors(layers), "kohya")
    sd["lora_unet_img_in.alpha"] = torch.tensor([1.0, 2.0])
    with pytest.raises(UsageError, match="the alpha of img_in must be one finite number"):
        map_keys(sd, {}, layers, 1.0, "test")
    sd["lora_unet_img_in.alpha"] = torch.tensor(float("nan"))
    with pytest.raises(UsageError, match="the alpha of img_in"):
        map_keys(sd, {}, layers, 1.0, "test")


def test_peft_and_lycoris_prefixes_map_like_the_others(layers):
    f = factors(layers)
    expected = map_keys(write(f, "peft"), {}, layers, 1.0, "test")[1]
    peft = {k.replace("transformer.", "base_model.model.", 1): v for k, v in write(f, "peft").items()}
    lycoris = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in write(f, "kohya").items()}
    for sd, name, scale in ((peft, "diffusers", 1.0), (lycoris, "lycoris", ALPHA / RANK)):
        format, adapters = map_keys(sd, {}, layers, 1.0, "test")
        assert format == name and adapters.keys() == expected.keys()
        for m, a in adapters.items():
            torch.testing.assert_close(delta(a), scale * delta(expected[m]))


def test_a_layer_in_two_layouts_or_with_unusable_factors_is_refused(layers):
    """Nothing of a file may be dropped or applied as nothing without a word."""
    f = factors(layers)
    one = {"img_in": f["img_in"]}
    with pytest.raises(UsageError, match="are the same down of img_in"):
        map_keys(write(one, "peft") | write(one, "lightning", alpha=False), {}, layers, 1.0, "test")
    sd = write(one, "kohya")
    sd["lora_unet_img_in.alpha"] = torch.tensor(0.0)
    with pytest.raises(UsageError, match="the alpha of img_in is 0"):
        map_keys(sd, {}, layers, 1.0, "test")
    for bad in (torch.full_like(f["img_in"][0], float("nan")), f["img_in"][0].to(torch.int8)):
        with pytest.raises(UsageError, match="not all finite floating-point"):
            map_keys(write({"img_in": (bad, f["img_in"][1])}, "peft"), {}, layers, 1.0, "test")
    sd = write(one, "kohya")
    sd["lora_unet_img_in.lora_up.weight"] = sd["lora_unet_img_in.lora_up.weight"][..., None]  # a convolution's
    with pytest.raises(UsageError, match=r"test: lora_unet_img_in\.lora_up\.weight: .* 3 dimensions"):
        map_keys(sd, {}, layers, 1.0, "test")


@pytest.mark.parametrize("alpha,meta", [(1e30, None), (-1e30, None), (None, {"r": RANK, "lora_alpha": 1e30}),
                                        (None, {"r": RANK, "lora_alpha": 8, "alpha_pattern": {"img_in": 1e30}})])
def test_an_absurd_alpha_is_refused(layers, alpha, meta):
    sd = write({"img_in": factors(layers)["img_in"]}, "kohya" if meta is None else "peft")
    if alpha is not None:
        sd["lora_unet_img_in.alpha"] = torch.tensor(alpha)
    with pytest.raises(UsageError, match=r"the alpha of img_in gives it the scale -?2.5e\+29, beyond 1000"):
        map_keys(sd, {"lora_adapter_metadata": json.dumps(meta)} if meta else {}, layers, 1.0, "test")


def test_a_scale_that_is_no_number_is_named(tmp_path):
    file = tmp_path / "l.safetensors"
    file.write_bytes(b"x")
    for text in (f"{file}:abc", f"{file}:"):
        with pytest.raises(UsageError, match="is not a plain decimal number"):
            parse_spec(text)
    assert parse_spec(f"{tmp_path}/other:abc").path.name == "other:abc"  # no such file: the colon is its name's
