"""Build an expert on this rank: meta model -> parallelize -> read only this rank's rows from disk.

FSDP2 shards dim 0 of every parameter in torch.chunk layout: with P ranks, rank r holds rows
[r * ceil(n/P), ...) and trailing ranks may hold fewer or none. So every rank needs part of
every tensor, but a row range of a C-contiguous tensor is one contiguous byte range of a
safetensors file: the checkpoint header gives each tensor's offset, so a rank seeks and reads
just its rows (`checkpoints.DitRowReader`), about 1/P of the expert, and never holds a full
tensor. Without FSDP every rank reads whole tensors.

Every layout `checkpoints.check_slot` recognises works (official, ComfyUI with or without the
prefix, diffusers names, scaled fp8). Weights are held as one process holds them for the same
`weight_dtype` (`load_dit`): 16/32-bit rows in the compute dtype (fp8 rows dequantised into
it by the converter `load_dit` uses), and quantised Linears (`quant.QuantizedLinear`, the
reader's `swap_quantized`) as their uint8 bytes by rows: an fp8 file's e4m3 bytes as stored,
a 16-bit file quantised per rank with the scale of the whole tensor (one all-reduce of the
rows' amax per tensor). So the ranks' rows are the single-process weights bit for bit.

LoRAs are merged into the rows as they are read (`lora.lora_deltas` builds just the delta rows
of this rank's shard), so every shard is merged when it lands and FSDP never gathers unmerged
weights. An fp8 layer's scale is per tensor, so its merge takes the whole tensor's amax too.
GGUF layers take no merge (it would re-quantise their blocks): their low-rank terms run on the
fly, as on one GPU (`lora.LowRankBranch`, a forward hook adding the branch to the layer's
output), with the whole (small) factors on every rank, since FSDP gathers the whole weight for
the forward. Each expert keeps the parsed LoRA factors (about the LoRA file's size), so
`set_expert_loras` re-merges a live expert's shards and re-sets its branches in place without
reading the checkpoint.

torch.distributed.tensor and this package's fsdp module are imported where they are used, as in
parallelize.py: they add 0.6 to 1.2 s to every start of the CLI and the nodes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoints import DitRowReader, expert_config
from ..config import ExpertOptions
from ..experts import gguf_block_types, weight_bytes_per_param
from ..fp8 import block_linears, set_fp8_compute
from ..lora import (LoraDeltas, LoraSpec, lora_deltas, parameter_shapes, remerge, set_branches,
                    split_on_the_fly)
from ..models.attention import set_attention_backend
from ..models.transformer import WanModel
from ..placement import ExpertPair
from ..quant import QuantizedLinear
from .mesh import ParallelGroups
from .parallelize import parallelize
from .plan import RankLoad


def rank_load(expert_file: Path, video: tuple[int, int, int], options: ExpertOptions, device: torch.device,
              batch_cfg: bool) -> RankLoad:
    """What each rank is asked to hold (plan.check_plan_fits' input): the experts of `expert_file`
    (its headers tell fp8 and GGUF) held as `options` say, `video` (frames, height, width), batched CFG or not."""
    return RankLoad.of(expert_config(expert_file), video, options, weight_bytes_per_param(options, device, expert_file),
                       batch_cfg, gguf_block_types(options, device, expert_file))


def _local_rows(param: nn.Parameter, name: str) -> tuple[torch.Tensor, int]:
    """(the rows of `param` this rank stores, index of the first): an FSDP shard, or the whole tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, 0
    local = param.to_local()
    per_rank = math.ceil(param.shape[0] / param.device_mesh.size())
    start = min(param.device_mesh.get_coordinate()[0] * per_rank, param.shape[0])  # trailing ranks: none
    if local.shape[1:] != param.shape[1:] or start + local.shape[0] > param.shape[0]:
        raise RuntimeError(f"{name}: unexpected FSDP shard {tuple(local.shape)} of {tuple(param.shape)} at row "
                           f"{start}; this torch version shards differently from torch.chunk")
    return local, start


def _whole_amax(param: nn.Parameter) -> Callable[[torch.Tensor], torch.Tensor]:
    """For `fp8.quantize_fp8` / `lora.remerge`: this rank's rows' amax -> the whole tensor's (the
    max over the FSDP mesh; every rank calls it for the same parameters in the same order)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return lambda amax: amax  # the whole tensor is here

    def whole(amax: torch.Tensor) -> torch.Tensor:
        total = amax.to(param.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=param.device_mesh.get_group())
        return total.to(amax.device)
    return whole


def _merge_quantized(layer: QuantizedLinear, rows: torch.Tensor, name: str, old: LoraDeltas | None,
                     new: LoraDeltas, start: int, whole_amax) -> torch.Tensor:
    """`lora.remerge` on a quantised layer's byte rows (fp8: its per-tensor scale updated in place;
    GGUF layers never get here: `lora.split_on_the_fly` runs their terms as branches)."""
    scale = getattr(layer, "scale_weight", None)
    stored, new_scale = remerge(layer.as_stored(rows), name, old, new, scale, start, whole_amax)
    if scale is not None:
        scale.copy_(new_scale)
    return layer.byte_rows(stored)


def _fill(model: nn.Module, param: nn.Parameter, reader: DitRowReader, name: str, dtype: torch.dtype,
          loras: LoraDeltas) -> None:
    """Copy this rank's rows of `name` into `param`, with the LoRA delta rows merged in.

    The merge is `lora.remerge` on the rows as stored, exactly what `apply_loras` does to a whole
    tensor on one GPU, so every rank's shard equals the same rows there. A quantised weight is
    read on every rank, an empty shard too: its scale may need the whole tensor's amax.
    """
    local, start = _local_rows(param, name)
    layer_name, _, leaf = name.rpartition(".")
    layer = model.get_submodule(layer_name)
    if isinstance(layer, QuantizedLinear) and leaf == "weight":
        whole_amax = _whole_amax(param)
        rows, buffers = reader.quantized_rows(layer_name, start, start + local.shape[0], whole_amax)
        for buffer, value in buffers.items():
            getattr(layer, buffer).copy_(value)
        if name in loras.terms:
            rows = _merge_quantized(layer, rows, name, None, loras, start, whole_amax)
    elif local.shape[0]:
        rows = reader.rows(name, start, start + local.shape[0], dtype)
        if name in loras.terms:
            rows = remerge(rows, name, None, loras, start=start)[0]
    else:
        return
    local.copy_(rows)


def load_expert(path: str | Path, groups: ParallelGroups, device: torch.device, dtype: torch.dtype,
                loras: Sequence[LoraSpec] = (), on_tensor: Callable[[], None] | None = None, *,
                weight_dtype: torch.dtype | None = None, fp8_matmul: str | None = None,
                compile: bool = False) -> nn.Module:
    """One parallelized expert with this rank's rows of checkpoint `path` (`loras` merged in),
    ready for `denoise`; see `build_expert`."""
    with DitRowReader(path) as reader:
        return build_expert(reader, groups, device, dtype, loras, on_tensor, weight_dtype=weight_dtype,
                            fp8_matmul=fp8_matmul, compile=compile)


def build_expert(reader: DitRowReader, groups: ParallelGroups, device: torch.device, dtype: torch.dtype,
                 loras: Sequence[LoraSpec] = (), on_tensor: Callable[[], None] | None = None, *,
                 weight_dtype: torch.dtype | None = None, fp8_matmul: str | None = None,
                 compile: bool = False) -> nn.Module:
    """One parallelized expert with this rank's rows from `reader` (a `DitRowReader`, or anything
    with its members: benchmarks/bench_rank.py reads random rows), `loras` merged in.

    dtype, weight_dtype: as `load_dit` takes them (the compute dtype; None keeps the file's fp8
    layers, torch.float8_e4m3fn quantises the block Linears, `dtype` dequantises). fp8_matmul:
    `fp8.set_fp8_compute`'s mode, or None. compile: each block compiled before FSDP wraps it
    (`parallelize`). on_tensor is called after each parameter is read (the worker's heartbeat).
    """
    with torch.device("meta"):  # parameters in `dtype`, as load_dit holds them (the shards are stored so)
        model = WanModel(reader.cfg).requires_grad_(False).to(dtype)
    shapes = {name: p.shape for name, p in model.named_parameters()}  # dense: what LoRAs must fit
    reader.check_names(shapes)
    wanted, _ = lora_deltas(loras, shapes)
    reader.swap_quantized(model, dtype, weight_dtype)
    layers = _block_linears(model)
    deltas, branches = split_on_the_fly(wanted, layers)  # GGUF layers: their terms run on the fly
    if fp8_matmul is not None:
        set_fp8_compute(model, fp8_matmul)
    runnable = parallelize(model, groups, compile=compile)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            _fill(model, param, reader, name, dtype, deltas)
            if on_tensor is not None:
                on_tensor()
    set_branches(layers, {}, branches, deltas.bound)  # whole low-rank factors on every rank
    # the factors stay: a LoRA change re-merges and re-branches without the checkpoint
    model.merged_loras, model.lora_branches = deltas, branches
    return runnable.eval()


def _block_linears(model: WanModel) -> dict[str, nn.Module]:
    return {f"{name}.weight": layer for name, layer in block_linears(model).items()}


def set_expert_loras(expert: nn.Module, loras: Sequence[LoraSpec], on_tensor: Callable[[], None] | None = None) -> None:
    """Make exactly `loras` merged into a loaded expert's rows on this rank, in place.

    Only parameters whose terms changed are touched, each by `lora.remerge` (subtract the old
    delta rows, add the new ones); files merged now are not read again. Gathered FSDP weights
    are released first, so the next forward gathers the re-merged shards.
    """
    from .fsdp import reshard_all

    model = next(m for m in expert.modules() if isinstance(m, WanModel))
    old: LoraDeltas = model.merged_loras
    wanted, _ = lora_deltas(loras, parameter_shapes(model), reuse=old)
    layers = _block_linears(model)
    new, branches = split_on_the_fly(wanted, layers)
    reshard_all(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if old.terms.get(name) == new.terms.get(name):
                continue
            local, start = _local_rows(param, name)
            layer_name, _, leaf = name.rpartition(".")
            layer = model.get_submodule(layer_name)
            if isinstance(layer, QuantizedLinear) and leaf == "weight":  # every rank: the scale is per tensor
                local.copy_(_merge_quantized(layer, local, name, old, new, start, _whole_amax(param)))
            elif local.shape[0]:
                local.copy_(remerge(local, name, old, new, start=start)[0])
            if on_tensor is not None:
                on_tensor()
        set_branches(layers, model.lora_branches, branches, new.bound)
    model.merged_loras, model.lora_branches = new, branches


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank stores (its FSDP shards, or whole tensors without FSDP)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def load_expert_pair(high_noise: str | Path, low_noise: str | Path, groups: ParallelGroups, device: torch.device,
                     dtype: torch.dtype, loras_high: Sequence[LoraSpec] = (), loras_low: Sequence[LoraSpec] = (),
                     on_tensor: Callable[[str], None] | None = None, attention: str | None = None, *,
                     weight_dtype: torch.dtype | None = None, fp8_matmul: str | None = None, compile: bool = False):
    """Both experts for this rank (each with its LoRAs merged and, unless `attention` is None, that
    attention backend set), in the holder the sampling loop takes. weight_dtype, fp8_matmul and
    compile as `load_expert` takes them (`experts.expert_dtypes` gives the first two).

    With FSDP both stay sharded on `device` for the whole run (ShardedExperts). Without it
    every rank holds full experts: they load to host memory and ExpertPair places them as on
    one GPU (both on the device when they fit, else one at a time).
    """
    where = device if groups.plan.fsdp else torch.device("cpu")
    experts = [load_expert(path, groups, where, dtype, loras, on_tensor and (lambda n=name: on_tensor(n)),
                           weight_dtype=weight_dtype, fp8_matmul=fp8_matmul, compile=compile)
               for name, path, loras in (("high", high_noise, loras_high), ("low", low_noise, loras_low))]
    if attention is not None:
        for expert in experts:
            set_attention_backend(expert, attention, device)
    if groups.plan.fsdp:
        from .fsdp import ShardedExperts

        return ShardedExperts(*experts, device, replicas=groups.plan.replicas)
    return ExpertPair(*experts, device)
