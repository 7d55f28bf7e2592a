"""LoRAs on the Qwen-Image-2.1 transformer: a diffusers/PEFT file against diffusers' own loading and fusing
(QwenImage21Pipeline's loader), and ComfyUI's fused `img_mlp.gate_up` updates split exactly onto gate_layer/proj."""

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import QwenImage21Pipeline, QwenImage21Transformer2DModel
from safetensors.torch import save_file

from qimg.errors import UsageError
from qimg.model.rope21 import build_layout
from qimg.model.transformer21 import QwenImage21Transformer, Transformer21Config
from qimg.weights.adapters import apply_adapters, targets
from qimg.weights.lora import LoraSpec, load

CFG = Transformer21Config.tiny()
RANK = 4
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return QwenImage21Transformer2DModel(**{k: list(v) if isinstance(v, tuple) else v
                                            for k, v in dataclasses.asdict(CFG).items()}).eval()


def ours_from(ref):
    with torch.device("meta"):
        ours = QwenImage21Transformer(CFG)
    ours.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, strict=True, assign=True)
    return ours.eval()


def factors(layers, seed):
    g = torch.Generator().manual_seed(seed)
    return {m: (0.1 * torch.randn(RANK, i, generator=g), 0.1 * torch.randn(o, RANK, generator=g))
            for m, (o, i) in layers.items()}


@torch.no_grad()
def forward(model, ours: bool):
    g = torch.Generator().manual_seed(1)
    latents, txt = torch.randn(1, 12, CFG.in_channels, generator=g), torch.randn(1, 4, CFG.context_in_dim, generator=g)
    slots = torch.tensor([0, 0, 1, 0], dtype=torch.bool)
    if ours:
        return model(latents, txt, torch.tensor([0.5]), build_layout(slots, [(2, 2), (2, 4)], CFG.axes_dims_rope))
    mask = torch.cat([slots, torch.ones(2, dtype=torch.bool)])[None]
    return model(hidden_states=latents, encoder_hidden_states=txt, timestep=torch.tensor([0.5]),
                 img_shapes=[[(1, 2, 2), (1, 2, 4)]], img_mask=mask, return_dict=False)[0][:, -8:]


@pytest.mark.parity
def test_peft_file_matches_diffusers_fused_lora(ref, tmp_path):
    with torch.device("meta"):
        layers = targets(QwenImage21Transformer(CFG))
    path = tmp_path / "peft.safetensors"
    save_file({f"transformer.{m}.lora_{ab}.weight": t for m, (down, up) in factors(layers, 2).items()
               for ab, t in (("A", down), ("B", up))}, path, {"lora_adapter_metadata": json.dumps(
        {"transformer.r": RANK, "transformer.lora_alpha": 2, "transformer.target_modules": sorted(layers)})})
    ours = ours_from(ref)
    apply_adapters(ours, [load(LoraSpec(path, 0.7), layers).adapters])
    fused = copy.deepcopy(ref)
    sd, meta = QwenImage21Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
    QwenImage21Pipeline.load_lora_into_transformer(sd, transformer=fused, adapter_name="a", metadata=meta)
    fused.set_adapters(["a"], [0.7])
    fused.fuse_lora()
    got, expected = forward(ours, True), forward(fused, False)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - forward(ours_from(ref), True)).abs().max() > 0.01  # the LoRA changes the output


def test_comfy_fused_gate_up_equals_its_halves(ref, tmp_path):
    with torch.device("meta"):
        layers = targets(QwenImage21Transformer(CFG))
    f = factors(layers, 3)
    halves, fused = {}, {}
    for m, (down, up) in f.items():
        if m.endswith("img_mlp.proj"):
            continue
        if m.endswith("img_mlp.gate_layer"):  # one down for both halves, as a fused layer's LoRA has
            proj_up = f[m.replace("gate_layer", "proj")][1]
            halves |= {f"{m}.lora_down.weight": down, f"{m}.lora_up.weight": up, f"{m}.alpha": torch.tensor(8.0)}
            p = m.replace("gate_layer", "proj")
            halves |= {f"{p}.lora_down.weight": down.clone(), f"{p}.lora_up.weight": proj_up,
                       f"{p}.alpha": torch.tensor(8.0)}
            g = "diffusion_model." + m.replace("gate_layer", "gate_up")
            fused |= {f"{g}.lora_A.weight": down, f"{g}.lora_B.weight": torch.cat([up, proj_up]),
                      f"{g}.alpha": torch.tensor(8.0)}
        else:
            halves |= {f"{m}.lora_down.weight": down, f"{m}.lora_up.weight": up}
            fused |= {f"diffusion_model.{m}.lora_A.weight": down, f"diffusion_model.{m}.lora_B.weight": up}
    save_file(halves, tmp_path / "halves.safetensors")
    save_file(fused, tmp_path / "fused.safetensors")
    a, b = ours_from(ref), ours_from(ref)
    apply_adapters(a, [load(LoraSpec(tmp_path / "halves.safetensors"), layers).adapters])
    apply_adapters(b, [load(LoraSpec(tmp_path / "fused.safetensors"), layers).adapters])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k

    save_file({"diffusion_model.transformer_blocks.0.img_mlp.gate_up.lokr_w1": torch.ones(2, 2),
               "diffusion_model.transformer_blocks.0.img_mlp.gate_up.lokr_w2": torch.ones(96, 16)},
              tmp_path / "lokr.safetensors")
    with pytest.raises(UsageError, match="lokr update of the fused gate_up layer"):
        load(LoraSpec(tmp_path / "lokr.safetensors"), layers)
