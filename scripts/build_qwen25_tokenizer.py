"""Write the Qwen2.5 tokenizer qimg ships (qimg/weights/tokenizers/qwen2.5/) from llama.cpp's
`models/ggml-vocab-qwen2.gguf` (in llama.cpp's repository and in llama-cpp-python's sdist under vendor/llama.cpp/).

That GGUF holds Qwen2's byte-level BPE as llama.cpp's converter writes it: 151,643 normal tokens (ids 0-151642),
151,387 merges, then <|endoftext|>, <|im_start|>, <|im_end|> and [PADn] rows. Out come the files Qwen's own
tokenizer folders hold: vocab.json (the normal tokens), merges.txt, and tokenizer_config.json with the added tokens
of Qwen2.5-VL-7B-Instruct's tokenizer_config.json (151643-151664, their `special` flags as published there).

    python scripts/build_qwen25_tokenizer.py path/to/ggml-vocab-qwen2.gguf
"""

import json
import sys
from pathlib import Path

from gguf import GGUFReader

OUT = Path(__file__).resolve().parent.parent / "qimg" / "weights" / "tokenizers" / "qwen2.5"
NORMAL, CONTROL = 1, 3  # gguf-py's TokenType
# Qwen2.5-VL-7B-Instruct's added tokens by id, and whether each is special (its tokenizer_config.json).
ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
         ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
         ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
         ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
         ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
         ("<|repo_name|>", False), ("<|file_sep|>", False)]
FIRST_ADDED = 151643


def main(path: str) -> None:
    fields = GGUFReader(path).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = fields["tokenizer.ggml.merges"].contents()
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == NORMAL}
    assert sorted(vocab.values()) == list(range(FIRST_ADDED)), "the normal tokens are not ids 0-151642"
    assert [tokens[i] for i in range(FIRST_ADDED, FIRST_ADDED + 3)] == [t for t, _ in ADDED[:3]]
    assert all(types[FIRST_ADDED + i] == CONTROL for i in range(3))
    added = {str(FIRST_ADDED + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": s} for i, (t, s) in enumerate(ADDED)}
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
              "additional_special_tokens": [t for t, s in ADDED[1:14]], "bos_token": None,
              "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    print(f"{OUT}: {len(vocab)} tokens, {len(merges)} merges, {len(ADDED)} added tokens")


if __name__ == "__main__":
    main(sys.argv[1])
