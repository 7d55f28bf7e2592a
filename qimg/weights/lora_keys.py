"""The suffixes of LoRA keys: which factor of which adapter kind a key holds (lora.py maps files with them;
qwen21.py splits the updates of Qwen-Image-2.1's fused layer by them; single_file.py tells LoRAs from weights)."""

PARTS = {  # key suffix -> (adapter kind, factor name)
    "lora_A.weight": ("lora", "down"), "lora_B.weight": ("lora", "up"),
    "lora_A.default.weight": ("lora", "down"), "lora_B.default.weight": ("lora", "up"),
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"),
    **{f"lokr_{n}": ("lokr", n) for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b")},
    **{f"hada_{n}": ("loha", n) for n in ("w1_a", "w1_b", "w2_a", "w2_b")},
    "alpha": (None, "alpha"),
}


def split_key(key: str) -> tuple[str, str | None]:
    """(the layer part, the suffix naming the factor) of a key; suffix None when it is none qimg knows."""
    for suffix in PARTS:  # none is another's tail at a dot
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, None
