"""The one module that imports ComfyUI.

Every node reaches ComfyUI (model folders, output folder, devices, memory, interrupts, the
progress bar, status messages to the frontend) through `runtime`, an object with one small
method per need. Inside ComfyUI it is a `ComfyRuntime`; anywhere else (unit tests, scripts) the
imports fail and it is a `StandaloneRuntime` that reads plain folders, so the pack imports and
runs without ComfyUI. Tests swap `runtime` for a fake to drive interrupts and watch progress.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ..wan22_core.runtime import resolve_device

try:  # Inside ComfyUI, folder_paths is a top-level module of the server process.
    import folder_paths
except ImportError:
    folder_paths = None
if folder_paths is not None:  # in ComfyUI a failure here must be loud, not a silent fallback
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
    from comfy.cli_args import args as comfy_args
    from server import PromptServer

# ComfyUI's names for the model folders our loaders read.
DIFFUSION_MODELS, TEXT_ENCODERS, VAE, LORAS = "diffusion_models", "text_encoders", "vae", "loras"
# ComfyUI lists only its own checkpoint extensions (no .gguf) in its folders. Each folder whose
# loader takes GGUF files gets a twin listing .gguf over the same path list (diffusion_models
# includes models/unet, text_encoders models/clip; extra_model_paths.yaml entries count for both),
# as ComfyUI-GGUF registers unet_gguf and clip_gguf.
GGUF_TWINS = {DIFFUSION_MODELS: "wan22_gguf_diffusion_models", TEXT_ENCODERS: "wan22_gguf_text_encoders"}
# The websocket event that carries a worker group's per-rank status to the sampler node (web/js).
WORKER_STATUS_EVENT = "wan22moe.worker_status"
NO_FILES = "(no files in models/{folder})"  # the combo's only option when a folder is empty


def check_model_name(folder: str, name: str) -> str:
    """Refuse names that could leave the model folders (API prompts are not validated by the UI)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"the {folder} file name must be a non-empty string, got {name!r}")
    windows = PureWindowsPath(name)  # splits on both separators and knows drive letters
    if PurePosixPath(name).is_absolute() or windows.anchor or ".." in windows.parts:
        raise ValueError(f"{folder} file {name!r} must be a name inside ComfyUI/models/{folder} as listed "
                         "by the loader (no absolute path, no '..')")
    return name


def file_options(folder: str) -> list[str]:
    """The combo options for a model folder: its files, or one placeholder that says it is empty."""
    names = runtime.filename_list(folder)
    return names or [NO_FILES.format(folder=folder)]


def model_path(folder: str, name: str) -> Path:
    """The full path of a model file chosen in a loader, or a ValueError saying where to put it."""
    check_model_name(folder, name)
    path = runtime.find_model(folder, name)
    if path is None:
        raise ValueError(f"{folder} file {name!r} was not found; put it into ComfyUI/models/{folder}/ "
                         f"(or a folder registered in extra_model_paths.yaml) and refresh the page")
    return path


class StandaloneRuntime:
    """No ComfyUI: model folders under `models_dir`, outputs to `output_dir`, nothing to interrupt."""

    def __init__(self, models_dir: str | os.PathLike | None = None, output_dir: str | os.PathLike = "output"):
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.output_dir = Path(output_dir)

    def filename_list(self, folder: str) -> list[str]:
        root = self.models_dir / folder if self.models_dir is not None else None
        if root is None or not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def find_model(self, folder: str, name: str) -> Path | None:
        if self.models_dir is None:
            return None
        path = self.models_dir / folder / name
        return path if path.is_file() else None

    def output_directory(self) -> Path:
        return self.output_dir

    def compute_device(self) -> torch.device:
        return resolve_device("auto")

    def text_encoder_device(self) -> torch.device:
        return self.compute_device()

    def vae_device(self) -> torch.device:
        return self.compute_device()

    def offload_device(self) -> torch.device:
        return torch.device("cpu")

    def free_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def interrupted(self) -> bool:
        return False

    def raise_if_interrupted(self) -> None:
        """ComfyUI turns its own exception into "interrupted"; standalone there is none to raise."""

    def progress_bar(self, total: int):
        return _NoProgress()

    def previews_enabled(self) -> bool:
        return False

    def send_status(self, node_id: str | None, rank: int, ranks: int, status: str) -> None:
        """No frontend to tell; the worker group's errors still reach the caller as exceptions."""


class _NoProgress:
    def update(self, value: int, preview=None) -> None:
        pass


class ComfyRuntime:
    """The same needs, answered by ComfyUI's folder_paths, model_management and ProgressBar."""

    def __init__(self):
        for folder, twin in GGUF_TWINS.items():
            paths = folder_paths.folder_names_and_paths[folder][0]  # the list itself: later additions show
            folder_paths.folder_names_and_paths[twin] = (paths, {".gguf"})

    def filename_list(self, folder: str) -> list[str]:
        names = folder_paths.get_filename_list(folder)
        if folder in GGUF_TWINS:
            names = sorted({*names, *folder_paths.get_filename_list(GGUF_TWINS[folder])})
        return names

    def find_model(self, folder: str, name: str) -> Path | None:
        found = folder_paths.get_full_path(folder, name)
        if found is None and folder in GGUF_TWINS:
            found = folder_paths.get_full_path(GGUF_TWINS[folder], name)
        return Path(found) if found is not None else None

    def output_directory(self) -> Path:
        return Path(folder_paths.get_output_directory())

    def compute_device(self) -> torch.device:
        return model_management.get_torch_device()

    def text_encoder_device(self) -> torch.device:
        return model_management.text_encoder_device()

    def vae_device(self) -> torch.device:
        return model_management.vae_device()  # honours --cpu-vae

    def offload_device(self) -> torch.device:
        return model_management.unet_offload_device()

    def free_memory(self) -> None:
        # Our experts, encoder and VAE are not ModelPatchers, so ComfyUI cannot evict them on its
        # own; instead we evict everything ComfyUI holds before each of our large allocations.
        model_management.unload_all_models()
        model_management.soft_empty_cache()

    def interrupted(self) -> bool:
        return model_management.processing_interrupted()

    def raise_if_interrupted(self) -> None:
        model_management.throw_exception_if_processing_interrupted()

    def progress_bar(self, total: int):
        return _ComfyProgress(comfy_utils.ProgressBar(total))

    def previews_enabled(self) -> bool:
        # ComfyUI's own samplers preview only when started with a --preview-method other than none.
        method = comfy_args.preview_method
        return getattr(method, "value", method) != "none"

    def send_status(self, node_id: str | None, rank: int, ranks: int, status: str) -> None:
        """One rank's status ("loading ...", "ready", "step 3/40", "error") for the sampler's status line.

        send_sync is thread-safe and goes to the client that queued the prompt (all clients when
        it was queued without one).
        """
        server = PromptServer.instance
        server.send_sync(WORKER_STATUS_EVENT, {"node": node_id, "rank": rank, "ranks": ranks, "status": status},
                         server.client_id)


class _ComfyProgress:
    def __init__(self, bar):
        self.bar = bar

    def update(self, value: int, preview=None) -> None:
        """preview: a uint8 [H, W, 3] tensor, sent as the node's live JPEG."""
        if preview is not None:
            from PIL import Image

            preview = ("JPEG", Image.fromarray(preview.numpy()), comfy_args.preview_size)
        # ComfyUI's progress hook also raises its interrupt exception here.
        self.bar.update_absolute(value, preview=preview)


runtime = ComfyRuntime() if folder_paths is not None else StandaloneRuntime()
