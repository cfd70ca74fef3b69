"""Mixture-of-experts routing, per-expert guidance and expert residency.

Wan2.2 A14B has two full experts: the high-noise one lays out motion and composition, the
low-noise one refines detail. Which one runs depends only on the timestep.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import NUM_TRAIN_TIMESTEPS, SamplerSettings
from ..offload import BlockSwap, Masters, host_masters, to_device, to_host

HIGH, LOW = "high", "low"


def select_expert(timestep: int, boundary: float) -> str:
    """High-noise expert iff timestep >= boundary * 1000 (official: int timestep >= 875.0)."""
    return HIGH if timestep >= boundary * NUM_TRAIN_TIMESTEPS else LOW


def guidance_scale(expert: str, settings: SamplerSettings) -> float:
    return settings.cfg_high if expert == HIGH else settings.cfg_low


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + g * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def both_fit(high: nn.Module, low: nn.Module, device: torch.device) -> bool:
    """Whether both experts can stay on `device` for the whole run.

    Keep 40% of the card for activations (720p: ~1.5 GB per fp32 residual copy, more in the
    FFN and attention) and the VAE; A14B bf16 experts are 28.6 GB each, so an 80 GB card swaps
    and a 141 GB card keeps both.
    """
    if device.type != "cuda":
        return True  # CPU (and other hosts): moving between host memories gains nothing
    total = torch.cuda.get_device_properties(device).total_memory
    return module_bytes(high) + module_bytes(low) <= 0.6 * total


def keeps_host_copies(device: torch.device, offload_device: torch.device = torch.device("cpu")) -> bool:
    """ExpertPair's keep_host for a one-process holder (the CLI, the loader node): worth it whenever
    the compute device is not where idle experts wait."""
    return torch.device(device) != torch.device(offload_device)


class ExpertPair:
    """The two experts and where they live.

    When both fit on the compute device they are both moved there once. Otherwise only the
    active expert is on the device and the other waits on `offload_device`: one move per
    switch (at step 0 and at the boundary), never one per step. With `swap_blocks` > 0 the
    active expert also keeps that many blocks in host memory, streamed in per block
    (`wan22_core.offload.BlockSwap`), for cards that cannot hold one whole expert.

    keep_host=True (the CLI and the loader node, per `keeps_host_copies`; whole-expert placement
    only) keeps a placed expert's host tensors, so offloading it only drops the device copies:
    no GPU -> host copy, at the cost of both experts staying in host memory. Only for holders
    that change weights on the host, between runs (the node re-merges LoRAs after `offload_all`);
    the multi-GPU workers re-merge LoRAs into placed weights, so they keep the default. On the
    CPU it makes real copies, which the tests use to run the same bookkeeping.
    """

    def __init__(self, high: nn.Module, low: nn.Module, device: torch.device,
                 keep_both: bool | None = None, offload_device: torch.device = torch.device("cpu"),
                 swap_blocks: int = 0, keep_host: bool = False):
        self.experts = {HIGH: high, LOW: low}
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.swap_blocks = swap_blocks
        self.keep_host = keep_host
        if swap_blocks:
            keep_both = False  # block swap exists because one expert does not fit
        self.keep_both = both_fit(high, low, self.device) if keep_both is None else keep_both
        self.active: str | None = None
        self._swap: BlockSwap | None = None
        self._host: dict[int, Masters] = {}  # id(expert) -> its host data while placed (keep_host)

    def get(self, name: str) -> nn.Module:
        if name != self.active:
            if not self.keep_both and self.active is not None:
                self._offload(self.experts[self.active])  # free memory before loading
            self._place(self.experts[name])
            self.active = name
        return self.experts[name]

    def _place(self, expert: nn.Module) -> None:
        if id(expert) in self._host:  # still placed (keep_both): copying again would hold it twice
            return
        if self.swap_blocks:
            for name, child in expert.named_children():  # embeddings, head: on the device
                if name != "blocks":
                    child.to(self.device)
            self._swap = BlockSwap(expert.blocks, self.swap_blocks, self.device)  # places the blocks
        elif self.keep_host:
            self._host[id(expert)] = masters = host_masters(expert)
            to_device(masters, self.device)
        else:
            expert.to(self.device)

    def _offload(self, expert: nn.Module) -> None:
        if self._swap is not None:
            self._swap.remove()
            self._swap = None
        to_host(self._host.pop(id(expert), []))
        expert.to(self.offload_device)  # anything not on the host yet (a no-op after the above)

    def offload_all(self) -> None:
        """Both experts to `offload_device` (e.g. between prompts, to give the GPU back)."""
        for expert in self.experts.values():
            self._offload(expert)
        self.active = None
