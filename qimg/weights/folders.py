"""Find Qwen-Image checkpoints (diffusers folder layout) and load safetensors weights strictly.

A model is a folder with `model_index.json` and one sub-folder per component, or a Hugging Face repo id
resolved through the local hub cache. Weights are read tensor by tensor straight into their target
dtype and device and assigned into a module built on the meta device, so loading never holds a second
float32 copy. Only safetensors are read: pickle files can run code when loaded.
"""

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qimg.errors import QimgError, UsageError, listing
from qimg.small_files import PICKLE_SUFFIXES, parse_json, read_small

PIPELINES = {"QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
             "QwenImageEditPlusPipeline", "QwenImage21Pipeline"}
# Family members qimg does not run, refused by name: Layered splits a picture into RGBA layers (its own transformer
# flags and VAE); Qwen-Image-2.0 has no open weights (API-only), so a folder claiming it is named for what it says.
REFUSED = {"QwenImageLayeredPipeline": "Qwen-Image-Layered", "QwenImageLayeredModularPipeline": "Qwen-Image-Layered",
           "QwenImage2Pipeline": "Qwen-Image-2.0", "QwenImage20Pipeline": "Qwen-Image-2.0"}
SHOWN = 5  # how many offending key names an error lists
BUILTIN = Path(__file__).resolve().parent.parent / "builtin" / "shapes"  # the demo model shipped in the package


def builtin_model() -> Path:
    if not (BUILTIN / "model_index.json").is_file():
        raise QimgError(f"the built-in model is missing from this install ({BUILTIN}); reinstall qimg or pass --model")
    return BUILTIN


def resolve_model(spec: str | None) -> Path:
    """The built-in model (None or "builtin"), a local folder, or a repo id (`Qwen/Qwen-Image`) found in
    the hub cache or fetched into it."""
    if spec in (None, "", "builtin"):
        return builtin_model()
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_model_folder(path)
    if path.exists() or spec.count("/") != 1 or spec.startswith((".", "/", "~")) or not _repo_id(spec):
        raise UsageError(f"model folder not found: {spec}")
    return check_model_folder(from_hub(spec))


def _repo_id(spec: str) -> bool:
    """Whether `spec` can name a Hugging Face repo (huggingface_hub would refuse it with a traceback)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def from_hub(repo_id: str, option: str = "--model") -> Path:
    """A repo id's folder: from the local Hugging Face cache, else downloaded (where the network allows).
    option: the one that named it (--model, --mask-model), for the message."""
    from huggingface_hub import snapshot_download

    # Everything but pickle weights: we never read them, and they double the download.
    kwargs = dict(repo_id=repo_id, ignore_patterns=[f"*{s}" for s in PICKLE_SUFFIXES])
    try:
        return Path(snapshot_download(local_files_only=True, **kwargs))
    except Exception:
        pass
    try:
        return Path(snapshot_download(**kwargs))
    except Exception as e:
        raise QimgError(
            f"{option} {repo_id}: not in the Hugging Face cache and could not be downloaded ({type(e).__name__}); "
            f"download it elsewhere and pass its folder: {option} /path/to/{repo_id.split('/')[1]}"
        ) from None


def check_model_folder(path: Path) -> Path:
    index = path / "model_index.json"
    if not index.is_file():
        raise UsageError(f"{path} is not a Qwen-Image model folder: model_index.json is missing")
    name = read_json_object(index, UsageError).get("_class_name")
    if not isinstance(name, str) or name not in PIPELINES:
        if isinstance(name, str) and (family := REFUSED.get(name)):
            raise UsageError(f"{path} is {family} ({name}), which qimg does not run: it runs Qwen-Image (and 2512), "
                             "Qwen-Image-Edit (2509, 2511) and Qwen-Image-2.1 (model_index.json)")
        if isinstance(name, str) and name:
            raise UsageError(f"{path} is a {name[:60]} model, not Qwen-Image (model_index.json)")
        raise UsageError(f"{path}: model_index.json names no pipeline (_class_name); not a Qwen-Image model folder")
    return path


@dataclass(frozen=True)
class ModelKind:
    """What a model folder holds (model_kind's answer): one of QWEN_IMAGE, EDIT, EDIT_2509, EDIT_2511, or the 2.1
    family's QWEN_IMAGE_21 and QWEN_IMAGE_21_TURBO."""

    name: str  # as the metadata records it: "qwen-image", "edit", "edit-2509", "edit-2511", "qwen-image-2.1"
    display: str  # as messages name it: "Qwen-Image-Edit-2509"
    edits: bool = False  # it edits by instruction (`qimg edit`)
    plus: bool = False  # 2509/2511: several pictures, named "Picture N" in the prompt, sized for the vision tower
    generates: bool = True  # it makes images from a prompt alone (`qimg generate`, inpaint, outpaint)
    family: str = "qwen-image"  # the architecture: "qwen-image" (the 20B MMDiT) or "qwen-image-2.1" (the 7B DiT)
    licence: str = "Apache-2.0"  # the weights' licence, as the metadata and `qimg info` record it
    rgba: bool = False  # its images have an alpha channel (RGBA in, RGBA out)


QWEN_IMAGE = ModelKind("qwen-image", "Qwen-Image")
EDIT = ModelKind("edit", "Qwen-Image-Edit", edits=True, generates=False)
EDIT_2509 = ModelKind("edit-2509", "Qwen-Image-Edit-2509", edits=True, plus=True, generates=False)
EDIT_2511 = ModelKind("edit-2511", "Qwen-Image-Edit-2511", edits=True, plus=True, generates=False)
# Qwen-Image-2.1: one model generates and edits (up to 10 pictures); Turbo is its few-step checkpoint, told apart by
# the sampling grid its model_index.json ships (`sample_sigmas`), as diffusers' modular pipeline tells it.
QWEN21_LICENCE = "Qwen Research License"
QWEN_IMAGE_21 = ModelKind("qwen-image-2.1", "Qwen-Image-2.1", edits=True, family="qwen-image-2.1",
                          licence=QWEN21_LICENCE, rgba=True)
QWEN_IMAGE_21_TURBO = ModelKind("qwen-image-2.1-turbo", "Qwen-Image-2.1-Turbo", edits=True, family="qwen-image-2.1",
                                licence=QWEN21_LICENCE, rgba=True)


def model_kind(folder: Path) -> ModelKind:
    """QWEN_IMAGE (text to image), or the Edit model a folder holds, from its model_index.json: EDIT
    (QwenImageEditPipeline, one picture; QwenImageEditInpaintPipeline, the same model saved by diffusers' inpaint
    pipeline), EDIT_2509 (QwenImageEditPlusPipeline, one to three pictures), or EDIT_2511 when that
    pipeline's transformer config sets zero_cond_t (2511 differs only there); QWEN_IMAGE_21 (QwenImage21Pipeline),
    or QWEN_IMAGE_21_TURBO when its model_index.json sets sample_sigmas."""
    index = read_json_object(folder / "model_index.json", UsageError)
    name = index.get("_class_name")
    if name == "QwenImage21Pipeline":
        sample_sigmas(folder)
        return QWEN_IMAGE_21_TURBO if index.get("sample_sigmas") else QWEN_IMAGE_21
    if name in ("QwenImageEditPipeline", "QwenImageEditInpaintPipeline"):
        return EDIT
    if name == "QwenImageEditPlusPipeline":
        config = folder / "transformer" / "config.json"
        zero_cond_t = read_json_object(config).get("zero_cond_t", False) if config.is_file() else False
        if not isinstance(zero_cond_t, bool):
            raise UsageError(f"{config}: zero_cond_t must be true or false, not {str(zero_cond_t)[:40]!r}")
        return EDIT_2511 if zero_cond_t else EDIT_2509
    return QWEN_IMAGE


def sample_sigmas(folder: Path) -> tuple[float, ...] | None:
    """A 2.1 folder's own sampling grid (model_index.json's sample_sigmas: decreasing numbers in (0, 1], the last
    step's sigma before 0 excluded), or None when it ships none (the base model)."""
    file = folder / "model_index.json"
    grid = read_json_object(file, UsageError).get("sample_sigmas")
    if grid is None or grid == []:
        return None
    ok = isinstance(grid, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
                                        for v in grid)
    if not ok or any(a <= b for a, b in zip(grid, grid[1:])):
        raise UsageError(f"{file}: sample_sigmas must be a list of decreasing numbers in (0, 1], not "
                         f"{str(grid)[:60]}")
    return tuple(float(v) for v in grid)


def named_kind(file: Path) -> ModelKind:
    """The model a transformer file is for, as its name says (`qwen_image_edit_2509_fp8.safetensors`,
    `Qwen-Image-Q4_K_M.gguf`, `qwen_image_2.1_turbo_bf16.safetensors`): its weights cannot say it, for Qwen-Image,
    Edit, 2509 and 2511 share one layout (the same keys and shapes; 2511 differs by the config's zero_cond_t alone),
    and 2.1 and its Turbo another."""
    name = file.name.lower()
    if re.search(r"(?<![0-9])2[._-]1(?![0-9])", name):  # qwen_image_2.1_fp8, Qwen-Image-2_1-Turbo-Q8_0
        return QWEN_IMAGE_21_TURBO if "turbo" in name else QWEN_IMAGE_21
    if "edit" not in name:
        return QWEN_IMAGE
    return EDIT_2511 if "2511" in name else EDIT_2509 if "2509" in name or "plus" in name else EDIT


def read_config(folder: Path, name: str = "config.json") -> dict:
    file = folder / name
    if not file.is_file():
        raise QimgError(f"{file} is missing: the model folder is incomplete")
    return read_json_object(file)


JSON_LIMIT = 64 * 1024 * 1024  # a config or shard index is kilobytes; a path to /dev/zero must cost nothing
JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
              type(None): "null"}


def read_json_object(file: Path, error: type[QimgError] = QimgError) -> dict:
    """A model folder's JSON file whose top level must be an object, read the one way (small_files: a regular
    file of at most JSON_LIMIT bytes). A file that cannot be read or parsed is one `error` line naming it (a
    QimgError, like the folder's other damage; model_index.json, read to accept --model, a UsageError); valid
    JSON of the wrong shape is a UsageError: a file of the wrong kind."""
    data = parse_json(read_small(file, "", JSON_LIMIT, error=error), str(file), error)
    if not isinstance(data, dict):
        raise UsageError(f"{file} holds {JSON_KINDS.get(type(data), 'something else')}, not an object; is it the "
                         "right file?")
    return data


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of one component: the shards named by an index, or the single file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = read_json_object(indexes[0]).get("weight_map")
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise UsageError(f"{indexes[0]}: weight_map must be an object of weight name: shard file")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise QimgError(f"{folder}: shards named in {indexes[0].name} are missing: {', '.join(missing[:SHOWN])}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [f.name for f in folder.glob("*") if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise QimgError(
            f"{folder} has only pickle weights ({pickles[0]}); qimg reads safetensors only, because pickle "
            "files can run code. Convert them to safetensors first."
        )
    raise QimgError(f"{folder} has no .safetensors weights")


def weight_names(folder: Path) -> set[str]:
    """The names of a component's tensors, read from the safetensors headers only."""
    from safetensors import SafetensorError, safe_open

    names = set()
    for file in safetensors_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                names.update(f.keys())
        except (SafetensorError, OSError) as e:
            raise QimgError(f"{file} is not a readable safetensors file ({e}); download it again") from None
    return names


class Contents:
    """Checks each tensor of a checkpoint as it is read, on the device it was read to and in the file's own dtype
    (a value float16 cannot hold is the run's dtype's fault, not the file's): a float tensor holding NaN or
    infinity, or a packed one that unpacks to them, stops the load naming its file and key; `all_zero` after
    the last refuses a checkpoint with no nonzero weight. `error`: UsageError for a file the user named
    (--transformer), QimgError for a damaged model folder."""

    def __init__(self, error: type[QimgError] = QimgError):
        self.error, self.nonzero = error, False

    def check(self, t: torch.Tensor, file: Path | str, key: str, kind: str = "dense") -> torch.Tensor:
        from qimg.model.quant import finite

        if kind != "dense":
            ok = finite(kind, t)
        elif t.is_floating_point() and t.numel():
            # The sum is NaN or infinite if any value is, and takes a tenth of isfinite's time on a CPU; only
            # when it is (or huge finite values overflowed it) is every value looked at.
            total = t.sum()
            ok = bool(total.isfinite()) or bool(t.isfinite().all())
            self.nonzero = self.nonzero or bool(total != 0)
        else:
            ok = True
        if not ok:
            raise self.error(f"{file}: tensor {key} holds NaN or infinity; the file is damaged: download it again")
        self.nonzero = self.nonzero or bool(t.any())  # looked at only until one nonzero value is found
        return t

    def all_zero(self, what: Path | str) -> None:
        if not self.nonzero:
            raise self.error(f"{what}: every weight is zero; the file is damaged: download it again")


def load_module(build, folder: Path, dtype: torch.dtype, device: torch.device, only: tuple[str, ...] = (),
                remap=None) -> nn.Module:
    """Build `build()` on the meta device and assign the folder's weights into it, checking every key.

    With `only` (module key prefixes) just those weights are read; the rest stay on the meta device, costing
    no memory (the VAE's encoder is not loaded for a run that only decodes). Every key is still checked.
    remap: checkpoint key -> module key, or None to skip that tensor without reading or checking it."""
    from safetensors import SafetensorError, safe_open

    with torch.device("meta"):
        module = build()
    expected = module.state_dict()
    shapes, state, keys, contents = {}, {}, {}, Contents()
    for file in safetensors_files(folder):
        try:
            with safe_open(file, framework="pt", device=str(device) if device.type != "mps" else "cpu") as f:
                for key in f.keys():
                    name = remap(key) if remap else key
                    if name is None:
                        continue
                    shapes[name], keys[name] = tuple(f.get_slice(key).get_shape()), key
                    if not only or name.startswith(only):
                        state[name] = contents.check(f.get_tensor(key), file, key).to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise QimgError(f"{file} is not a readable safetensors file ({e}); download it again") from None
    check_keys(folder, expected, shapes, named=file_names(keys))
    if state:
        contents.all_zero(folder)
    module.load_state_dict(state, assign=True, strict=not only)
    return module.eval().requires_grad_(False)


def file_names(keys: dict[str, str]):
    """keys: module key -> the checkpoint's key. The name the checkpoint has, or would have, for a module key: a
    missing one with the prefix the file's other keys carry (`visual.` or `model.visual.` for the vision tower)."""
    prefixes = Counter(key[: len(key) - len(name)] for name, key in keys.items() if key.endswith(name))
    prefix = prefixes.most_common(1)[0][0] if prefixes else ""
    return lambda name: keys.get(name, prefix + name)


def check_keys(folder: Path | str, expected: dict, found: dict[str, tuple], error: type[QimgError] = QimgError,
               named=str) -> None:
    """expected: the module's state dict; found: the checkpoint's shape for every key. error: UsageError for a
    file the user named (--transformer), QimgError for a damaged model folder. named: a module key -> the name
    messages give it (the checkpoint's, where load_module's remap strips a prefix)."""
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing:
        raise error(f"{folder}: missing weights {listing(sorted(map(named, missing)))}")
    if unexpected:
        raise error(f"{folder}: unexpected weights {listing(sorted(map(named, unexpected)))}")
    wrong = [f"{named(k)} {found[k]} (expected {tuple(v.shape)})" for k, v in expected.items()
             if found[k] != tuple(v.shape)]
    if wrong:
        raise error(f"{folder}: weights of the wrong shape for this config: {listing(sorted(wrong))}")

