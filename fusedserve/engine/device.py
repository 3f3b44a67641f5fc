"""Which device the engine runs on and the dtype it defaults to there: the one place `--device` is resolved.

`resolve_device("auto")` is CUDA when torch sees a CUDA device, else the CPU; asking for "cuda" where torch sees
none is a `DeviceUnavailableError` that says why (a CPU-only torch build, or no visible device), never a silent
fallback. `resolve_dtype` keeps the CPU's dtype policy exactly as it was and picks bfloat16 on CUDA. This module
never moves tensors; callers pass the resolved device to the loader, the KV cache and the runner.
"""

from __future__ import annotations

import torch

from fusedserve.engine.errors import EngineError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
CUDA_DEFAULT_DTYPE = "bfloat16"  # flashinfer's kernels take fp16/bf16; bf16 keeps fp32's exponent range


class DeviceUnavailableError(EngineError, ValueError):
    """The requested device does not exist in this process (e.g. --device cuda with a CPU-only torch)."""


def cuda_unavailable_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: check the driver "
        "(nvidia-smi) and CUDA_VISIBLE_DEVICES"
    )


def visible_cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str | torch.device, cuda_devices: int | None = None) -> torch.device:
    """`auto` -> cuda:0 when torch sees a CUDA device, else cpu; `cpu`, `cuda`, `cuda:N` as given, checked to exist.

    `cuda_devices`: how many CUDA devices to assume (tests); None asks torch.
    """
    count = visible_cuda_devices() if cuda_devices is None else cuda_devices
    text = str(requested).strip().lower()
    choices = ", ".join(DEVICE_CHOICES)
    if text == "auto":
        return torch.device("cuda", 0) if count else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise DeviceUnavailableError(f"unknown device {requested!r} (choose from {choices})") from error
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceUnavailableError(f"device {requested!r} is not supported (choose from {choices})")
    if not count:
        raise DeviceUnavailableError(f"--device {requested} was requested, but {cuda_unavailable_reason()}")
    index = device.index if device.index is not None else 0
    if index >= count:
        raise DeviceUnavailableError(f"--device {requested}: torch sees only {count} CUDA device(s)")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """The engine dtype name (llm_engine.DTYPES) for a device: unchanged on the CPU, bf16 for auto on CUDA.

    None means the device's default: auto on the CPU (fp32 weights, bf16 AMX compute from BF16_MIN_ROWS rows,
    measured faster), bfloat16 on CUDA.
    On CUDA "auto" is bfloat16 too: the CPU's auto (fp32 weights, bf16 copies for large batches on AMX) is a CPU
    speed policy with no counterpart on a GPU, where bf16 weights and compute are the fast path.
    """
    if device.type == "cuda":
        return CUDA_DEFAULT_DTYPE if dtype in (None, "auto") else dtype
    return "auto" if dtype is None else dtype
