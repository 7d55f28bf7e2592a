"""LoRA files as users download them: every key layout of Qwen-Image LoRAs, detected from the keys, mapped
strictly onto the transformer's linear layers with each format's scale rule (adapters.py applies them).

Layouts (`<m>` = the layer's name in the model, `transformer_blocks.3.attn.to_q`):
  diffusers/PEFT  `transformer.<m>.lora_A.weight`, `.lora_B.weight`; scale from the header's PEFT config, else 1
  lightning       `<m>.lora_down.weight`, `.lora_up.weight`, `.alpha` (no prefix)
  kohya           `lora_unet_<m with _ for .>.lora_down.weight`, ...; LyCORIS `lycoris_<m_>` alike
  comfyui         `diffusion_model.<m>.lora_A.weight` (+ `.alpha`); 2.1's fused `img_mlp.gate_up` split (qwen21.py)
  diffsynth       `<m>.lora_A.default.weight`
and LoKr (`lokr_w1[_a/_b]`, `lokr_w2[_a/_b]`) and LoHa (`hada_w1_a/b`, `hada_w2_a/b`) under any of them.
Scale rules (diffusers' conversion and ComfyUI's weight adapters agree): a `.alpha` tensor gives alpha / rank;
else the PEFT config in the safetensors header gives lora_alpha / r (per-module alpha_pattern/rank_pattern,
sqrt(r) with use_rslora); else 1. LoKr's alpha counts only when a factor is decomposed.

Unlike the reference, nothing is skipped silently: a key that lands on no linear layer of the right shape, a
text-encoder key, or an adapter kind qimg cannot apply (DoRA, OFT/BOFT, `.diff`) stops the run naming it.
"""

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from qimg.errors import UsageError, listing
from qimg.option_values import MAX_DIGITS
from qimg.small_files import PICKLE_SUFFIXES, open_regular, parse_json, pickled, safetensors_header, sha256_of
from qimg.weights.lora_keys import PARTS, split_key

# dotted prefixes, longest first; `base_model.model.` is what PEFT's own save_pretrained writes
PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
FLAT = ("lora_unet_", "lycoris_")  # kohya and LyCORIS: the layer's dots written as underscores
TEXT_ENCODER = ("lora_te", "text_encoder", "te.", "text_model.")  # kohya (lora_te1_...), diffusers, others
REFUSED = {  # a part of a key (between dots) -> what it is
    "dora_scale": "DoRA (dora_scale)", "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "diff": "full weight differences (.diff)", "diff_b": "bias differences (.diff_b)",
    "oft_blocks": "OFT (oft_blocks)", "oft_diag": "OFT (oft_diag)", "oft_R": "OFT (oft_R)", "oft_r": "OFT (oft_r)",
    "boft_R": "BOFT (boft_R)", "boft_s": "BOFT (boft_s)",
    "lokr_t2": "Tucker-decomposed LoKr (lokr_t2, for convolutions)",
    "hada_t1": "Tucker-decomposed LoHa (hada_t1, for convolutions)", "hada_t2": "Tucker-decomposed LoHa (hada_t2)",
    "lora_mid": "LoCon (lora_mid, for convolutions)",
}
_DIGITS = f"[0-9]{{1,{MAX_DIGITS}}}"
SCALE = re.compile(rf"[+-]?(?:{_DIGITS}(?:\.[0-9]{{0,{MAX_DIGITS}}})?|\.{_DIGITS})")  # --lora's: plain decimals
MAX_SCALE = 1000  # the largest --lora scale, and file scale (alpha / rank), taken: 1e30 is a typo or a damaged file
MODULE_NAME = re.compile(r"[A-Za-z0-9_.]+")  # what a PEFT alpha_pattern/rank_pattern key may be: a module name
COMPLETE = {"lora": ({"down", "up"},), "loha": ({"w1_a", "w1_b", "w2_a", "w2_b"},),
            "lokr": ({"w1"}, {"w1_a", "w1_b"})}  # lokr also needs w2 or w2_a + w2_b


@dataclass(frozen=True)
class LoraSpec:
    """`--lora FILE[:SCALE]` as given."""

    path: Path
    scale: float = 1.0


def parse_spec(text: str) -> LoraSpec:
    """FILE or FILE:SCALE (a colon followed by a plain decimal number, like 0.8 or -1; any other colon belongs to
    the file name)."""
    path, sep, scale = text.rpartition(":")
    if sep:
        if not SCALE.fullmatch(scale):
            if Path(path).is_file() and not Path(text).exists():
                raise UsageError(f"--lora {text[:200]}: the scale {scale[:40]!r} is not a plain decimal number "
                                 f"(FILE:SCALE, e.g. {path[:200]}:0.8)")
            return LoraSpec(Path(text))
        value = float(scale)
        if not abs(value) <= MAX_SCALE:
            raise UsageError(f"--lora {text[:200]}: the scale {scale} is beyond {MAX_SCALE:g} either way; LoRAs "
                             "are applied at scales near 1")
        if path:
            return LoraSpec(Path(path), value)
    if not text:
        raise UsageError("--lora needs a file: --lora FILE[:SCALE]")
    return LoraSpec(Path(text))


def relative_to(folder: Path, text: str) -> str:
    """A FILE[:SCALE] of a preset with a relative FILE made relative to the preset's folder, the scale as written."""
    spec = parse_spec(text)
    path = spec.path.expanduser()
    scale = "" if spec.path == Path(text) else ":" + text.rpartition(":")[2]
    return f"{path if path.is_absolute() else folder / path}{scale}"


@dataclass(frozen=True)
class Lora:
    """A LoRA file read and mapped onto the model: what the output's metadata records, and its adapters."""

    name: str  # the file's name
    sha256: str
    scale: float
    format: str  # the key layout, plus the adapter kind when not plain LoRA ("kohya LoKr")
    adapters: dict  # layer name -> adapters.Adapter

    def record(self) -> dict:
        return dict(name=self.name, sha256=self.sha256, scale=self.scale, format=self.format)


def read_file(path: Path) -> tuple[dict, dict, str]:
    """(tensors, header metadata, sha256 of the file) of a LoRA file; every problem a UsageError naming it. The
    file is opened the one way (small_files: a regular file) and its header checked before it is hashed."""
    from safetensors import SafetensorError, safe_open

    what = f"--lora {path}"
    pickle = (f"{what} is a pickle file; qimg reads LoRAs in safetensors only, because pickle files can run code. "
              "Use the .safetensors release or convert it.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(pickle)
    with open_regular(path, "--lora", "; give the .safetensors file") as f:
        header = safetensors_header(f, what)
        if header is None:
            f.seek(0)
            head = f.read(8)
            if not head:
                raise UsageError(f"{what} is empty; download it again")
            if pickled(head):
                raise UsageError(pickle)
            raise UsageError(f"{what} is not a readable safetensors file (its header does not parse); download it "
                             "again")
        not_lora(what, [key for key in header if key != "__metadata__"])
        f.seek(0)
        sha256 = sha256_of(f)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{what} is not a readable safetensors file ({str(e)[:80]}); download it again") from None
    if not tensors:
        raise UsageError(f"{what} holds no tensors; is it the right file?")
    return tensors, metadata, sha256


def not_lora(what: str, keys: list[str]) -> None:
    """Refuse, from the header's keys alone, a file that holds no tensors or none of a LoRA (no adapter key, no
    key of a kind REFUSED names): a transformer's weights are named as such."""
    if not keys:
        raise UsageError(f"{what} holds no tensors; is it the right file?")
    if any(split_key(key)[1] or refused(key) for key in keys):
        return
    blocks = [key for key in keys if strip_prefix(key).startswith("transformer_blocks.")]
    if blocks:
        raise UsageError(f"{what} is a transformer's weights, not a LoRA ({blocks[0][:80]}, no lora_A/lora_down "
                         "keys): give it to --transformer")
    raise UsageError(f"{what} holds no LoRA keys (lora_A/lora_down, lokr_, hada_; it has {listing(sorted(keys))}): "
                     "is it a LoRA?")


def strip_prefix(key: str) -> str:
    return next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)


def refused(key: str) -> str | None:
    """What a key of an adapter kind qimg cannot apply is (REFUSED), or None."""
    return next((REFUSED[part] for part in key.split(".") if part in REFUSED), None)


def layout(layer: str, suffix: str) -> tuple[str, str, bool]:
    """(layout name, the layer's name without prefix, whether its dots are written as underscores)."""
    for prefix in FLAT:
        if layer.startswith(prefix):
            return ("kohya" if prefix == "lora_unet_" else "lycoris"), layer[len(prefix):], True
    for prefix in PREFIXES:
        if layer.startswith(prefix):
            return ("diffusers" if prefix in ("transformer.", "base_model.model.") else "comfyui"), \
                layer[len(prefix):], False
    if ".default" in suffix:
        return "diffsynth", layer, False
    return ("lightning" if suffix in ("lora_down.weight", "lora_up.weight") else "diffusers"), layer, False


def peft_config(metadata: dict, what: str) -> dict | None:
    """The PEFT LoraConfig fields diffusers writes into the header (`lora_adapter_metadata`), the
    transformer's: keys prefixed `transformer.` when a pipeline saved it, bare when the model did."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return None
    config = parse_json(raw, f"{what}: its header's lora_adapter_metadata")
    if not isinstance(config, dict):
        raise UsageError(f"{what}: its header's lora_adapter_metadata is not a JSON object")
    prefixed = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    config = prefixed or config
    if config.get("use_dora"):
        raise UsageError(f"{what} is a DoRA (use_dora in its header); qimg applies LoRA, LoKr and LoHa only")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise UsageError(f"{what}: its header's {key} is not a JSON object")
        for pattern, value in patterns.items():
            if not MODULE_NAME.fullmatch(pattern):
                raise UsageError(f"{what}: its header's {key} key {pattern[:60]!r} is not a module name (letters, "
                                 "digits, _ and .); qimg matches these keys as names, not regular expressions: "
                                 "use a LoRA saved with plain module names")
            number(value, f"{what}: its header's {key} {pattern[:40]!r}")
    for key in ("r", "lora_alpha"):
        if key in config:
            number(config[key], f"{what}: its header's {key}")
    return config


def number(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise UsageError(f"{where} must be a positive number, not {str(value)[:40]!r}")


def pattern_value(patterns: dict | None, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft get_pattern_key: the regex `(.*[.])?(key)$`) for keys that are
    module names (peft_config refuses any other): the first key that is the layer's name or its end after a dot."""
    for pattern, value in (patterns or {}).items():
        if name == pattern or name.endswith("." + pattern):
            return value
    return default


def file_scale(kind: str, parts: dict, name: str, config: dict | None, what: str) -> float:
    """The file's own scale for one layer's adapter (the module docstring's rules)."""
    alpha = None
    if "alpha" in parts:
        if parts["alpha"].numel() != 1 or not math.isfinite(alpha := float(parts["alpha"].float().flatten()[0])):
            raise UsageError(f"{what}: the alpha of {name} must be one finite number")
        if alpha == 0:
            raise UsageError(f"{what}: the alpha of {name} is 0, which makes its update nothing; the file is "
                             "damaged or was saved wrongly")
    if kind == "lora":
        rank = parts["down"].shape[0]
        if alpha is not None:
            return alpha / rank
        if config is None:
            return 1.0
        r = pattern_value(config.get("rank_pattern"), name, config.get("r", 8))
        lora_alpha = pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8))
        if r != rank:
            raise UsageError(f"{what}: its header says rank {r} for {name}, but its tensors have rank {rank}")
        return lora_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    if alpha is None:
        return 1.0
    if kind == "loha":
        return alpha / parts["w1_b"].shape[0]
    # LoKr: alpha scales only a decomposed factor (ComfyUI's lokr.py; diffusers' _bake_lokr_alpha_)
    for factor in ("w2", "w1"):
        if f"{factor}_b" in parts:
            return alpha / parts[f"{factor}_b"].shape[0]
    return 1.0


def sane_scale(scale: float, name: str, what: str) -> float:
    """A layer's file scale, unless it is beyond MAX_SCALE either way (an alpha of 1e30: a damaged file)."""
    if not abs(scale) <= MAX_SCALE:
        raise UsageError(f"{what}: the alpha of {name} gives it the scale {scale:.3g}, beyond {MAX_SCALE:g} either "
                         "way; the file is damaged or was saved wrongly: download it again")
    return scale


def map_keys(tensors: dict, metadata: dict, layers: dict, strength: float, what: str) -> tuple[str, dict]:
    """(format, {layer name: Adapter}) for a file's tensors, mapped onto `layers` ({name: (out, in)}, or
    {name: None} to skip the shape check). Every key must land on a layer, or a UsageError names the first."""
    from qimg.weights.adapters import Adapter

    text = sorted(k for k in tensors if k.startswith(TEXT_ENCODER))
    if text:
        raise UsageError(f"{what} holds text-encoder weights ({listing(text)}); qimg applies LoRAs to the "
                         "transformer only: use a transformer-only file")
    other = sorted(k for k in tensors if refused(k))
    if other:
        raise UsageError(f"{what} is {refused(other[0])} ({listing(other)}); qimg applies LoRA, LoKr and LoHa only")
    config = peft_config(metadata, what)
    if any(name.endswith(".img_mlp.gate_layer") for name in layers):
        from qimg.weights.qwen21 import unfused_lora

        tensors = unfused_lora(tensors, what)
    flat = {name.replace(".", "_"): name for name in layers}
    groups, unmatched, layouts = {}, [], set()
    for key in sorted(tensors):
        layer, suffix = split_key(key)
        if suffix is None:
            unmatched.append(key)
            continue
        style, stripped, is_flat = layout(layer, suffix)
        name = flat.get(stripped) if is_flat else stripped
        if name not in layers:
            unmatched.append(key)
            continue
        if suffix != "alpha":  # bare alphas sit beside any layout
            layouts.add(style)
        kind, part = PARTS[suffix]
        group = groups.setdefault(name, {"kinds": set(), "parts": {}, "keys": {}, "key": key})
        if part in group["parts"]:  # the same layer under two key layouts: neither may silently win
            raise UsageError(f"{what}: {group['keys'][part]} and {key} are the same {part} of {name}; a file "
                             "holds each layer once")
        group["parts"][part], group["keys"][part] = tensors[key], key
        if kind:
            group["kinds"].add(kind)
    if unmatched:
        raise UsageError(f"{what}: {len(unmatched)} of its {len(tensors)} keys match no linear layer of this model's "
                         f"transformer: {listing(unmatched)}; is it a LoRA for another model?")
    adapters, kinds = {}, set()
    for name, group in groups.items():
        parts, key = group["parts"], group["key"]
        if len(group["kinds"]) != 1:
            raise UsageError(f"{what}: {key}: " + ("an alpha without the factors it scales" if not group["kinds"]
                                                  else "mixes adapter kinds " + ", ".join(sorted(group["kinds"]))))
        kind = group["kinds"].pop()
        factors = {k: v for k, v in parts.items() if k != "alpha"}
        if not complete(kind, factors):
            raise UsageError(f"{what}: the {kind} adapter of {name} is incomplete (has {', '.join(sorted(factors))})")
        bad = next((part for part, t in factors.items() if t.ndim != 2), None)
        if bad is not None:
            raise UsageError(f"{what}: {group['keys'][bad]}: adapter factors must be matrices (this one has "
                             f"{factors[bad].ndim} dimensions: is it for a convolution?)")
        if not all(t.is_floating_point() and bool(t.isfinite().all()) for t in factors.values()):
            raise UsageError(f"{what}: the factors of {name} are not all finite floating-point numbers; the file "
                             "is damaged or not a LoRA: download it again")
        adapter = Adapter(kind, factors, strength * sane_scale(file_scale(kind, parts, name, config, what), name, what))
        if kind == "lora" and factors["down"].shape[0] != factors["up"].shape[1]:
            raise UsageError(f"{what}: {name}: its down and up factors have different ranks")
        if layers[name] is not None and tuple(adapter.shape) != tuple(layers[name]):
            raise UsageError(f"{what}: {key} updates a {list(adapter.shape)} weight, but {name} is "
                             f"{list(layers[name])}; is it a LoRA for another model?")
        adapters[name] = adapter
        kinds.add(kind)
    names = {"lokr": "LoKr", "loha": "LoHa"}
    format = "+".join(sorted(layouts)) + "".join(f" {names[k]}" for k in sorted(kinds) if k in names)
    return format, adapters


def complete(kind: str, factors: dict) -> bool:
    if kind != "lokr":
        return set(factors) == COMPLETE[kind][0]
    have = set(factors)
    return any(have >= set(w1) for w1 in COMPLETE["lokr"]) and ("w2" in have or {"w2_a", "w2_b"} <= have)


def load(spec: LoraSpec, layers: dict) -> Lora:
    """Read `spec`'s file and map it onto `layers` (adapters.targets of the transformer)."""
    tensors, metadata, sha256 = read_file(spec.path)
    format, adapters = map_keys(tensors, metadata, layers, spec.scale, f"--lora {spec.path}")
    return Lora(spec.path.name, sha256, spec.scale, format, adapters)


def fingerprint(model: str, loras) -> str:
    """A model's fingerprint with its LoRAs (each file's sha256 and scale, in order); unchanged without any."""
    if not loras:
        return model
    parts = [model, *(f"{one.sha256}:{one.scale!r}" for one in loras)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def identity(specs) -> tuple:
    """What tells LoRA files apart without reading them (the worker's key for its loaded engine): each file's
    resolved path, size, modification time and scale."""
    def one(spec: LoraSpec):
        try:
            stat = spec.path.stat()
        except OSError:
            return str(spec.path), spec.scale  # reading it will say what is wrong
        return str(spec.path.resolve()), stat.st_size, stat.st_mtime_ns, spec.scale

    return tuple(one(spec) for spec in specs)


def summary(path: Path, layers: dict) -> dict:
    """What `qimg info` prints for a LoRA file: format, ranks, alphas, how many layers and which."""
    tensors, metadata, sha256 = read_file(path)
    format, adapters = map_keys(tensors, metadata, dict.fromkeys(layers), 1.0, str(path))
    ranks = sorted({a.tensors["down"].shape[0] for a in adapters.values() if a.kind == "lora"})
    alphas = sorted({float(t.float().item()) for k, t in tensors.items() if k.endswith(".alpha")})
    config = peft_config(metadata, str(path))
    if not alphas and config and "lora_alpha" in config:
        alphas = [config["lora_alpha"]]
    grouped = {}
    for name in adapters:
        pattern = re.sub(r"^transformer_blocks\.\d+\.", "transformer_blocks.*.", name)
        grouped[pattern] = grouped.get(pattern, 0) + 1
    return dict(file=path.name, sha256=sha256, format=format, rank=ranks[0] if len(ranks) == 1 else ranks,
                alpha=(alphas[0] if len(alphas) == 1 else alphas) or None, modules=len(adapters),
                targets=[f"{p} x{n}" if n > 1 else p for p, n in sorted(grouped.items())])
