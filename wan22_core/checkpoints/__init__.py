"""Checkpoint files: find, recognise, read and load them into our modules.

- `reading`: `Checkpoint` (headers, tensors one at a time, row ranges), `read_state_dict`;
- `identify`: what a file is from its header (`identify`, `check_slot`); names via `keymaps`,
  folder and file names of each layout in `layouts`;
- `loading`: `load_dit`, `load_vae`, `load_text_encoder` (each with a `LoadReport`), and
  `DitRowReader` for processes that hold row ranges of an expert;
- `model_set`: `ModelFiles` (the four parts of a set), `check_expert_pair`, `expert_config`, `stores_fp8`, `stored_gguf_types`.
"""
from .identify import DIT, SCALE_SUFFIXES, TEXT_ENCODER, VAE, Identity, check_slot, identify
from .layouts import NUM_HEADS_KEY
from .loading import DitRowReader, LoadReport, load_dit, load_text_encoder, load_vae
from .model_set import ModelFiles, check_expert_pair, expert_config, stored_gguf_types, stores_fp8
from .reading import Checkpoint, CheckpointError, read_state_dict

__all__ = ["DIT", "SCALE_SUFFIXES", "TEXT_ENCODER", "VAE", "Identity", "check_slot", "identify", "NUM_HEADS_KEY",
           "DitRowReader", "LoadReport", "load_dit", "load_text_encoder", "load_vae", "ModelFiles",
           "check_expert_pair", "expert_config", "stores_fp8", "stored_gguf_types", "Checkpoint", "CheckpointError", "read_state_dict"]
