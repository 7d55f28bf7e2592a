"""`qimg edit`'s sizing and model kinds, and every refusal: one line on stderr, exit 2, nothing written."""

import json
import shutil

import numpy as np
import pytest
from helpers import one_line, pixels
from PIL import Image

from qimg.cache import prompt_key
from qimg.cli.app import run
from qimg.engine.instruct import calculate_dimensions, check_pictures
from qimg.errors import QimgWarning
from qimg.weights.folders import EDIT, EDIT_2509, EDIT_2511, QWEN_IMAGE, model_kind


@pytest.mark.parity
def test_calculate_dimensions_is_the_reference_s():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions as edit_dims
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as plus_dims

    for area in (1024 * 1024, 384 * 384, 15360):
        for w, h in [(451, 300), (1920, 1080), (1080, 1920), (1, 1), (1000, 999), (640, 480), (13, 700)]:
            ours = calculate_dimensions(area, w / h)
            assert ours == edit_dims(area, w / h)[:2] == plus_dims(area, w / h) or min(plus_dims(area, w / h)) < 32
    assert calculate_dimensions(1024 * 1024, 451 / 300) == (1248, 832)  # the research notes' figure
    assert calculate_dimensions(64 * 64, 1 / 200) == (32, 896)  # never an empty side


def test_model_kinds(tiny_model_dir, tiny_edit_checkpoints):
    assert model_kind(tiny_model_dir) == QWEN_IMAGE and not QWEN_IMAGE.edits
    assert {k: model_kind(f) for k, f in tiny_edit_checkpoints.items()} == {
        "edit": EDIT, "plus": EDIT_2509, "2511": EDIT_2511}
    assert [(k.name, k.edits, k.plus) for k in (EDIT, EDIT_2509, EDIT_2511)] == [
        ("edit", True, False), ("edit-2509", True, True), ("edit-2511", True, True)]


def test_an_edit_model_saved_by_the_inpaint_pipeline_is_qwen_image_edit(tiny_edit_dir, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    index = json.loads((tiny_edit_dir / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "QwenImageEditInpaintPipeline"}))
    assert model_kind(folder) == EDIT


def test_prompt_key_covers_the_pictures():
    a, b = np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8)
    assert prompt_key("x", "fp") == prompt_key("x", "fp", ())  # base prompts keep their keys
    keys = {prompt_key("x", "fp", ()), prompt_key("x", "fp", (a,)), prompt_key("x", "fp", (b,)),
            prompt_key("x", "fp", (a, b)), prompt_key("x", "fp", (b, a))}
    assert len(keys) == 5


def test_picture_checks():
    with pytest.raises(Exception, match="takes one picture"):
        check_pictures(EDIT, [(64, 64), (64, 64)], ["a.png", "b.png"])
    with pytest.raises(Exception, match="over 200:1"):
        check_pictures(EDIT_2509, [(64, 64), (4010, 20)], ["a.png", "b.png"])
    check_pictures(EDIT_2509, [(64, 64)] * 3, ["a.png"] * 3)
    with pytest.warns(QimgWarning, match="4 pictures"):
        check_pictures(EDIT_2511, [(64, 64)] * 4, ["a.png"] * 4)


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_edit_dir, tiny_edit_checkpoints):
    """Edit folders damaged one way each."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("broken")
    no_processor = shutil.copytree(tiny_edit_dir, root / "no-processor")
    shutil.rmtree(no_processor / "processor")
    no_vision = shutil.copytree(tiny_edit_dir, root / "no-vision")
    for file in (no_vision / "text_encoder").glob("*.safetensors"):
        save_file({k: v for k, v in load_file(file).items() if "visual" not in k}, file)
    layered = shutil.copytree(tiny_edit_dir, root / "layered")
    config = layered / "transformer" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"use_layer3d_rope": True}))
    zero_cond_yes = shutil.copytree(tiny_edit_checkpoints["2511"], root / "zero-cond-yes")
    config = zero_cond_yes / "transformer" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"zero_cond_t": "yes"}))
    return {"no-processor": no_processor, "no-vision": no_vision, "layered": layered, "zero-cond-yes": zero_cond_yes}


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)).save(path)
    Image.fromarray(np.zeros((10, 2010, 3), np.uint8)).save(tmp_path / "thin.png")
    shutil.copy(path, tmp_path / "ref.png")
    return path


CASES = {  # name: (model, extra arguments, fragment of the message)
    "base model": ("base", [], "is a Qwen-Image model; `qimg edit` needs a Qwen-Image-Edit model"),
    "built-in model": ("builtin", [], "the built-in model only generates: pass --model"),
    "no processor": ("no-processor", [], "no processor/preprocessor_config.json"),
    "no vision weights": ("no-vision", [], "has no vision tower weights"),
    "layered": ("layered", [], "use_layer3d_rope=True is not supported"),
    "zero_cond_t a string": ("zero-cond-yes", [], "config.json: zero_cond_t must be true or false, not 'yes'"),
    "ref on Edit v1": ("edit", ["--ref", "{in}"], "--ref: Qwen-Image-Edit takes one picture"),
    "elongated ref": ("plus", ["--ref", "{thin}"], "over 200:1"),
    "empty instruction": ("edit", ["-p", "  "], "--prompt is empty"),
    "size with a mask": ("edit", ["--rect", "0,0,8,8", "--size", "64x64"], "--size does not combine with a mask"),
    "strength without a mask": ("edit", ["--strength", "0.5"], "--strength 0.5 needs a mask"),
    "mask crop without a mask": ("edit", ["--mask-crop", "16"], "--mask-crop 16 needs a mask"),
    "empty mask": ("edit", ["--rect", "0,0,0,0"], "width and height must be positive"),
    "missing ref": ("plus", ["--ref", "{missing}"], "no such file"),
    "huge size": ("edit", ["--size", "60000x60000"], "--size 60000x60000 is 60000x60000 = 3,600 megapixels"),
    "output is the ref": ("plus", ["--ref", "{ref}", "-o", "{ref}", "--overwrite"], "a --ref picture"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_errors_are_one_line_exit_2_and_write_nothing(case, broken, tiny_model_dir, tiny_edit_checkpoints, picture,
                                                      tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QIMG_MODEL", raising=False)
    model, extra, fragment = CASES[case]
    folders = {"base": tiny_model_dir, "edit": tiny_edit_checkpoints["edit"], "plus": tiny_edit_checkpoints["plus"],
               **broken}
    names = {"in": picture, "thin": tmp_path / "thin.png", "ref": tmp_path / "ref.png",
             "missing": tmp_path / "missing.png"}
    extra = [a.format(**{k: str(v) for k, v in names.items()}) for a in extra]
    before = set(tmp_path.rglob("*"))
    args = ["edit", str(picture), "-p", "make it red", "-o", str(tmp_path / "out.png"), *extra, "--device", "cpu",
            "--no-worker", "--steps", "1", "--edit-area", "3072", "--vision-area", "1024"]
    code = run(args + ([] if model == "builtin" else ["-m", str(folders[model])]))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("qimg: error: ") and fragment in err, err
    assert set(tmp_path.rglob("*")) - before <= {p for p in tmp_path.rglob("*") if "qimg-cache" in p.parts}


@pytest.mark.parametrize("command", [["generate"], ["inpaint", "{in}", "--rect", "0,0,8,8"],
                                     ["outpaint", "{in}", "--left", "16"]], ids=["generate", "inpaint", "outpaint"])
def test_edit_models_refuse_the_generation_commands(command, tiny_edit_dir, picture, tmp_path, capsys):
    args = [a.replace("{in}", str(picture)) for a in command]
    code = run([*args, "-p", "x", "-m", str(tiny_edit_dir), "--device", "cpu", "--no-worker",
                "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "is a Qwen-Image-Edit model, which edits by instruction: use `qimg edit`" in err
    assert not (tmp_path / "o.png").exists()


def test_chain_steps_need_their_kind_of_model(tiny_model_dir, tiny_edit_dir, picture, tmp_path, capsys):
    (tmp_path / "edit.yaml").write_text('edits:\n  - edit: {prompt: "a hat"}\n')
    (tmp_path / "inpaint.yaml").write_text('edits:\n  - inpaint: {prompt: "a hat", rect: "0,0,8,8"}\n')
    for chain, model, fragment in [("edit.yaml", tiny_model_dir, "edit 1 (edit): "),
                                   ("inpaint.yaml", tiny_edit_dir, "edit 1 (inpaint): ")]:
        code = run(["chain", str(picture), str(tmp_path / chain), "-m", str(model), "--device", "cpu", "--no-worker",
                    "-o", str(tmp_path / "o.png")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and fragment in err, err
    for text, fragment in [('{prompt: "a hat", strength: 0.5}', "strength 0.5 needs a mask"),
                           ('{prompt: "a hat", ref: [in.png]}', "edit 1 (edit): --ref: Qwen-Image-Edit takes one")]:
        (tmp_path / "bad.yaml").write_text(f"edits:\n  - edit: {text}\n")
        code = run(["chain", str(picture), str(tmp_path / "bad.yaml"), "-m", str(tiny_edit_dir), "--device", "cpu",
                    "--no-worker", "-o", str(tmp_path / "o.png")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "o.png").exists()


def test_areas_come_from_qimg_json_and_the_command_line(tiny_edit_dir, picture, tmp_path, capsys, one_thread):
    folder = shutil.copytree(tiny_edit_dir, tmp_path / "model")
    (folder / "qimg.json").write_text(json.dumps({"edit_area": 64 * 64, "vision_area": 32 * 32, "steps": 1}))
    for extra, work in [([], calculate_dimensions(64 * 64, 64 / 48)), (["--edit-area", "2048"], [64, 32])]:
        code = run(["edit", str(picture), "-p", "x", "-m", str(folder), "--device", "cpu", "--no-worker", "--cfg", "1",
                    "--json", "--no-cache", "-o", str(tmp_path / "o.png"), "--overwrite", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        report = json.loads(out)
        assert report["work_size"] == list(work) and report["steps"] == 1 and report["vision_area"] == 32 * 32
        assert pixels(tmp_path / "o.png").shape == (48, 64, 3)


def test_a_chain_edit_step_needs_an_instruction(tiny_edit_dir, picture, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text('edits:\n  - edit: {prompt: "a hat"}\n  - edit: {prompt: "  "}\n')
    code = run(["chain", str(picture), str(tmp_path / "c.yaml"), "-m", str(tiny_edit_dir), "-o",
                str(tmp_path / "out.png"), "--device", "cpu", "--no-worker", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "edit 2 (edit): the prompt is empty" in err, err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("values, fragment", [
    ({"edit_area": "big"}, "edit_area must be a whole number of at least 1024"),
    ({"edit_area": 5}, "edit_area must be a whole number"),
    ({"vision_area": -3}, "vision_area must be"),
    ({"steps": True}, "steps must be"),
    ({"cfg": "4"}, "cfg must be a number of at least 0"),
    ({"negative_prompt": 3}, "negative_prompt must be a text"),
    ({"stpes": 3}, "unknown keys stpes")])
def test_qimg_json_values_are_checked(values, fragment, tiny_edit_dir, picture, tmp_path, capsys):
    folder = shutil.copytree(tiny_edit_dir, tmp_path / "model")
    (folder / "qimg.json").write_text(json.dumps(values))
    code = run(["edit", str(picture), "-p", "x", "-m", str(folder), "-o", str(tmp_path / "out.png"), "--device",
                "cpu", "--no-worker", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "qimg.json: " + fragment in err, err  # usage, as its shape's
    assert not (tmp_path / "out.png").exists()


# --- the areas, bounded by the processor's max_pixels, and the processor's own bounds ------------------------

BOUND = 28 * 28 * 256  # a processor that shrinks pictures to 200704 pixels


@pytest.fixture
def bounded(tiny_plus_dir, tmp_path):
    """A 2509 folder whose processor says max_pixels 200704 (an area over it buys nothing)."""
    folder = shutil.copytree(tiny_plus_dir, tmp_path / "bounded")
    config = folder / "processor" / "preprocessor_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"max_pixels": BOUND}))
    return folder


def refuse_loading(monkeypatch):
    from qimg.engine import components

    def loaded(*args, **kwargs):
        raise AssertionError("weights loaded")

    for name in ("load_module", "load_transformer", "load_instruct_encoder"):
        monkeypatch.setattr(components, name, loaded)


@pytest.mark.parametrize("where, fragment", [
    ("--vision-area", f"--vision-area 300000 is over {BOUND}, the most pixels this model's processor takes"),
    ("--edit-area", f"--edit-area 300000 is over {BOUND}"),
    ("qimg.json", f"qimg.json: vision_area 300000 is over {BOUND}"),
    ("chain", f"edit 1 (edit): vision_area 300000 is over {BOUND}"),
    ("chain default", f"edit 1 (edit): edit_area 300000 is over {BOUND}"),
])
def test_areas_over_the_processor_s_max_pixels_are_refused_before_loading(where, fragment, bounded, picture,
                                                                         tmp_path, cli, monkeypatch):
    refuse_loading(monkeypatch)
    common = ["-m", bounded, "-o", tmp_path / "out.png", "--device", "cpu", "--no-worker", "--steps", 1]
    if where.startswith("--"):
        code, _, err = cli("edit", picture, "-p", "x", where, 300000, *common)
    elif where == "qimg.json":
        (bounded / "qimg.json").write_text(json.dumps({"vision_area": 300000}))
        code, _, err = cli("edit", picture, "-p", "x", *common)
    else:
        text = ("edits:\n  - edit: {prompt: x, vision_area: 300000}\n" if where == "chain"
                else "edit_area: 300000\nedits:\n  - edit: {prompt: x}\n")
        (tmp_path / "c.yaml").write_text(text)
        code, _, err = cli("chain", picture, tmp_path / "c.yaml", *common)
    assert code == 2, err
    one_line(err, fragment, f"give at most {BOUND}", str(bounded / "processor" / "preprocessor_config.json"))
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("change, fragment", [
    ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels 5000 is over max_pixels 4000"),
    ({"max_pixels": "big"}, "max_pixels must be a whole number of pixels, not 'big'"),
    ({"max_pixels": None, "size": {"shortest_edge": 3136, "longest_edge": 2**40}},
     "size.longest_edge 1099511627776 is outside 1..12845056"),
])
def test_absurd_processor_bounds_are_refused_before_loading(change, fragment, tiny_plus_dir, picture, tmp_path, cli,
                                                            monkeypatch):
    refuse_loading(monkeypatch)
    folder = shutil.copytree(tiny_plus_dir, tmp_path / "model")
    config = folder / "processor" / "preprocessor_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | change))
    code, _, err = cli("edit", picture, "-p", "x", "-m", folder, "-o", tmp_path / "out.png", "--device", "cpu",
                       "--no-worker", "--steps", 1, "--edit-area", 3072, "--vision-area", 1024)
    assert code == 2, err
    one_line(err, f"{config}: {fragment}")
    assert not (tmp_path / "out.png").exists()
