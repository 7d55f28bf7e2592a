"""The latent and prompt caches through the CLI: a second edit of an output neither loads nor runs the VAE
encoder, known prompts never load the text encoder, damaged entries are rebuilt, and the cache stays out of the
way of correctness (byte-identical pixels outside the mask, same image for the same seed)."""

import json

import numpy as np
import pytest
from helpers import pixels
from PIL import Image

COMMON = ["--steps", "2", "--seed", "4", "--device", "cpu", "--json"]
PHOTO = np.s_[100:236, 150:350]  # the `photo` fixture: 200x136, neither side a multiple of 16, so the model runs
# on a padded copy


@pytest.fixture
def spy(monkeypatch):
    """Records what the engine loads and runs, calling straight through to the real code."""
    import qimg.engine.components
    import qimg.model.vae

    seen = {"loaded": [], "text_encoders": 0, "vae_encoder_runs": 0}
    load_module, encoder_forward = qimg.engine.components.load_module, qimg.model.vae.Encoder.forward

    def recording_load(build, folder, *args, only=()):
        seen["loaded"].append((folder.name, only))
        return load_module(build, folder, *args, only=only)

    load_text_encoder = qimg.engine.components.load_text_encoder

    def recording_text_encoder(*args):
        seen["text_encoders"] += 1
        return load_text_encoder(*args)

    def recording_forward(self, x):
        seen["vae_encoder_runs"] += 1
        return encoder_forward(self, x)

    monkeypatch.setattr(qimg.engine.components, "load_module", recording_load)
    monkeypatch.setattr(qimg.engine.components, "load_text_encoder", recording_text_encoder)
    monkeypatch.setattr(qimg.model.vae.Encoder, "forward", recording_forward)
    seen["vae_encoder_loaded"] = lambda: any(name == "vae" and "encoder." in only for name, only in seen["loaded"])
    return seen


@pytest.mark.slow
def test_second_edit_of_an_output_takes_its_latent_from_the_cache(tiny_model_dir, photo, tmp_path, cli, spy):
    first, second = tmp_path / "1.png", tmp_path / "2.png"
    code, report, err = cli.json("inpaint", photo, "-m", tiny_model_dir, "-p", "a red circle",
                                 "--rect", "20,20,60,40", "-o", first, *COMMON)
    assert code == 0, err
    assert (report["latent_cache"], report["prompt_cache"]) == ("miss", "miss")
    assert spy["vae_encoder_loaded"]() and spy["vae_encoder_runs"] == 1 and spy["text_encoders"] == 1

    spy["loaded"].clear()
    spy["vae_encoder_runs"] = spy["text_encoders"] = 0
    code, report, err = cli.json("inpaint", first, "-m", tiny_model_dir, "-p", "a red circle",
                                 "--rect", "100,60,50,50", "-o", second, *COMMON)
    assert code == 0, err
    assert (report["latent_cache"], report["prompt_cache"]) == ("hit", "hit")
    assert not spy["vae_encoder_loaded"]() and spy["vae_encoder_runs"] == 0 and spy["text_encoders"] == 0
    assert ("vae", ("decoder.", "post_quant_conv.")) in spy["loaded"]  # decoding still happens
    before, after = pixels(first), pixels(second)
    inside = np.zeros(before.shape[:2], bool)
    inside[60:110, 100:150] = True
    assert np.array_equal(after[~inside], before[~inside]) and (after[inside] != before[inside]).any()
    assert json.loads(Image.open(second).info["qimg"])["latent_cache"] == "hit"


@pytest.mark.slow
def test_no_cache_encodes_and_stores_nothing(tiny_model_dir, photo, tmp_path, cli, spy, cache_dir):
    code, report, err = cli.json("inpaint", photo, "-m", tiny_model_dir, "-p", "x", "--rect", "0,0,50,50",
                                 "-o", tmp_path / "o.png", "--no-cache", *COMMON)
    assert code == 0, err
    assert (report["latent_cache"], report["prompt_cache"]) == ("off", "off")
    assert spy["vae_encoder_runs"] == 1 and not cache_dir.exists()


@pytest.mark.slow
def test_cache_dir_option_and_the_input_latent_is_stored_on_a_miss(tiny_model_dir, photo, tmp_path, cli, spy):
    args = ["-m", tiny_model_dir, "-p", "x", "--rect", "0,0,50,50", "--cache-dir", tmp_path / "c", *COMMON]
    assert cli.json("inpaint", photo, *args, "-o", tmp_path / "1.png")[1]["latent_cache"] == "miss"
    code, report, err = cli.json("inpaint", photo, *args, "-o", tmp_path / "2.png", "--seed", "5")
    assert code == 0 and report["latent_cache"] == "hit" and spy["vae_encoder_runs"] == 1, err
    assert list((tmp_path / "c").glob("latent/*/*.safetensors"))


@pytest.mark.slow
def test_prompt_cache_hit_skips_the_text_encoder_and_gives_the_same_image(tiny_model_dir, tmp_path, cli, spy):
    args = ["generate", "-m", tiny_model_dir, "-p", "一只猫 on a table", "--size", "64x48", "--cfg", "3", *COMMON]
    code, report, err = cli.json(*args, "-o", tmp_path / "1.png")
    assert code == 0 and report["prompt_cache"] == "miss" and spy["text_encoders"] == 1, err
    code, report, err = cli.json(*args, "-o", tmp_path / "2.png")
    assert code == 0 and report["prompt_cache"] == "hit" and spy["text_encoders"] == 1, err
    assert np.array_equal(pixels(tmp_path / "1.png"), pixels(tmp_path / "2.png"))
    assert not spy["vae_encoder_loaded"]()  # generating never needs the encoder
    code, report, err = cli.json(*args, "-o", tmp_path / "3.png", "--negative-prompt", "blurry")
    assert code == 0 and report["prompt_cache"] == "miss" and spy["text_encoders"] == 2, err


@pytest.mark.slow
def test_generated_output_is_edited_without_the_vae_encoder(tiny_model_dir, tmp_path, cli, spy):
    gen = tmp_path / "g.png"
    assert cli.json("generate", "-m", tiny_model_dir, "-p", "x", "--size", "64x48", "-o", gen, *COMMON)[0] == 0
    code, report, err = cli.json("inpaint", gen, "-m", tiny_model_dir, "-p", "y", "--rect", "8,8,16,16",
                                 "-o", tmp_path / "e.png", *COMMON)
    assert code == 0 and report["latent_cache"] == "hit" and spy["vae_encoder_runs"] == 0, err


@pytest.mark.slow
def test_damaged_latent_entry_is_reported_recomputed_and_rebuilt(tiny_model_dir, photo, tmp_path, cli, cache_dir):
    args = ["-m", tiny_model_dir, "-p", "x", "--rect", "0,0,50,50", *COMMON]
    assert cli.json("inpaint", photo, *args, "-o", tmp_path / "1.png")[0] == 0
    for entry in cache_dir.glob("latent/*/*.safetensors"):
        entry.write_bytes(entry.read_bytes()[:-100])  # truncated, as by a full disk or a killed copy
    code, report, err = cli.json("inpaint", photo, *args, "-o", tmp_path / "2.png")
    assert code == 0 and report["latent_cache"] == "miss"
    assert err.count("qimg: warning: cache entry") == 1 and "damaged" in err
    code, report, err = cli.json("inpaint", photo, *args, "-o", tmp_path / "3.png")
    assert code == 0 and report["latent_cache"] == "hit" and "warning" not in err
    assert np.array_equal(pixels(tmp_path / "2.png"), pixels(tmp_path / "3.png"))


@pytest.mark.slow
def test_edit_along_a_padded_edge_stores_no_latent_for_its_output(tiny_model_dir, photo, tmp_path, cli):
    """The padding strip of the latent no longer matches the output's own edge: the next edit must encode."""
    first = tmp_path / "1.png"
    assert cli.json("inpaint", photo, "-m", tiny_model_dir, "-p", "x", "--rect", "180,20,20,20",
                    "-o", first, *COMMON)[0] == 0
    code, report, err = cli.json("inpaint", first, "-m", tiny_model_dir, "-p", "x", "--rect", "0,0,20,20",
                                 "-o", tmp_path / "2.png", *COMMON)
    assert code == 0 and report["latent_cache"] == "miss", err


@pytest.mark.slow
def test_latent_of_a_cropped_edit_never_stands_for_the_whole_output(tiny_model_dir, photo, tmp_path, cli):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "qimg.json").write_text(json.dumps({"max_pixels": 64 * 64}))
    first = tmp_path / "1.png"
    code, report, err = cli.json("inpaint", photo, "-m", model, "-p", "x", "--rect", "10,10,20,20",
                                 "--context", "8", "-o", first, *COMMON)
    assert code == 0 and report["box"] != [0, 0, 200, 136], err
    # With the default working area the whole output fits: it is looked up, and must be encoded.
    code, report, err = cli.json("inpaint", first, "-m", tiny_model_dir, "-p", "x", "--rect", "10,10,20,20",
                                 "-o", tmp_path / "2.png", *COMMON)
    assert code == 0 and report["latent_cache"] == "miss", err


def test_bad_cache_size_is_a_usage_error(configs_only, photo, tmp_path, cli):
    code, _, err = cli.json("inpaint", photo, "-m", configs_only, "-p", "x", "--rect", "0,0,9,9",
                            "--cache-size", "lots")
    assert code == 2 and err.strip().count("\n") == 0 and "--cache-size" in err
