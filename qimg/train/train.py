"""Train the built-in model on synthetic scenes: the VAE, then the text encoder and MMDiT together.

    python -m qimg.train OUT_FOLDER [--minutes 90] [--seed 0]

Stages (printed as they go, with losses): render the scenes; train the VAE as an autoencoder on
crops; encode every scene to a latent once and set the VAE's latent statistics from them; train the
MMDiT with flow matching on those latents while the text encoder learns from scratch through it,
with the object tokens weighted up and a shape contrast that makes the shape word count (train_dit).
The time budget is split between the stages and learning-rate schedules follow elapsed time, so a
run ends on time on any machine (more steps on a faster one). Weights are exported in the diffusers
layout, loadable by qimg and by diffusers' QwenImagePipeline.
"""

import copy
import dataclasses
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from qimg.model.transformer import QwenImageTransformer, TransformerConfig, patchify
from qimg.model.vae import CausalConv3d, QwenImageVAE, VAEConfig
from qimg.sampling import noised, time_shift
from qimg.train.checkpoint import text_encoder, write_folder
from qimg.train.evaluate import background
from qimg.train.shapes import LANGUAGES, SHAPES, Scene, caption, render, sample_scene
from qimg.train.text import Prompts, retokenize, shapes_tokenizer, spread_embeddings

SIZE = 128  # native resolution: 16x16 latents, 64 image tokens
TEXT_WIDTH = 128
TRANSFORMER = TransformerConfig(num_layers=4, attention_head_dim=32, num_attention_heads=6,
                                joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(8, 12, 12))
VAE = VAEConfig(base_dim=16, num_res_blocks=1, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16)
DEFAULTS = {"width": SIZE, "height": SIZE, "steps": 24, "cfg": 4.0, "max_pixels": SIZE * SIZE}
UNCOND = 0.1  # caption dropout, so true CFG has an unconditional (" ") branch to push away from
SHIFT = 4.0  # timestep shift towards noise for part of each batch: flat-colour scenes stay legible in the
# noisy latent down to t ~ 0.9 (a colour is averaged over hundreds of latent values), so only near-pure noise
# needs the prompt; the rest keeps the unshifted spread, where outlines and shapes are learned
CONTRAST_T = (0.4, 0.95)  # timesteps where the shape is still open but the prompt can settle it: below, the
# noisy latent shows the outline already; above, the predicted scene is too blurred to have corners


def log(stage: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {msg}", flush=True)


def lr_at(progress: float, peak: float, warmup: float = 0.03) -> float:
    """Linear warmup then cosine decay to 10% of peak; progress in [0, 1] of the stage's time."""
    if progress < warmup:
        return peak * progress / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) in [-1, 1], as the engine's encode does."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1


def init_single_frame(vae: QwenImageVAE) -> None:
    """Re-initialise causal 3D convs for single frames: only the last temporal slice ever sees data, so
    draw it with the fan-in of a 2D conv (PyTorch's init counts all three slices, starting every layer
    ~1/sqrt(3) too small) and zero the idle slices."""
    for module in vae.modules():
        if isinstance(module, CausalConv3d) and module.weight.shape[2] == 3:
            module.weight.data.zero_()
            torch.nn.init.kaiming_uniform_(module.weight.data[:, :, -1], a=math.sqrt(5))


def train_vae(images: np.ndarray, seconds: float, seed: int, batch: int = 32, crop: int = 32) -> QwenImageVAE:
    """A deterministic autoencoder on random crops (the posterior mean is all the engine uses), with a
    small pull of the latents towards zero so their scale stays tame."""
    torch.manual_seed(seed)
    vae = QwenImageVAE(VAE)
    init_single_frame(vae)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3, betas=(0.9, 0.99))
    rng = np.random.default_rng(seed)
    start, step = time.time(), 0
    while (elapsed := time.time() - start) < seconds:
        for g in opt.param_groups:
            g["lr"] = lr_at(elapsed / seconds, 1e-3)
        idx = rng.integers(0, len(images), batch)
        y0, x0 = rng.integers(0, SIZE - crop + 1, 2) // 8 * 8
        x = to_tensor(images[idx, y0:y0 + crop, x0:x0 + crop]).contiguous(memory_format=torch.channels_last)
        mean = vae.quant_conv(vae.encoder(x))[:, : VAE.z_dim]
        out = vae.decoder(vae.post_quant_conv(mean))
        recon = (out - x).abs().mean() + F.mse_loss(out, x)
        loss = recon + 1e-4 * mean.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log("vae", f"step {step} recon {recon.item():.4f} ({elapsed / 60:.1f}/{seconds / 60:.0f} min)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae: QwenImageVAE, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Posterior means of every image (N, 16, h, w), normalised by the VAE's latent statistics (none yet
    for a freshly trained VAE: its mean 0 and std 1 leave them as they are)."""
    return torch.cat([vae.encode(to_tensor(images[i:i + batch]).contiguous(memory_format=torch.channels_last))
                      for i in range(0, len(images), batch)])  # channels_last: ~3x faster convs


def normalise(vae: QwenImageVAE, latents: torch.Tensor) -> torch.Tensor:
    """Set the VAE's per-channel latent statistics from the data; return the normalised latents."""
    mean = latents.mean(dim=(0, 2, 3))
    std = latents.std(dim=(0, 2, 3))
    vae.cfg = dataclasses.replace(vae.cfg, latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()))
    return (latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def sample_caption(scene, rng: random.Random) -> str:
    return " " if rng.random() < UNCOND else caption(scene, rng, rng.choice(LANGUAGES))


def other_shapes(scene: Scene, rng: random.Random) -> Scene:
    """The scene with every object's shape changed (colours, positions and sizes kept)."""
    things = tuple(dataclasses.replace(t, shape=rng.choice([s for s in SHAPES if s != t.shape])) for t in scene.things)
    return dataclasses.replace(scene, things=things)


def caption_pair(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A training caption and the same caption (form, language, words) naming other shapes: the
    negative of the shape contrast. Both are " " for an unconditional sample."""
    state = rng.getstate()
    true = sample_caption(scene, rng)
    other = other_shapes(scene, rng)
    after = rng.getstate()
    rng.setstate(state)  # the same draws again: same form, language and words
    swapped = sample_caption(other, rng)
    rng.setstate(after)
    return true, swapped


def object_tokens(images: np.ndarray, patch: int = 16) -> torch.Tensor:
    """(N, H/patch * W/patch) bool, in patchify order: tokens holding any pixel far from the border's colour,
    i.e. the objects. Shape lives only there, a few of the 64 tokens."""
    n, h, w, _ = images.shape
    bg = np.stack([background(image) for image in images])[:, None, None]
    far = np.abs(images.astype(np.int16) - bg).sum(-1) > 60
    return torch.from_numpy(far.reshape(n, h // patch, patch, w // patch, patch).any(axis=(2, 4)).reshape(n, -1))


def flow_errors(model: QwenImageTransformer, prompts: Prompts, x0: torch.Tensor, noise: torch.Tensor,
                s: torch.Tensor, captions: list[str], grid: tuple[int, int]) -> torch.Tensor:
    """Flow matching on patchified latents: at t = s the model sees x0 noised to s and should predict
    the velocity noise - x0. Returns the squared error per token, (B, L)."""
    txt, txt_mask = prompts(captions)
    pred = model(noised(x0, noise, s.view(-1, 1, 1)), txt, txt_mask, s, grid)
    return (pred - (noise - x0)).square().mean(-1)


def flow_loss(model: QwenImageTransformer, prompts: Prompts, x0: torch.Tensor, noise: torch.Tensor,
              s: torch.Tensor, captions: list[str], grid: tuple[int, int]) -> torch.Tensor:
    return flow_errors(model, prompts, x0, noise, s, captions, grid).mean()


def weighted(errors: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, L) errors -> (B,) per-sample losses under per-token weights."""
    return (errors * weight).sum(1) / weight.sum(1)


@torch.no_grad()
def text_gap(model: QwenImageTransformer, prompts: Prompts, x0: torch.Tensor, captions: list[str],
             swapped: list[str], grid: tuple[int, int], seed: int = 1) -> tuple[float, float, float, float]:
    """Flow-matching loss on a fixed batch with its true captions, with the captions rolled by one (each
    latent gets another scene's text), with the empty prompt and with the captions naming other shapes
    (`swapped`). A model that uses its text has the first clearly below the others; equal losses mean it
    has learned to ignore the prompt (or, for the last, the shape word)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)
    s = torch.linspace(0.6, 1.0, len(x0))  # where the prompt decides what the latent becomes
    return tuple(flow_loss(model, prompts, x0, noise, s, texts, grid).item()
                 for texts in (captions, captions[1:] + captions[:1], [" "] * len(captions), swapped))


def train_dit(latents: torch.Tensor, scenes: list, prompts: Prompts, model: QwenImageTransformer, seconds: float,
              seed: int, batch: int = 32, peak: float = 3e-4, shifted: float = 0.25,
              ema_decay: float = 0.995, objects: torch.Tensor | None = None, object_weight: float = 1.0,
              contrast: float = 0.0, margin: float = 0.1) -> nn.ModuleDict:
    """Flow matching (see flow_errors), with the fraction `shifted` of each batch's timesteps shifted towards noise
    (see SHIFT). The text encoder's language model learns through the transformer; both are averaged (EMA)
    together, so the exported pair matches, and the averages are returned.

    objects: (N, L) bool object tokens of each scene (object_tokens), whose errors count object_weight
    times. contrast > 0 adds the shape contrast: the batch's conditional samples at CONTRAST_T, under
    captions naming other shapes (caption_pair), must have a loss on their object tokens at least
    `margin` (relative) above the true captions' loss, else the shortfall is penalised. Without it the
    model learns colour and position from the prompt but ignores the shape word (its loss is the same
    under either shape): the corners that tell shapes apart are a sliver of the image."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    trained = nn.ModuleDict({"transformer": model, "text": prompts.model.language_model}).train().requires_grad_(True)
    ema = copy.deepcopy(trained).requires_grad_(False)
    opt = torch.optim.AdamW(trained.parameters(), lr=peak, weight_decay=0.01)
    grid = (latents.shape[-2] // 2, latents.shape[-1] // 2)  # tokens: 2x2 latent patches
    probe = list(range(0, len(scenes), max(1, len(scenes) // 48)))[:48]
    probe_x0 = patchify(latents[probe])
    probe_captions = [caption(scenes[i], random.Random(i), "en") for i in probe]
    probe_swapped = [caption(other_shapes(scenes[i], random.Random(-i)), random.Random(i), "en") for i in probe]
    if objects is None:
        objects = torch.zeros(latents.shape[0], grid[0] * grid[1], dtype=torch.bool)
    start, step, running = time.time(), 0, None
    while (elapsed := time.time() - start) < seconds:
        progress = elapsed / seconds
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, peak)
        idx = [rng.randrange(len(scenes)) for _ in range(batch)]
        x0 = patchify(latents[idx])
        noise = torch.randn_like(x0)
        s = torch.sigmoid(torch.randn(batch))  # logit-normal timesteps, some shifted towards noise
        n = round(shifted * batch)
        s[:n] = time_shift(s[:n], SHIFT)
        true, swapped = zip(*(caption_pair(scenes[i], rng) for i in idx))
        errors = flow_errors(model, prompts, x0, noise, s, list(true), grid)
        loss = weighted(errors, 1 + (object_weight - 1) * objects[idx].float()).mean()
        pick = [k for k in range(batch) if true[k] != " " and CONTRAST_T[0] < s[k] < CONTRAST_T[1]]
        if contrast and pick:
            k = torch.tensor(pick)
            errors_swapped = flow_errors(model, prompts, x0[k], noise[k], s[k], [swapped[i] for i in pick], grid)
            on_objects = objects[idx][k].float() + 1e-6
            own, other = weighted(errors[k], on_objects), weighted(errors_swapped, on_objects)
            shortfall = F.relu(margin - (other - own) / own.detach().clamp_min(1e-4))
            loss = loss + contrast * shortfall.sum() / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), trained.parameters()):
                e.lerp_(p, 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            log("mmdit", f"step {step} loss {running:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                         f"({elapsed / 60:.1f}/{seconds / 60:.0f} min)")
        if step % 250 == 0:
            held, wrong, empty, shape = text_gap(model.eval(), prompts, probe_x0, probe_captions, probe_swapped, grid)
            model.train()
            log("mmdit", f"step {step} held loss: true caption {held:.4f}, another scene's {wrong:.4f}, "
                         f"empty {empty:.4f}, other shapes {shape:.4f}")
    return ema.eval()


def load_part(folder: Path, name: str):
    """The VAE or transformer of an exported model, in float32."""
    from qimg.weights.folders import read_config

    build = {"vae": lambda c: QwenImageVAE(VAEConfig.from_dict(c)),
             "transformer": lambda c: QwenImageTransformer(TransformerConfig.from_dict(c))}[name]
    module = build(read_config(folder / name))
    weights = load_file(folder / name / "diffusion_pytorch_model.safetensors")
    module.load_state_dict({k: v.float() for k, v in weights.items()})
    return module.eval()


def load_folder(folder: Path):
    """Tokenizer, text encoder, VAE and transformer of an exported model, in float32, to train further."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=torch.float32)
    return tokenizer, encoder, load_part(folder, "vae"), load_part(folder, "transformer")


def main(out: Path, minutes: float = 90.0, seed: int = 0, scenes: int = 8000, threads: int | None = None,
         resume: Path | None = None, fresh_embeddings: bool = False, vae_from: Path | None = None,
         peak: float = 3e-4, shifted: float = 0.25, object_weight: float = 4.0, contrast: float = 1.0,
         margin: float = 0.1, new_tokenizer: bool = False) -> Path:
    """Train from scratch, or (resume) train an exported model's text encoder and MMDiT further;
    fresh_embeddings re-draws a resumed text encoder's token embeddings (see spread_embeddings);
    new_tokenizer moves a resumed text encoder to a tokenizer built by this recipe (see retokenize);
    vae_from takes a trained VAE from an exported model instead of training one (the other parts start
    from scratch); peak is the learning rate of the MMDiT and text encoder (a third of it when resuming
    without fresh embeddings: the pair is trained already); shifted is the share of timesteps shifted
    towards noise; object_weight, contrast and margin are train_dit's."""
    if threads:
        torch.set_num_threads(threads)
    budget = minutes * 60
    start = time.time()
    rng = random.Random(seed)
    all_scenes = [sample_scene(rng) for _ in range(scenes)]
    images = np.stack([render(s, rng, (SIZE, SIZE)) for s in all_scenes])
    log("data", f"{len(all_scenes)} scenes rendered at {SIZE}x{SIZE}")

    captions = [caption(s, rng, lang) for s in all_scenes[:3000] for lang in LANGUAGES]  # a new tokenizer's
    if resume:
        tokenizer, encoder, vae, model = load_folder(resume)
        latents = encode_all(vae, images)
        if new_tokenizer:
            torch.manual_seed(seed)
            old, tokenizer = tokenizer, shapes_tokenizer(captions)
            encoder = retokenize(encoder, old, tokenizer, captions)
            log("text", f"tokenizer of {len(tokenizer)} tokens replaces one of {len(old)}")
        if fresh_embeddings:
            spread_embeddings(encoder, seed)
        else:
            peak /= 3
    else:
        tokenizer = shapes_tokenizer(captions)
        torch.manual_seed(seed)
        encoder = text_encoder(tokenizer, TEXT_WIDTH, layers=2)
        spread_embeddings(encoder, seed)
        log("text", f"tokenizer of {len(tokenizer)} tokens, encoder of "
                    f"{sum(p.numel() for p in encoder.model.language_model.parameters()) / 1e6:.2f}M parameters")
        if vae_from:
            vae = load_part(vae_from, "vae")
            latents = encode_all(vae, images)
        else:
            vae = train_vae(images, 0.35 * budget, seed)
            latents = normalise(vae, encode_all(vae, images))
        model = QwenImageTransformer(TRANSFORMER)
    log("vae", f"latents {tuple(latents.shape)} encoded; {(time.time() - start) / 60:.1f} min so far")

    remaining = budget - (time.time() - start) - 60  # a minute for the export
    ema = train_dit(latents, all_scenes, Prompts(tokenizer, encoder), model, remaining, seed, peak=peak,
                    shifted=shifted, objects=object_tokens(images), object_weight=object_weight, contrast=contrast,
                    margin=margin)
    encoder.model.language_model.load_state_dict(ema["text"].state_dict())
    folder = write_folder(out, ema["transformer"], vae, encoder, tokenizer, defaults=DEFAULTS)
    log("done", f"{folder} written after {(time.time() - start) / 60:.1f} min")
    return folder
