"""Which segmentation model `--mask-model` names, found before anything loads: `clipseg` (the default) or
`grounded-sam` by their Hugging Face repos, a CLIPSeg folder, a grounded-sam folder (`detector/` holding a
GroundingDINO, `segmenter/` a SAM2), `DETECTOR+SEGMENTER` (two folders or repo ids), or a repo id of a CLIPSeg.
Repo ids are read from the local Hugging Face cache first, as `--model` is; only safetensors weights are read."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from qimg.errors import UsageError
from qimg.small_files import parse_json, read_small

DEFAULT = "clipseg"
NAMED = {"clipseg": ("CIDAS/clipseg-rd64-refined",),
         "grounded-sam": ("IDEA-Research/grounding-dino-tiny", "facebook/sam2.1-hiera-tiny")}
KIND_OF = {"clipseg": "clipseg", "grounding-dino": "detector", "sam2": "segmenter"}  # config.json model_type
EXTRA = "masks from words need transformers: pip install 'qimg[masks]'"


class BadMaskModel(UsageError):
    """The --mask-model named cannot run (files missing or damaged): every image would fail alike, so a batch
    ends on it rather than naming each image."""


@dataclass(frozen=True)
class MaskModel:
    kind: str  # "clipseg" or "grounded-sam"
    folders: tuple[Path, ...]  # clipseg: (folder,); grounded-sam: (detector, segmenter)
    name: str  # as --mask-model gave it, for messages
    public: str  # as an output's metadata names it: a name or repo id, a local folder by its own name only

    def fingerprint(self) -> str:
        """What identifies the weights (a cache key part): the folders' fingerprints, in order."""
        from qimg.weights.fingerprint import fingerprint

        return f"{self.kind}:" + ":".join(fingerprint(folder) for folder in self.folders)


def require_extra() -> None:
    """Refuse, before any work, a mask from words without transformers installed."""
    try:
        found = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # an import blocker, or a broken install
        found = False
    if not found:
        raise UsageError(EXTRA)


def resolve(spec: str | None) -> MaskModel:
    """The model `--mask-model` (or $QIMG_MASK_MODEL, which the command line reads) names; None: clipseg."""
    spec = spec or DEFAULT
    public = "+".join(Path(part).name if Path(part).expanduser().is_dir() else part for part in spec.split("+"))
    if spec in NAMED:
        folders = tuple(_folder(repo, spec) for repo in NAMED[spec])
        return _checked(spec, folders, spec, public)
    if "+" in spec:
        detector, _, segmenter = spec.partition("+")
        return _checked("grounded-sam", (_folder(detector, spec), _folder(segmenter, spec)), spec, public)
    folder = _folder(spec, spec)
    if (folder / "detector").is_dir() and (folder / "segmenter").is_dir():
        return _checked("grounded-sam", (folder / "detector", folder / "segmenter"), spec, public)
    return _checked("clipseg", (folder,), spec, public)


def _checked(kind: str, folders: tuple[Path, ...], name: str, public: str) -> MaskModel:
    wanted = ("clipseg",) if kind == "clipseg" else ("detector", "segmenter")
    for folder, want in zip(folders, wanted):
        found = _kind(folder)
        if found != want:
            said = {"clipseg": "a CLIPSeg", "detector": "a GroundingDINO", "segmenter": "a SAM2"}
            raise UsageError(f"--mask-model {name}: {folder} is {said.get(found, 'no model transformers can run')}, "
                             f"not {said[want]} (give clipseg, grounded-sam, a CLIPSeg folder, a folder with "
                             "detector/ and segmenter/, or DETECTOR+SEGMENTER)")
        if not any(folder.glob("*.safetensors")):
            raise UsageError(f"--mask-model {name}: {folder} holds no .safetensors weights (pickle weights are never "
                             "read); convert them, or download the model's safetensors")
    return MaskModel(kind, folders, name, public)


def _kind(folder: Path) -> str | None:
    """clipseg, detector or segmenter, from the folder's config.json model_type; None if it names none."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    value = parse_json(read_small(config, "model config", 1024 * 1024), str(config))
    return KIND_OF.get(value.get("model_type")) if isinstance(value, dict) else None


def _folder(spec: str, name: str) -> Path:
    """A local folder, else a repo id in the Hugging Face cache (downloaded when it is not there and the network
    allows)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists() or spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise UsageError(f"--mask-model {name}: no folder {spec}")
    from qimg.weights.folders import from_hub

    return from_hub(spec, "--mask-model")
