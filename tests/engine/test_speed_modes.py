"""Memory and speed options change placement and scheduling, not the picture: offload modes, the attention
backend, and tiled VAE decoding (close to one whole decode, used only when asked or large). --compile is
checked by benchmarks/gpu.py: compiling even the tiny blocks takes ~40 s on a CPU, too slow for a unit test."""

import numpy as np
import pytest
import torch

import qimg.engine.latents
from qimg.cli.app import run
from qimg.engine.components import Loading
from qimg.engine.engine import Engine
from qimg.engine.request import Sampling
from qimg.model.tiling import tile_starts, tiled_decode

JOB = dict(sampling=Sampling("a red circle", " ", steps=2, cfg=4.0, seed=3), width=64, height=48)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def baseline(tiny_model_dir):
    return Engine(tiny_model_dir, "cpu", "float32").generate(**JOB).image


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["model", "blocks"])
def test_offload_modes_give_identical_images(tiny_model_dir, baseline, offload):
    engine = Engine(tiny_model_dir, "cpu", "float32", loading=Loading(offload=offload))
    image = engine.generate(**JOB).image
    assert np.array_equal(image, baseline) and baseline.std() > 1
    if offload == "model":  # each component was freed after its part of the job
        assert engine._text is None and engine._transformer is None and engine._vae == {}
        assert np.array_equal(engine.generate(**JOB).image, baseline)  # and reloads on the next job


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["model", "blocks"])
def test_offload_modes_give_identical_inpaints_with_the_attention_mask(tiny_model_dir, offload):
    # the batched CFG pass with the inpaint attention plan, and model offload freeing the VAE's encoder and
    # decoder apart (a run that only decodes never loads the encoder)
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), np.float32)
    mask[8:24, 16:40] = 1
    job = dict(sampling=Sampling("a red circle", " ", steps=2, cfg=4.0, seed=3), attn_mask=True)
    base = Engine(tiny_model_dir, "cpu", "float32").inpaint(image, mask, **job).image
    engine = Engine(tiny_model_dir, "cpu", "float32", loading=Loading(offload=offload))
    assert np.array_equal(engine.inpaint(image, mask, **job).image, base)
    if offload == "model":
        assert engine._text is None and engine._transformer is None and engine._vae == {}


@pytest.mark.slow
def test_model_offload_loads_only_the_vae_part_it_needs(tiny_model_dir, monkeypatch):
    engine = Engine(tiny_model_dir, "cpu", "float32", loading=Loading(offload="model"))
    loaded = []
    vae = engine.vae
    monkeypatch.setattr(engine, "vae", lambda part: loaded.append(part) or vae(part))
    engine.generate(**JOB)
    assert loaded == ["decoder"] and engine._vae == {}


def test_math_attention_backend_matches_auto(tiny_model_dir, baseline):
    image = Engine(tiny_model_dir, "cpu", "float32", loading=Loading(attention="math")).generate(**JOB).image
    assert np.abs(image.astype(int) - baseline).max() <= 1


@pytest.mark.parametrize("n, tile, overlap", [(10, 16, 4), (16, 16, 4), (40, 16, 4), (37, 16, 8), (64, 24, 8)])
def test_tiles_cover_everything_with_the_overlap(n, tile, overlap):
    starts = tile_starts(n, tile, overlap)
    assert starts[0] == 0 and min(n, starts[-1] + tile) == n
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap


@pytest.mark.slow
def test_tiled_decode_is_close_to_a_whole_decode(tiny_model_dir):
    vae = Engine(tiny_model_dir, "cpu", "float32").vae("decoder")
    z = torch.randn(1, 16, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole, tiled = vae.decode(z), tiled_decode(vae.decode, z, tile=24, overlap=8)
    error = (tiled - whole).abs()
    assert tiled.shape == whole.shape and error.mean() < 0.02 and error.max() < 0.3
    bad_seams = tiled_decode(vae.decode, z, tile=24, overlap=1)  # the overlap is what hides the seams
    assert (bad_seams - whole).abs().mean() > error.mean()


@pytest.mark.slow
def test_engine_tiles_only_when_asked_or_above_the_threshold(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(qimg.engine.latents, "TILE", 24)  # small tiles, so a small latent spans several
    latent = torch.randn(1, 16, 40, 40, generator=torch.Generator().manual_seed(1))  # 320 x 320 px
    decoded = {mode: Engine(tiny_model_dir, "cpu", "float32", loading=Loading(vae_tiling=mode)).decode(latent)
               for mode in ("off", "on", "auto")}
    assert np.array_equal(decoded["auto"], decoded["off"]) and not np.array_equal(decoded["on"], decoded["off"])
    monkeypatch.setattr(qimg.engine.latents, "TILE_ABOVE", 256 * 256)
    assert np.array_equal(Engine(tiny_model_dir, "cpu", "float32").decode(latent), decoded["on"])


@pytest.mark.parametrize("args, message", [
    (["--offload", "disk"], "Invalid value for '--offload': 'disk' is not one of 'none', 'model', 'blocks'"),
    (["--attention", "fast"], "Invalid value for '--attention': 'fast' is not one of 'auto', 'math', 'flash', "
                                "'efficient', 'cudnn'"),
    (["--vae-tiling", "yes"], "Invalid value for '--vae-tiling': 'yes' is not one of 'auto', 'on', 'off'"),
    (["--offload", "blocks", "--compile"], "--compile does not combine with --offload blocks"),
])
def test_bad_speed_options_are_usage_errors(tiny_model_dir, tmp_path, capsys, args, message):
    code = run(["generate", "-m", str(tiny_model_dir), "-p", "x", "-o", str(tmp_path / "o.png"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"qimg: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_the_cli_offers_exactly_the_choices_the_layers_below_check():
    """One tuple per choice list: the CLI's Literal types are the engine's, the weights' and the masks' lists."""
    from typing import get_args

    from qimg import masks
    from qimg.cli import options
    from qimg.engine import components, devices
    from qimg.weights import transformer

    def offered(option):
        return get_args(get_args(option)[0])  # Annotated[Literal[...], Option] -> the Literal's values

    assert offered(options.DtypeOpt) == ("auto", *devices.DTYPES)
    assert offered(options.OffloadOpt) == components.OFFLOAD and offered(options.AttentionOpt) == components.ATTENTION
    assert offered(options.TilingOpt) == components.TILING and offered(options.QuantizeOpt) == transformer.QUANTIZE
    assert get_args(options.Anchor) == tuple(masks.ANCHORS)


@pytest.mark.slow
def test_chain_takes_the_speed_options_but_its_edits_do_not(tiny_model_dir, tmp_path, capsys):
    from PIL import Image

    photo_png = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photo_png)
    chain = tmp_path / "c.yaml"
    chain.write_text("edits:\n  - inpaint: {prompt: x, rect: '0,0,16,16', steps: 2}\n")
    out = tmp_path / "o.png"
    code = run(["chain", str(photo_png), str(chain), "-m", str(tiny_model_dir), "-o", str(out), "--no-cache",
                "--offload", "model", "--vae-tiling", "off"])
    assert code == 0 and out.exists(), capsys.readouterr().err
    chain.write_text("edits:\n  - inpaint: {prompt: x, rect: '0,0,16,16', steps: 2, offload: model}\n")
    code = run(["chain", str(photo_png), str(chain), "-m", str(tiny_model_dir), "-o", str(tmp_path / "p.png")])
    assert code == 2 and "unknown key 'offload'" in capsys.readouterr().err


def test_a_preset_may_set_speed_options(tiny_model_dir, tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("offload: disk\nvae_tiling: 'on'\n")
    code = run(["generate", "-m", str(tiny_model_dir), "-p", "x", "-o", str(tmp_path / "o.png"),
                "--preset", str(preset)])
    message = f"preset {preset}: offload: 'disk' is not one of 'none', 'model', 'blocks'"
    assert code == 2 and message in capsys.readouterr().err
