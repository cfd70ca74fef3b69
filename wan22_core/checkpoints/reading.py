"""Reading checkpoint files: headers first, then tensor bytes one at a time, or a row range.

Reading never executes code from a file: `.pth` goes through `torch.load(weights_only=True)`,
safetensors headers are validated by the safetensors library and the tensor bytes are then
read with plain file reads, one tensor at a time, cast to the target dtype and moved to the
target device before the next is read. So loading a 57 GB fp32 expert as bf16 peaks at the bf16
model plus one fp32 tensor: no full fp32 copy, and no memory-mapped pages counted against the
process (reading through an mmap keeps every touched page of the file resident: 3x the bf16
size at peak for an fp32 file, measured). `Checkpoint.read_rows` reads a row range of one tensor,
so each rank of a sharded model reads just its part from disk (`DitRowReader`).

GGUF files (recognised by their magic, whatever the name) are read the same way: `gguf.py`
parses the header, then the bytes are plain reads. A quantised tensor comes back as a
`GGUFWeight` (its block bytes, type and real shape) for the loader to keep or dequantise.
"""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..errors import Wan22Error
from ..quant import GGUFWeight, QuantType
from .gguf import GGUFFormatError, GGUFMetadata, is_gguf, read_header
from .layouts import COMFY_DIRS, HIGH_NOISE_DIR, NUM_HEADS_KEY


class CheckpointError(Wan22Error):
    """A checkpoint is missing, unreadable, or not what its slot needs."""


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are (`start` is the absolute file offset; -1 for `.pth`).

    GGUF tensors also have their ggml `qtype`; a quantised one has dtype uint8 (its block bytes)
    and `shape` is its real shape.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int
    qtype: QuantType | None = None

    @property
    def quantized(self) -> bool:
        """Stored in GGUF blocks (read back as a `GGUFWeight`), not as plain numbers."""
        return self.qtype is not None and self.qtype.block_size > 1


class Checkpoint:
    """Names, dtypes and shapes of a checkpoint file or folder, read from headers only.

    Opening one is cheap at any size; `read` then reads the tensors you ask for.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        self.gguf: GGUFMetadata | None = None  # a GGUF file's key/value metadata
        self._pickled: dict[str, torch.Tensor] = {}
        config = self.path / "config.json"
        self.config: dict = _read_json(config) if self.path.is_dir() and config.is_file() else {}
        if self.path.is_file():
            _check_readable(self.path)  # one clear message for an unreadable file, whatever its format
        if self.path.is_file() and is_gguf(self.path):
            self._add_gguf(self.path)
        elif self.path.is_file() and self.path.suffix == ".gguf":
            raise CheckpointError(f"{self.path.name} is not a GGUF file (it does not start with the GGUF magic); "
                                  "the download is damaged or incomplete, download it again")
        elif self.path.is_file() and self.path.suffix in _PICKLE_SUFFIXES:
            self._pickled = _load_pickle_safely(self.path)
            self.entries = {k: TensorEntry(v.dtype, tuple(v.shape), self.path, -1, v.nbytes)
                            for k, v in self._pickled.items()}
        else:
            for file in _safetensors_files(self.path):
                self._add_safetensors(file)

    def _add_safetensors(self, file: Path) -> None:
        _check_readable(file)  # safe_open reports "permission denied" as "no such file"
        try:  # the library validates the header: JSON, dtypes, shapes, offsets, file length
            with safe_open(str(file), framework="pt") as f:
                self.metadata.update(f.metadata() or {})
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {file}: {err}; the file is truncated or not a "
                                  "safetensors file, download it again") from err
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        data_start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which this loader "
                                      f"does not read (known: {', '.join(_SAFETENSORS_DTYPES)})")
            begin, end = info["data_offsets"]
            self.entries[name] = TensorEntry(_SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), file,
                                             data_start + begin, end - begin)

    def _add_gguf(self, file: Path) -> None:
        try:
            tensors, self.gguf = read_header(file)
        except GGUFFormatError as err:
            raise CheckpointError(str(err)) from err
        self.entries = {name: TensorEntry(t.dtype, t.shape, file, t.start, t.nbytes, t.qtype)
                        for name, t in tensors.items()}

    @property
    def num_heads(self) -> int | None:
        """The DiT head count from config.json (official or diffusers) or our metadata, if any
        (a GGUF file's llama.cpp-style `<architecture>.attention.head_count`)."""
        gguf_heads = self.gguf.get(f"{self.gguf.architecture}.attention.head_count") if self.gguf else None
        heads = (self.config.get("num_heads") or self.config.get("num_attention_heads")
                 or self.metadata.get(NUM_HEADS_KEY) or gguf_heads)
        if heads is None:
            return None
        if isinstance(heads, bool) or not isinstance(heads, (int, str)) or not str(heads).isdecimal() \
                or int(heads) < 1:
            raise CheckpointError(f"{self.path}: the head count in its config or metadata is {heads!r}, not a whole "
                                  "number >= 1; the file is damaged, download it again")
        return int(heads)

    def meta_tensors(self, names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
        """{new name: meta tensor of the right dtype and shape}, for configs and checks without I/O."""
        names = names if names is not None else {k: k for k in self.entries}
        return {new: torch.empty(self.entries[old].shape, dtype=self.entries[old].dtype, device="meta")
                for old, new in names.items()}

    def read(self, names, device: torch.device | str = "cpu",
             dtype: torch.dtype | dict[str, torch.dtype] | None = None,
             transient: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order, each on `device` before the next is read; a quantised GGUF
        tensor as a `GGUFWeight` (its bytes on `device`).

        dtype: floating tensors are cast to it (one dtype, or {name: dtype}; names not in the
        dict keep their stored dtype). fp8 tensors are never cast: their value needs a scale.
        A tensor that is cast or moved anyway is read into one reused scratch buffer, so the
        process never holds more than one stored-dtype tensor besides what it returns (and a
        fresh allocation per read would fragment the heap: +50% peak RSS, measured).
        transient: every tensor may be a view of that buffer, valid until the next one is read,
        for callers that convert each tensor themselves (quantising to fp8).
        """
        ordered = sorted(names, key=lambda n: (str(self.entries[n].file), self.entries[n].start))
        targets = {n: self._target_dtype(n, dtype) for n in ordered}
        moved = torch.device(device).type != "cpu"
        converted = (set(ordered) if transient or moved
                     else {n for n in ordered if targets[n] != self.entries[n].dtype})
        scratch = torch.empty(max((self.entries[n].nbytes for n in converted), default=0), dtype=torch.uint8)
        handles = {}
        try:
            for name in ordered:
                entry = self.entries[name]
                if entry.start < 0:
                    tensor = self._pickled[name]
                else:
                    buffer = scratch[:entry.nbytes] if name in converted else None
                    tensor = _read_bytes(_handle(handles, entry.file), entry, name, buffer)
                tensor = tensor.to(device, targets[name])
                yield name, GGUFWeight(tensor, entry.qtype, entry.shape) if entry.quantized else tensor
        finally:
            for handle in handles.values():
                handle.close()

    def _target_dtype(self, name: str, dtype: torch.dtype | dict[str, torch.dtype] | None) -> torch.dtype:
        stored = self.entries[name].dtype
        wanted = dtype.get(name) if isinstance(dtype, dict) else dtype
        if wanted is None or not stored.is_floating_point or stored in FP8_DTYPES:
            return stored
        return wanted

    def read_rows(self, name: str, start: int, stop: int, handles: dict[Path, object],
                  label: str | None = None) -> torch.Tensor | GGUFWeight:
        """Rows [start, stop) of tensor `name` (dim 0) as stored, reading only their bytes.

        A row range of a C-contiguous tensor is one contiguous byte range of a safetensors or
        GGUF file (GGUF blocks run along rows: a `GGUFWeight` when each row is whole blocks, else
        ValueError); a `.pth` file is memory-mapped, so slicing it touches only those rows. handles:
        {file: open binary file} kept by the caller across calls (opened here when missing, closed
        by the caller). label: the tensor's name in messages (default `name`).
        """
        entry = self.entries[name]
        if not entry.shape or not 0 <= start <= stop <= entry.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of {name} with shape {list(entry.shape)}")
        if entry.start < 0:
            return self._pickled[name][start:stop]
        rows = _read_bytes(_handle(handles, entry.file), entry, label or name, None, (start, stop))
        return GGUFWeight(rows, entry.qtype, (stop - start, *entry.shape[1:])) if entry.quantized else rows


def _handle(handles: dict[Path, object], file: Path):
    """The open binary handle of `file` in `handles`, opened on first use (the caller closes them)."""
    if file not in handles:
        handles[file] = open(file, "rb")
    return handles[file]


def _read_bytes(handle, entry: TensorEntry, name: str, buffer: torch.Tensor | None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor's bytes, or rows [start, stop) of dim 0 only, read into `buffer` (uint8, reused
    by the caller) or a fresh one; a quantised GGUF tensor's as flat block bytes."""
    shape, offset, nbytes = entry.shape, 0, entry.nbytes
    if rows is not None:
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        if entry.quantized:  # a row must be whole blocks (the error names the type)
            row_bytes = entry.qtype.nbytes(math.prod(entry.shape[1:]))
        shape, offset = (rows[1] - rows[0], *entry.shape[1:]), rows[0] * row_bytes
        nbytes = shape[0] * row_bytes
    buffer = torch.empty(nbytes, dtype=torch.uint8) if buffer is None else buffer[:nbytes]
    handle.seek(entry.start + offset)
    if nbytes and handle.readinto(memoryview(buffer.numpy())) != nbytes:
        raise CheckpointError(f"{entry.file} ended inside tensor {name!r}; the file is truncated, download it again")
    return buffer if entry.quantized else buffer.view(entry.dtype).reshape(shape)


def _safetensors_files(path: Path) -> list[Path]:
    """The safetensors files that make up `path` (a file, a folder, or a sharded folder)."""
    if path.is_file():
        return [path]
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        weight_map = _read_json(index[0]).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise CheckpointError(f"{index[0]} has no weight_map of tensor names to shard files; "
                                  "download the complete folder again")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index[0]} lists shards that are not in the folder: {', '.join(missing)}; "
                                  "download the complete folder again")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        whole_set = any((path / n).exists() for n in (HIGH_NOISE_DIR, "model_index.json", COMFY_DIRS["experts"]))
        hint = ("it is a whole model set: pass it as --model-dir (ModelFiles.from_model_dir)" if whole_set else
                "point at one file, or at a folder with one file or with an index")
        raise CheckpointError(f"{path} holds {len(files)} .safetensors files and no index json; {hint}")
    return files


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        fix = ("make it readable by the user running this process" if isinstance(err, PermissionError)
               else "check the path and the disk")
        raise CheckpointError(f"cannot open {path}: {err.strerror or err}; {fix}") from err


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"cannot read {path}: {err}; the file is damaged, download it again") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object; download it again")
    return value


def _load_pickle_safely(path: Path) -> dict[str, torch.Tensor]:
    _check_readable(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # torch's refusal to import what the pickle names
            raise CheckpointError(f"{path} needs code to be unpickled and was refused (only plain tensors are "
                                  "loaded from .pth files); convert it to .safetensors") from err
        raise CheckpointError(f"cannot read {path}: its pickle is corrupt; download it again") from err
    except Exception as err:  # a damaged archive fails in many ways (zip, pickle, storage checks)
        raise CheckpointError(f"cannot read {path}: {type(err).__name__}: {err}; the file is truncated or "
                              "corrupt, download it again") from err
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a flat dict of tensors")
    return sd


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict as stored, in file order; floating tensors cast to `dtype` one by one when given.

    fp8 tensors are returned as stored: their value needs the layer's `.scale_weight`.
    """
    ckpt = Checkpoint(path)
    return dict(ckpt.read(ckpt.entries, device, dtype))
