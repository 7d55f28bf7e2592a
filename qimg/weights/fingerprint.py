"""What names a model's weights: a fingerprint of a model folder, one of its components or one weights file,
for caches (a tensor computed with other weights is another entry), output metadata and the worker's kept engine
(a folder whose files changed is another model)."""

import hashlib
from pathlib import Path


def fingerprint(folder: Path, sample: int = 64 * 1024, samples: int = 8, head: int = 256 * 1024) -> str:
    """The identity of a model folder without reading gigabytes: every file's name and size, the whole of
    small files (configs, tokenizer), and of large ones the head (a safetensors header lists every tensor's
    name, dtype, shape and offset) plus `samples` evenly spaced chunks of the weights, which tells two
    fine-tunes of one architecture apart. `folder` may be one file (a --transformer file)."""
    h = hashlib.sha256()
    files = [folder] if folder.is_file() else sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for file in files:
        size = file.stat().st_size
        name = file.name if file == folder else file.relative_to(folder).as_posix()
        h.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= head + samples * sample:
                h.update(f.read())
                continue
            h.update(f.read(head))
            for i in range(samples):
                f.seek(head + (size - head - sample) * i // max(samples - 1, 1))
                h.update(f.read(sample))
    return h.hexdigest()[:32]
