"""Build an expert on this rank: meta model -> parallelize -> read only this rank's rows from disk.

FSDP2 shards dim 0 of every parameter in torch.chunk layout: with P ranks, rank r holds rows
[r * ceil(n/P), ...) and trailing ranks may hold fewer or none. So every rank needs part of
every tensor, but a row range of a C-contiguous tensor is one contiguous byte range of a
safetensors file: the checkpoint header gives each tensor's offset, so a rank seeks and reads
just its rows (`checkpoints.DitRowReader`), about 1/P of the expert, and never holds a full
tensor. Without FSDP every rank reads whole tensors.

Every layout `checkpoints.check_slot` recognises works (official, ComfyUI with or without the
prefix, diffusers names, scaled fp8). fp8 rows are dequantised into the compute dtype, since
the shards are what the ranks compute with, by the converter `load_dit` uses: the ranks' rows
are the single-process weights bit for bit.

LoRAs are merged into the rows as they are read (`lora.lora_deltas` builds just the delta rows
of this rank's shard), so every shard is merged when it lands and FSDP never gathers unmerged
weights. Each expert keeps the parsed LoRA factors (about the LoRA file's size), so
`set_expert_loras` re-merges a live expert's shards in place without reading the checkpoint.

torch.distributed.tensor and this package's fsdp module are imported where they are used, as in
parallelize.py: they add 0.6 to 1.2 s to every start of the CLI and the nodes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..checkpoints import DitRowReader
from ..lora import LoraDeltas, LoraSpec, lora_deltas, remerge
from ..models.attention import set_attention_backend
from ..models.transformer import WanModel
from ..placement import ExpertPair
from .mesh import ParallelGroups
from .parallelize import parallelize


def _local_rows(param: nn.Parameter, name: str) -> tuple[torch.Tensor, int]:
    """(the rows of `param` this rank stores, index of the first): an FSDP shard, or the whole tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, 0
    local = param.to_local()
    per_rank = math.ceil(param.shape[0] / param.device_mesh.size())
    start = param.device_mesh.get_coordinate()[0] * per_rank
    if local.shape[1:] != param.shape[1:] or (local.shape[0] and start + local.shape[0] > param.shape[0]):
        raise RuntimeError(f"{name}: unexpected FSDP shard {tuple(local.shape)} of {tuple(param.shape)} at row "
                           f"{start}; this torch version shards differently from torch.chunk")
    return local, start


def _fill(param: nn.Parameter, reader: DitRowReader, name: str, dtype: torch.dtype, loras: LoraDeltas) -> None:
    """Copy this rank's rows of `name` into `param`, with the LoRA delta rows merged in.

    The merge is `lora.remerge` on the rows as stored in `dtype`, exactly what `apply_loras`
    does to a whole tensor on one GPU, so every rank's shard equals the same rows there.
    """
    local, start = _local_rows(param, name)
    if local.shape[0]:
        rows = reader.rows(name, start, start + local.shape[0], dtype)
        if name in loras.terms:
            rows = remerge(rows, name, None, loras, start=start)[0]
        local.copy_(rows)


def load_expert(path: str | Path, groups: ParallelGroups, device: torch.device, dtype: torch.dtype,
                loras: Sequence[LoraSpec] = (), on_tensor: Callable[[], None] | None = None) -> nn.Module:
    """One parallelized expert with this rank's weights (`loras` merged in), ready for `denoise`.

    on_tensor is called after each parameter is read (the worker's heartbeat while loading).
    """
    with DitRowReader(path) as reader:
        with torch.device("meta"):  # parameters in `dtype`, as load_dit holds them (the shards are stored so)
            model = WanModel(reader.cfg).requires_grad_(False).to(dtype)
        reader.check_names(name for name, _ in model.named_parameters())
        deltas, _ = lora_deltas(loras, {name: p.shape for name, p in model.named_parameters()})
        runnable = parallelize(model, groups, dtype)
        model.to_empty(device=device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                _fill(param, reader, name, dtype, deltas)
                if on_tensor is not None:
                    on_tensor()
        model.merged_loras = deltas  # the factors stay: a LoRA change re-merges without the checkpoint
    return runnable.eval()


def set_expert_loras(expert: nn.Module, loras: Sequence[LoraSpec], on_tensor: Callable[[], None] | None = None) -> None:
    """Make exactly `loras` merged into a loaded expert's rows on this rank, in place.

    Only parameters whose terms changed are touched, each by `lora.remerge` (subtract the old
    delta rows, add the new ones); files merged now are not read again. Gathered FSDP weights
    are released first, so the next forward gathers the re-merged shards.
    """
    from .fsdp import reshard_all

    model = next(m for m in expert.modules() if isinstance(m, WanModel))
    old: LoraDeltas = model.merged_loras
    new, _ = lora_deltas(loras, {name: p.shape for name, p in model.named_parameters()}, reuse=old)
    reshard_all(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if old.terms.get(name) == new.terms.get(name):
                continue
            local, start = _local_rows(param, name)
            if local.shape[0]:
                local.copy_(remerge(local, name, old, new, start=start)[0])
            if on_tensor is not None:
                on_tensor()
    model.merged_loras = new


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank stores (its FSDP shards, or whole tensors without FSDP)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def load_expert_pair(high_noise: str | Path, low_noise: str | Path, groups: ParallelGroups, device: torch.device,
                     dtype: torch.dtype, loras_high: Sequence[LoraSpec] = (), loras_low: Sequence[LoraSpec] = (),
                     on_tensor: Callable[[str], None] | None = None, attention: str | None = None):
    """Both experts for this rank (each with its LoRAs merged and, unless `attention` is None, that
    attention backend set), in the holder the sampling loop takes.

    With FSDP both stay sharded on `device` for the whole run (ShardedExperts). Without it
    every rank holds full experts: they load to host memory and ExpertPair places them as on
    one GPU (both on the device when they fit, else one at a time).
    """
    where = device if groups.plan.fsdp else torch.device("cpu")
    experts = [load_expert(path, groups, where, dtype, loras, on_tensor and (lambda n=name: on_tensor(n)))
               for name, path, loras in (("high", high_noise, loras_high), ("low", low_noise, loras_low))]
    if attention is not None:
        for expert in experts:
            set_attention_backend(expert, attention, device)
    if groups.plan.fsdp:
        from .fsdp import ShardedExperts

        return ShardedExperts(*experts, device, replicas=groups.plan.replicas)
    return ExpertPair(*experts, device)
