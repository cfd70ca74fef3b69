"""Block swap: run a model whose blocks do not all fit on the GPU.

The last `num_blocks` transformer blocks keep their weights in (pinned) host memory. Just before
such a block runs, its weights are copied to the device; right after, the device copy is dropped
(the weights never change, so nothing is copied back). The next swapped block is prefetched on a
side CUDA stream while the current block computes, so with enough compute per block the copies
are hidden. At most two swapped blocks are on the device at any time.

At 720p one A14B block (351M parameters, 0.70 GB in bf16) computes for ~0.4 s on an H100, while
its copy over PCIe 4 x16 (~25 GB/s) takes ~0.03 s: swapping most of the 40 blocks is nearly free
there, which is what lets a 24 GB card hold the activations of a 720p video.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from .config import is_integer

# Where the experts live while sampling (ExpertPair): "none" keeps both on the device,
# "swap_experts" only the active one, "block_swap" also streams some of its blocks from host memory.
OFFLOAD_MODES = ("none", "swap_experts", "block_swap")
OFFLOAD_CHOICES = ("auto", *OFFLOAD_MODES)  # auto: both experts stay when they fit (placement.experts_fit)


def expert_pair_options(offload: str, swap_blocks: int, compile: bool, num_layers: int) -> dict:
    """The offload choice -> ExpertPair keyword arguments (keep_both, swap_blocks), or ValueError.

    The one place the CLI and the loader node turn offload / swap_blocks / compile into a
    placement. swap_blocks is the count of each expert's `num_layers` blocks kept in host memory:
    0 except with block_swap, which needs at least 1 (with 0 it would silently be swap_experts).
    """
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_CHOICES)}; got {offload!r}")
    if not (is_integer(swap_blocks) and 0 <= swap_blocks <= num_layers):
        raise ValueError(f"swap_blocks must be an integer between 0 and {num_layers} (the blocks of one expert), "
                         f"got {swap_blocks!r}")
    if offload != "block_swap":
        if swap_blocks:
            raise ValueError(f"swap_blocks={swap_blocks} needs offload='block_swap' (got offload={offload!r}); "
                             "choose block_swap or set swap_blocks to 0")
        return {"keep_both": {"auto": None, "none": True, "swap_experts": False}[offload], "swap_blocks": 0}
    if swap_blocks == 0:
        raise ValueError(f"offload='block_swap' needs swap_blocks between 1 and {num_layers} (blocks of the active "
                         "expert kept in CPU memory), got 0; set swap_blocks, or choose offload='swap_experts' to "
                         "move whole experts only")
    if compile:
        raise ValueError("compile and offload='block_swap' do not combine (block swap moves the weights from hooks "
                         "around each block, which a compiled block would trace); turn compile off or choose "
                         "another offload")
    return {"keep_both": False, "swap_blocks": int(swap_blocks)}


# Host masters: a module whose weights stay in host memory and visit the device. `host_masters`
# pairs each parameter and buffer (an fp8 layer's scale and an unmerged LoRA's factors travel with
# the weights) with its host data; `to_device` points the tensors at device copies of it, and
# `to_host` points them back (no copy: the weights do not change on the device).
Masters = list[tuple[torch.Tensor, torch.Tensor]]


def host_masters(module: nn.Module, pin: bool = False) -> Masters:
    return [(t, t.data.pin_memory() if pin else t.data) for t in itertools.chain(module.parameters(), module.buffers())]


def to_device(masters: Masters, device: torch.device, non_blocking: bool = False) -> None:
    for tensor, host in masters:  # copy=True: a real copy on the CPU too, so tests run the same bookkeeping
        tensor.data = host.to(device, non_blocking=non_blocking, copy=True)


def to_host(masters: Masters) -> None:
    for tensor, host in masters:
        tensor.data = host


class BlockSwap:
    def __init__(self, blocks: nn.ModuleList, num_blocks: int, device: torch.device):
        if not 0 <= num_blocks <= len(blocks):
            raise ValueError(f"block swap: num_blocks must be between 0 and {len(blocks)}, got {num_blocks}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.swapped = list(blocks)[len(blocks) - num_blocks:]
        self.order = {block: i for i, block in enumerate(self.swapped)}
        self.host: dict[nn.Module, Masters] = {}
        self.ready: dict[nn.Module, torch.cuda.Event | None] = {}
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.peak_resident = 0  # most swapped blocks on the device at once (bookkeeping, tests)
        for block in blocks:
            if block not in self.order:
                block.to(self.device)
        for block in self.swapped:
            block.to("cpu")
            self.host[block] = host_masters(block, pin=self.cuda)
        self._hooks = [h for block in self.swapped for h in (
            block.register_forward_pre_hook(self._before), block.register_forward_hook(self._after))]

    def resident(self) -> list[int]:
        """Indices (within the swapped blocks) whose weights are on the device now."""
        return [self.order[b] for b in self.ready]

    def _load(self, block: nn.Module) -> None:
        if block in self.ready:
            return
        event = None
        if self.cuda:
            with torch.cuda.stream(self.stream):
                to_device(self.host[block], self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            to_device(self.host[block], self.device)
        self.ready[block] = event
        self.peak_resident = max(self.peak_resident, len(self.ready))

    def _before(self, block: nn.Module, args) -> None:
        self._load(block)
        event = self.ready[block]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for param, _ in self.host[block]:
                param.data.record_stream(compute)  # not reused by the allocator before compute is done
        nxt = self.swapped[(self.order[block] + 1) % len(self.swapped)]
        if nxt is not block:
            self._load(nxt)  # prefetch, overlapping this block's compute

    def _after(self, block: nn.Module, args, output) -> None:
        to_host(self.host[block])  # drop the device copy; the host copy is the master
        del self.ready[block]

    def remove(self) -> None:
        """Undo: hooks off, every swapped block's weights back on the host."""
        for hook in self._hooks:
            hook.remove()
        for block in list(self.ready):
            self._after(block, None, None)
