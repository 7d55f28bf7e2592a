"""Every file a user hands qimg is opened one way (qimg.small_files): a regular file only, bounded reads, its
header checked before anything hashes or loads it. A device, a FIFO nobody writes or a link to either is one line
and exit 2, at once: each run here goes through a thread with a timeout, so a regression fails instead of hanging.
A file of the wrong kind is named for what it is; deep nesting and duplicate keys are one line naming the file."""

import json
import os
import threading

import pytest
import torch
from helpers import one_line
from safetensors.torch import save_file

TIMEOUT = 60
NESTED = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion allows


@pytest.fixture
def qimg(cli):
    """cli() in a thread that must end within TIMEOUT seconds: (exit code, stdout, stderr)."""
    def call(*args):
        result = []
        thread = threading.Thread(target=lambda: result.append(cli(*args)), daemon=True)
        thread.start()
        thread.join(TIMEOUT)
        assert result, f"qimg {' '.join(map(str, args))} still ran after {TIMEOUT} s"
        return result[0]

    return call


def special(tmp_path, kind: str, name: str):
    """(the path, what the error calls it) for a device, a FIFO, or a link to either."""
    target = "/dev/zero"
    if "fifo" in kind:
        target = tmp_path / f"fifo-{name}"
        os.mkfifo(target)
    if not kind.startswith("link"):
        return target, ("FIFO" if "fifo" in kind else "character device")
    link = tmp_path / name
    link.symlink_to(target)
    return link, ("FIFO" if "fifo" in kind else "character device")


KINDS = ["dev-zero", "fifo", "link-to-dev-zero", "link-to-fifo"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["option", "preset", "info"])
def test_a_lora_that_is_no_regular_file_is_one_line_at_once(qimg, tmp_path, configs_only, kind, how):
    path, called = special(tmp_path, kind, "style.safetensors")
    if how == "info":
        code, _, err = qimg("info", path)
    else:
        (tmp_path / "p.yaml").write_text(f"lora: ['{path}']\n")
        given = ["--lora", path] if how == "option" else ["--preset", tmp_path / "p.yaml"]
        code, _, err = qimg("generate", "-p", "x", "-m", configs_only, "-o", tmp_path / "o.png", *given)
    assert code == 2
    one_line(err, str(path), called, "not a file")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("option", ["--transformer", "--prompts", "--preset"])
def test_other_user_files_that_are_no_regular_file_are_one_line_at_once(qimg, tmp_path, configs_only, kind,
                                                                        option):
    path, called = special(tmp_path, kind, "file.yaml")
    out = ["--out-dir", tmp_path / "o"] if option == "--prompts" else ["-p", "x", "-o", tmp_path / "o.png"]
    code, _, err = qimg("generate", "-m", configs_only, *out, option, path)
    assert code == 2
    one_line(err, str(path), called)
    assert "no such file" not in err and not out[-1].exists()


def transformer_file(path):
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4), "img_in.weight": torch.zeros(4, 4)},
              path)
    return path


def lora_file(path):
    save_file({"img_in.lora_down.weight": torch.zeros(2, 4), "img_in.lora_up.weight": torch.zeros(4, 2)}, path)
    return path


def test_a_file_of_the_wrong_kind_is_named_for_what_it_is(qimg, tmp_path, configs_only):
    transformer, lora = transformer_file(tmp_path / "t.safetensors"), lora_file(tmp_path / "l.safetensors")
    (tmp_path / "q.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    common = ["-p", "x", "-m", configs_only, "-o", tmp_path / "o.png"]
    for args, fragments in [
        (["info", tmp_path / "q.gguf"], ["q.gguf: a GGUF file of architecture none", "--transformer", "qwen_image"]),
        (["generate", *common, "--lora", transformer], ["--lora", "a transformer's weights, not a LoRA"]),
        (["generate", *common, "--transformer", lora], ["looks like a LoRA", "lora_A/lora_down", "use --lora"]),
    ]:
        code, _, err = qimg(*args)
        assert code == 2, err
        one_line(err, *fragments)
    code, out, err = qimg("info", transformer, "--json")  # a model part's file is described, not refused
    assert code == 0 and json.loads(out)["part"] == "transformer" and json.loads(out)["option"] == "--transformer"


def raw_safetensors(path, header: bytes):
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


def test_deeply_nested_json_in_a_lora_header_is_one_line(qimg, tmp_path, configs_only):
    peft = tmp_path / "peft.safetensors"
    save_file({"img_in.lora_A.weight": torch.zeros(2, 4), "img_in.lora_B.weight": torch.zeros(4, 2)}, peft,
              metadata={"lora_adapter_metadata": NESTED})
    header = raw_safetensors(tmp_path / "header.safetensors", b'{"a": ' + NESTED.encode() + b"}")
    for file, fragment in [(peft, "lora_adapter_metadata: nested too deeply"), (header, "nested too deeply")]:
        for args in (["info", file], ["generate", "-p", "x", "-m", configs_only, "--lora", file]):
            code, _, err = qimg(*args)
            assert code == 2, err
            one_line(err, str(file), fragment)


@pytest.mark.parametrize("content, fragment", [
    (b'"a cat"\n' + NESTED.encode() + b"\n", "p.jsonl line 2: nested too deeply"),
    (b'{"prompt": "a", "seed": 1, "seed": 2}\n', "p.jsonl line 1: gives the key 'seed' twice"),
    (b'"a"\n{"prompt": "b", "size": "64x64", "prompt": "c"}\n', "p.jsonl line 2: gives the key 'prompt' twice"),
])
def test_a_jsonl_prompts_line_nested_too_deeply_or_giving_a_key_twice(qimg, tmp_path, configs_only, content,
                                                                       fragment):
    (tmp_path / "p.jsonl").write_bytes(content)
    code, _, err = qimg("generate", "--prompts", tmp_path / "p.jsonl", "-m", configs_only, "--out-dir",
                        tmp_path / "o")
    assert code == 2
    one_line(err, fragment)
    assert not (tmp_path / "o").exists()
