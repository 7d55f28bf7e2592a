"""The Qwen2.5 tokenizer qimg ships (qimg/weights/tokenizers/qwen2.5/), read by weights/tokenizer.read_tokenizer:
llama.cpp's own test strings give llama.cpp's ids (data/ggml-vocab-qwen2.gguf.inp/.out, copied whole from
llama.cpp's models/, as its tests/test-tokenizer-0 reads them), Qwen2.5-VL's added tokens have their published ids,
the prompt templates read as transformers' Qwen2Tokenizer reads them; and a safetensors text encoder with no
tokenizer beside it takes the shipped one only when its vocabulary has a row for every id."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qimg.errors import UsageError
from qimg.model import instruct_text, text
from qimg.weights.shipped import TOKENIZER, TOKENIZER_IDS
from qimg.weights.split_files import Files, tokenizer_for, tokenizer_label, tokenizer_place
from qimg.weights.tokenizer import read_tokenizer

pytestmark = pytest.mark.slow  # reading the 151,643-token vocabulary takes 1-2 s
DATA = Path(__file__).parent / "data"
SEPARATOR = "\n__ggml_vocab_test__\n"  # llama.cpp's tests/test-tokenizer-0.py splits the .inp file on it
# Qwen2.5-VL-7B-Instruct's tokenizer_config.json added_tokens_decoder: id -> (content, special)
ADDED = {151643: ("<|endoftext|>", True), 151644: ("<|im_start|>", True), 151645: ("<|im_end|>", True),
         151646: ("<|object_ref_start|>", True), 151647: ("<|object_ref_end|>", True),
         151648: ("<|box_start|>", True), 151649: ("<|box_end|>", True), 151650: ("<|quad_start|>", True),
         151651: ("<|quad_end|>", True), 151652: ("<|vision_start|>", True), 151653: ("<|vision_end|>", True),
         151654: ("<|vision_pad|>", True), 151655: ("<|image_pad|>", True), 151656: ("<|video_pad|>", True),
         151657: ("<tool_call>", False), 151658: ("</tool_call>", False), 151659: ("<|fim_prefix|>", False),
         151660: ("<|fim_middle|>", False), 151661: ("<|fim_suffix|>", False), 151662: ("<|fim_pad|>", False),
         151663: ("<|repo_name|>", False), 151664: ("<|file_sep|>", False)}
PROMPTS = ["a red circle on a blue background", "写着你好世界的牌子", "  two  spaces,\ttabs\nand 🦙 emoji 1234567",
           "Picture 1: <|vision_start|><|image_pad|><|vision_end|>make it red", "it's <|im_end|> inside"]


@pytest.fixture(scope="module")
def shipped():
    return read_tokenizer(TOKENIZER)


def test_llama_cpp_test_strings_give_its_ids(shipped):
    texts = (DATA / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)[:-1]
    expected = (DATA / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(texts) == len(expected) == 46
    for sample, ids in zip(texts, expected):
        assert shipped.ids([sample])[0] == [int(i) for i in ids.split()], sample


def test_added_tokens_have_their_ids_and_the_vocabulary_its_size(shipped):
    for token_id, (content, _) in ADDED.items():
        assert shipped.bpe.token_to_id(content) == token_id
        assert shipped.ids([content])[0] == [token_id]
    assert shipped.pad_id == 151643 and shipped.bpe.get_vocab_size() == TOKENIZER_IDS == max(ADDED) + 1
    assert shipped.ids(["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"]) == \
        [[151644, 8948, 198], [151644, 872, 198], [151644, 77091, 198]]  # the ids the research quotes


@pytest.mark.parity
def test_prompt_templates_read_as_transformers_reads_them(shipped):
    from transformers import Qwen2TokenizerFast

    theirs = Qwen2TokenizerFast.from_pretrained(TOKENIZER)
    assert {i: (t.content, t.special) for i, t in theirs.added_tokens_decoder.items()} == ADDED
    texts = [text.TEMPLATE.format(p) for p in PROMPTS] + \
        [instruct_text.prompt_text(p, pictures, plus) for p in PROMPTS for pictures, plus in ((1, False), (2, True))]
    assert shipped.ids(texts) == theirs(texts).input_ids
    assert len(shipped.ids([text.TEMPLATE.split("{}")[0]])[0]) == text.DROP  # the prefix the model drops
    assert len(shipped.ids([instruct_text.SYSTEM])[0]) == instruct_text.DROP


def text_encoder(path: Path, rows: int) -> Path:
    """A safetensors text encoder's header as far as the tokenizer's choice reads it: its token embedding."""
    save_file({"model.embed_tokens.weight": torch.ones(rows, 1)}, str(path))
    return path


def test_a_safetensors_text_encoder_takes_the_shipped_tokenizer_when_none_is_beside_it(tmp_path):
    files = Files(text_encoder=text_encoder(tmp_path / "qwen_2.5_vl_7b.safetensors", 152064))
    nowhere = tmp_path / "configs"  # a folder with no tokenizer/, as the shipped configs are
    nowhere.mkdir()
    assert tokenizer_place(files, nowhere, edits=False) == TOKENIZER
    assert tokenizer_for(files, nowhere, edits=True).pad_id == 151643  # Edit's template prefix is 64 tokens too
    assert tokenizer_label(files, nowhere, edits=False) == "qimg's Qwen2.5 (shipped)"
    beside = tmp_path / "qwen25_tokenizer"
    beside.mkdir()
    (beside / "vocab.json").write_text("{}")  # one beside the file comes first
    assert tokenizer_place(files, nowhere, edits=False) == beside
    assert tokenizer_label(files, nowhere, edits=False) == "qwen25_tokenizer/ beside the file"
    (nowhere / "tokenizer").mkdir()
    (nowhere / "tokenizer" / "tokenizer.json").write_text("{}")  # and the model folder's before that
    assert tokenizer_label(files, nowhere, edits=False) == "the model folder's tokenizer/"


def test_a_vocabulary_too_small_for_the_shipped_tokenizer_is_refused(tmp_path):
    files = Files(text_encoder=text_encoder(tmp_path / "small.safetensors", TOKENIZER_IDS - 1))
    with pytest.raises(UsageError, match=f"no tokenizer for it.*{TOKENIZER_IDS} rows or more, not this file's "
                                         f"{TOKENIZER_IDS - 1}.*qwen25_tokenizer/"):
        tokenizer_place(files, tmp_path, edits=False)
