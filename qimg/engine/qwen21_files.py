"""Qwen-Image-2.1 from `--text-encoder`, `--vae` and `--vision` files (weights/split21.py) in place of its folder's
parts: what Engine21 loads from where, and what the files change in its identity (fingerprints, the metadata's
file records) and in the memory estimate."""

from dataclasses import replace
from functools import cached_property
from pathlib import Path

from qimg.engine.components import Loading
from qimg.weights.split_files import Files


def split_loading(loading: Loading) -> tuple[Files, Loading]:
    """The files, and the loading without them (Components checks the 20B models' files; 2.1's are checked by
    check_files21)."""
    files = Files(*(Path(p) if p else None for p in (loading.text_encoder, loading.vae, loading.vision)))
    return files, replace(loading, text_encoder=None, vae=None, vision=None)


class Files21:
    """Engine21's split-file parts: a mixin over Components (folder, files, source, dtype, device, offload)."""

    def check_files(self, files: Files) -> None:
        """Keep the files and check their headers before anything loads."""
        from qimg.weights.split21 import check_files21
        from qimg.weights.transformer import start_sha256

        self.files = files
        if files:
            check_files21(files, self.folder, self.source.file)
            for file in (f for f in (files.text_encoder, files.vae, files.vision) if f):
                start_sha256(file)

    def load_prompt_encoder(self):
        device = self.place("text")  # under --devices, the plan's
        if self.files.text_encoder:
            from qimg.weights.split21 import load_prompt_encoder21

            return load_prompt_encoder21(self.files, self.folder, self.dtype, device, self.source.unpacks(device))
        from qimg.weights.qwen21_text import load_prompt_encoder

        return load_prompt_encoder(self.folder, self.dtype, device)

    def load_vae(self, only: tuple[str, ...]):
        from qimg.weights.qwen21 import load_vae21, vae21_config

        device = self.place("vae")
        if self.files.vae:
            from qimg.weights.split21 import load_vae21_file

            return load_vae21_file(self.files.vae, vae21_config(self.folder), self.dtype, device, only=only)
        return load_vae21(self.folder, self.dtype, device, only=only)

    def text_parts(self) -> tuple[str, ...]:
        """Fingerprints of what prompt embeddings depend on: the text encoder (folder or file), the vision file and
        the tokenizer a file takes, the processor settings."""
        from qimg.weights.fingerprint import fingerprint

        if not self.files.text_encoder:
            return fingerprint(self.folder / "text_encoder"), fingerprint(self.folder / "processor")
        from qimg.weights.split21 import text_files21

        places = (self.files.text_encoder, *text_files21(self.files, self.folder), self.folder / "processor")
        return tuple(fingerprint(p) for p in dict.fromkeys(places))

    @cached_property
    def model_fingerprint(self) -> str:
        """The whole model's identity, as Components', with the files 2.1 takes (the tokenizer a text encoder
        file goes with included)."""
        from qimg.weights import lora
        from qimg.weights.fingerprint import fingerprint
        from qimg.weights.split21 import text_files21

        used = (self.files.text_encoder, self.files.vae, self.files.vision)
        if self.files.text_encoder:
            used += text_files21(self.files, self.folder)
        files = tuple(fingerprint(f) for f in dict.fromkeys(used) if f)
        model = "-".join(p for p in (fingerprint(self.folder), self.source.fingerprint(), *files) if p)
        return lora.fingerprint(model, self.loras)

    @cached_property
    def files_info(self) -> dict:
        """{"text_encoder": {name, sha256, format, tokenizer}, "vae": ..., "vision": ...} for the files given."""
        from qimg.weights.split21 import files_provenance21, tokenizer_label21

        info = files_provenance21(self.files)
        if self.files.text_encoder:
            info["text_encoder"]["tokenizer"] = tokenizer_label21(self.files, self.folder)
        return info

    @cached_property
    def text_bytes(self) -> int:
        """A --text-encoder file's weights beside the transformer's (without --offload model), packed sizes."""
        if not self.files.text_encoder or self.offload != "none":
            return 0
        from qimg.weights.split21 import text_bytes21

        return text_bytes21(self.files, self.dtype, self.source.unpacks(self.device))
