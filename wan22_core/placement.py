"""Where the two experts live while one process samples: `ExpertPair`, and the rule that decides.

Placement sits above the memory model (`memory.py`, which decides what fits) and the offload
mechanisms (`offload.py`: host masters, block swap); the sampling loop sees only
`experts.get(name)` and `experts.device` (`pipeline.Experts`).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import FRAMES, HEIGHT, WIDTH
from .memory import CUDA_OVERHEAD, FP32, estimate_peak_bytes
from .models.transformer import WanModel
from .offload import BlockSwap, Masters, host_masters, to_device, to_host
from .sampling.moe import HIGH, LOW

Video = tuple[int, int, int]  # frames, height, width
OFFICIAL_VIDEO: Video = (FRAMES, HEIGHT, WIDTH)  # the largest official size: 81 x 720 x 1280


def module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def experts_fit(high: nn.Module, low: nn.Module, device: torch.device, video: Video = OFFICIAL_VIDEO) -> bool:
    """Whether both experts can stay on `device` for a whole run of `video` (the one "fits" rule).

    Both experts' bytes as held, plus the memory model's activation peak of one batched-CFG
    forward of that video, plus CUDA_OVERHEAD, must fit the card. A14B in bf16 at 720p: 53.2 +
    14.5 + 1.5 GiB = 69.2 GiB, so an 80 GB card keeps both and a 48 GB card swaps. The estimate
    counts 16- or 32-bit compute; fp8 layers add at most one dequantised weight (0.14 GB at
    A14B), inside the overhead's margin.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return True  # CPU (and other hosts): moving between host memories gains nothing
    model = next(m for m in high.modules() if isinstance(m, WanModel))  # inside a wrapper on the ranks
    compute = FP32 if model.dtype == torch.float32 else 2
    activations = estimate_peak_bytes(model.cfg, *video, weight_bytes_per_param=compute)["activations"]
    need = module_bytes(high) + module_bytes(low) + activations + CUDA_OVERHEAD
    return need <= torch.cuda.get_device_properties(device).total_memory


def keeps_host_copies(device: torch.device, offload_device: torch.device = torch.device("cpu")) -> bool:
    """ExpertPair's keep_host for a one-process holder (the CLI, the loader node): worth it whenever
    the compute device is not where idle experts wait."""
    return torch.device(device) != torch.device(offload_device)


class ExpertPair:
    """The two experts and where they live.

    When both fit on the compute device (keep_both None: `experts_fit` for `video`) they are
    both moved there once. Otherwise only the active expert is on the device and the other waits
    on `offload_device`: one move per switch (at step 0 and at the boundary), never one per step.
    With `swap_blocks` > 0 the active expert also keeps that many blocks in host memory,
    streamed in per block (`offload.BlockSwap`), for cards that cannot hold one whole expert.

    keep_host=True (the CLI and the loader node, per `keeps_host_copies`; whole-expert placement
    only) keeps a placed expert's host tensors, so offloading it only drops the device copies:
    no GPU -> host copy, at the cost of both experts staying in host memory. Only for holders
    that change weights on the host, between runs (the node re-merges LoRAs after `offload_all`);
    the multi-GPU workers re-merge LoRAs into placed weights, so they keep the default. On the
    CPU it makes real copies, which the tests use to run the same bookkeeping.
    """

    def __init__(self, high: nn.Module, low: nn.Module, device: torch.device,
                 keep_both: bool | None = None, offload_device: torch.device = torch.device("cpu"),
                 swap_blocks: int = 0, keep_host: bool = False, video: Video = OFFICIAL_VIDEO):
        self.experts = {HIGH: high, LOW: low}
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.swap_blocks = swap_blocks
        self.keep_host = keep_host
        if swap_blocks:
            keep_both = False  # block swap exists because one expert does not fit
        self.keep_both = experts_fit(high, low, self.device, video) if keep_both is None else keep_both
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

    def agree_to_reuse(self, reuse: bool) -> bool:
        return reuse  # one process, or replicas that share no collective while sampling

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
