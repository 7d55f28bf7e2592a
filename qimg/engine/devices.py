"""--device, --devices and --dtype resolved to torch's devices and dtypes for this machine, and the other loading
choices checked; each refusal a UsageError naming the option. Light: torch alone, so a job can pick a device
without importing the model code."""

import torch

from qimg import option_values
from qimg.errors import UsageError

DTYPES = {name: getattr(torch, name) for name in option_values.DTYPES}


def pick_device(name: str, option: str = "--device") -> torch.device:
    cpu = "--device cpu" if option == "--device" else "cpu"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{option} {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option} {name}: CUDA is not available here; use {cpu}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{option} {name}: MPS is not available here; use {cpu}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{option} {name!r} is not supported (auto, cpu, cuda, cuda:N, mps)")
    return device


def pick_devices(names: tuple[str, ...]) -> tuple[torch.device, ...]:
    """--devices: each a device of this machine (cuda alone is cuda:0); a name may repeat."""
    devices = tuple(pick_device(name, "--devices") for name in names)
    return tuple(torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d for d in devices)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{option} {value!r} is not one of {', '.join(choices)}")
    return value
