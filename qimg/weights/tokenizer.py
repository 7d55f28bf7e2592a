"""Read a tokenizer folder into Qwen2's tokenizer (model/tokenizer.py), built with the `tokenizers` library
directly.

A `tokenizer/` folder holds either a `tokenizer.json` (the whole pipeline, as transformers >= 5 saves
it) or, like Qwen/Qwen-Image, `vocab.json` + `merges.txt` + `tokenizer_config.json`: for those we build
the same pipeline transformers' Qwen2Tokenizer builds (NFC, Qwen2's split regex, byte-level BPE) and
add the special tokens the config lists, at the ids it gives them.
"""

from pathlib import Path

from qimg.errors import QimgError
from qimg.model.tokenizer import PAD, SPLIT_REGEX, Tokenizer
from qimg.weights.folders import read_json_object


def read_tokenizer(folder: Path, vocabulary: Path | None = None) -> Tokenizer:
    """The tokenizer a folder's files describe; a QimgError naming the file when they are missing or wrong.
    vocabulary: another folder's vocab.json + merges.txt with this folder's tokenizer_config.json (the shipped
    Qwen3-VL tokenizer is Qwen2.5's BPE with more added tokens)."""
    config = read_json_object(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    bpe = _from_tokenizer_json(folder) if (folder / "tokenizer.json").is_file() else \
        _from_vocab(folder, config, vocabulary or folder)
    pad = config.get("pad_token") or PAD
    pad = pad["content"] if isinstance(pad, dict) else pad
    pad_id = bpe.token_to_id(pad)
    if pad_id is None:
        raise QimgError(f"{folder}: the pad token {pad!r} is not in the vocabulary")
    return Tokenizer(bpe, pad_id)


def _from_tokenizer_json(folder: Path):
    from tokenizers import Tokenizer as Pipeline

    try:
        bpe = Pipeline.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise QimgError(f"cannot read {folder / 'tokenizer.json'}: {e}") from None
    bpe.no_truncation()  # we cut and pad ourselves, exactly as the reference pipeline asks
    bpe.no_padding()
    return bpe


def _from_vocab(folder: Path, config: dict, files: Path):
    from tokenizers.models import BPE

    vocab, merges = files / "vocab.json", files / "merges.txt"
    if not vocab.is_file() or not merges.is_file():
        raise QimgError(f"{files} has no tokenizer.json and no vocab.json + merges.txt: the model folder is "
                        "incomplete")
    bpe = _pipeline(BPE.from_file(str(vocab), str(merges), unk_token=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    _add_tokens(bpe, _added_tokens(folder, config), folder)
    return bpe


def _pipeline(model):
    """Qwen2's pipeline around a BPE model, as transformers' Qwen2Tokenizer builds it: NFC, Qwen2's split
    regex, byte-level BPE."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Pipeline

    bpe = Pipeline(model)
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    return bpe


def _add_tokens(bpe, added: dict[int, tuple[str, bool]], source) -> None:
    from tokenizers import AddedToken

    for token_id, (content, special) in sorted(added.items()):
        token = AddedToken(content, special=special, normalized=False)
        (bpe.add_special_tokens if special else bpe.add_tokens)([token])
        if bpe.token_to_id(content) != token_id:  # added tokens take the next free id: they must come in order
            raise QimgError(f"{source}: added token {content!r} should have id {token_id}, not "
                            f"{bpe.token_to_id(content)}")


GGUF_NORMAL, GGUF_CONTROL, GGUF_USER, GGUF_UNUSED = 1, 3, 4, 5  # tokenizer.ggml.token_type values (gguf-py)


def from_gguf(meta: dict, source: str) -> Tokenizer:
    """The tokenizer a llama.cpp GGUF carries (`tokenizer.ggml.model` gpt2: tokens, their types, merges): its
    normal tokens and merges are the BPE, control and user-defined tokens are added at their ids (special and
    not), unused padding rows ([PAD151669] ...) are left out. source: the option and file, for messages."""
    from tokenizers.models import BPE

    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type")
    merges = meta.get("tokenizer.ggml.merges")
    if meta.get("tokenizer.ggml.model") != "gpt2" or not isinstance(tokens, list) or not isinstance(merges, list) \
            or not isinstance(types, list) or len(types) != len(tokens):
        raise QimgError(f"{source} carries no byte-level BPE tokenizer (tokenizer.ggml.model gpt2 with tokens, "
                        "token types and merges); qimg needs the one llama.cpp's converter writes")
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == GGUF_NORMAL}
    added = {i: (t, k == GGUF_CONTROL) for i, (t, k) in enumerate(zip(tokens, types)) if k in (GGUF_CONTROL, GGUF_USER)}
    pairs = [tuple(m.split(" ", 1)) for m in merges if isinstance(m, str) and " " in m]
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise QimgError(f"{source}: its normal tokens do not come first (ids 0 to {len(vocab) - 1}); not a Qwen2 "
                        "tokenizer")
    bpe = _pipeline(BPE(vocab, pairs, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    _add_tokens(bpe, added, source)
    pad_id = bpe.token_to_id(PAD)
    if pad_id is None:
        raise QimgError(f"{source}: the pad token {PAD!r} is not in its tokenizer")
    return Tokenizer(bpe, pad_id)


def _added_tokens(folder: Path, config: dict) -> dict[int, tuple[str, bool]]:
    """{id: (content, special)} from tokenizer_config.json's added_tokens_decoder, else added_tokens.json."""
    if "added_tokens_decoder" in config:
        return {int(i): (t["content"], t.get("special", True)) for i, t in config["added_tokens_decoder"].items()}
    if (folder / "added_tokens.json").is_file():
        return {i: (content, True) for content, i in read_json_object(folder / "added_tokens.json").items()}
    raise QimgError(f"{folder}: tokenizer_config.json lists no added tokens (<|im_start|> ...) and "
                    "added_tokens.json is missing")
