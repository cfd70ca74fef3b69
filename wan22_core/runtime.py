"""Device and dtype choices shared by the CLI and the nodes."""
from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

# The CUDA caching allocator the CLI and the worker ranks run with unless the user set one. Without
# expandable segments, 720p under a 24 GiB cap ran out of memory at step 1 with 4.3 GiB reserved
# but unusable (fragments); with them it ran at 22.2 GiB (benchmarks/RESULTS.md, "24 GB card").
ALLOC_CONF = "expandable_segments:True"


def default_cuda_allocator(env: MutableMapping[str, str] = os.environ) -> None:
    """Use ALLOC_CONF in `env` unless an allocator is chosen there (PYTORCH_CUDA_ALLOC_CONF, or the
    newer PYTORCH_ALLOC_CONF). Must run before the first CUDA allocation (torch reads the variable
    then); a process that set up CUDA already keeps its allocator."""
    if "PYTORCH_ALLOC_CONF" not in env:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda if available else cpu; cuda / cuda:N checked against what exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for CUDA but this machine has no CUDA GPU "
                             "(or this torch build has no CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bf16 on GPU (the official compute dtype), fp32 on CPU (where bf16 is slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def device_memory(device: torch.device | str) -> int | None:
    """Bytes of memory a CUDA device has (what the multi-GPU memory check budgets against);
    None for the CPU, whose ranks share host memory that no plan check budgets."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def check_backend(backend: str) -> None:
    """Fail before any process starts when this torch build cannot run `backend` ("nccl" or "gloo").

    NCCL ships only with torch's Linux GPU builds (not on Windows or macOS), and a few builds
    leave out torch.distributed altogether.
    """
    import torch.distributed as dist

    if not dist.is_available():  # then the is_*_available functions may be missing too
        raise ValueError(f"multi-GPU needs torch.distributed, which this torch build ({torch.__version__}) lacks; "
                         "install the Linux build of torch from pytorch.org")
    if not (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()):
        fix = ("install a CUDA build of torch for Linux from pytorch.org (it ships NCCL), or run the ranks on "
               "the CPU with gpus 'cpu:N'" if backend == "nccl" else "install the official torch build")
        raise ValueError(f"multi-GPU on {'CUDA' if backend == 'nccl' else 'the CPU'} needs the {backend} "
                         f"backend, which this torch build ({torch.__version__}) lacks; {fix}")
