"""Block swap and expert residency: same numbers, and the bookkeeping of what lives where."""
from dataclasses import replace

import pytest
import torch

from wan22_core.config import TINY
from wan22_core.models.transformer import WanModel
from wan22_core.offload import OFFLOAD_CHOICES, BlockSwap, expert_pair_options
from wan22_core.pipeline import denoise

CFG = replace(TINY.dit, num_layers=5)


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 16, 2, 8, 8, generator=g), torch.tensor([999, 500]), torch.randn(2, 7, 32, generator=g)


@pytest.mark.parametrize("num_blocks", [0, 1, 3, 5])
def test_block_swap_gives_identical_output_and_at_most_two_resident(num_blocks):
    torch.manual_seed(0)
    model = WanModel(CFG).eval()
    with torch.no_grad():
        expected = model(*inputs())
    swap = BlockSwap(model.blocks, num_blocks, torch.device("cpu"))
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(len(swap.resident()))) for b in model.blocks]
    with torch.no_grad():
        out = model(*inputs())
        again = model(*inputs())  # the wrap-around prefetch state is clean for the next forward
    assert torch.equal(out, expected) and torch.equal(again, expected)
    assert swap.peak_resident <= min(2, num_blocks)
    # after a forward only the first swapped block stays on the device: prefetched for the next step
    assert swap.resident() == ([0] if num_blocks > 1 else [])
    for block in swap.swapped[1:]:  # the others point at their host masters again
        assert all(p.data.data_ptr() == h.data_ptr() for p, h in swap.host[block])
    for h in hooks:
        h.remove()
    swap.remove()
    assert swap.resident() == []
    with torch.no_grad():
        assert torch.equal(model(*inputs()), expected)


def test_block_swap_rejects_bad_counts():
    with pytest.raises(ValueError, match="between 0 and 5"):
        BlockSwap(WanModel(CFG).blocks, 6, torch.device("cpu"))


def small_job():
    """(positive, negative, noise, settings) of a 4-step run on two tiny experts: 3 high-noise
    steps, 1 low-noise, so a switch happens."""
    from wan22_core.config import SamplerSettings
    from wan22_core.pipeline import make_noise

    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 32, generator=g), torch.randn(3, 32, generator=g), make_noise(0, 5, 32, 32), \
        SamplerSettings(steps=4)


def test_expert_pair_with_block_swap_gives_the_same_latents():
    from wan22_core.placement import ExpertPair
    from wan22_core.tiny import seeded

    experts = [seeded(i, lambda: WanModel(CFG)) for i in (1, 2)]
    pos, neg, noise, settings = small_job()
    plain = denoise(ExpertPair(*experts, torch.device("cpu")), pos, neg, noise, settings)
    pair = ExpertPair(*experts, torch.device("cpu"), swap_blocks=3)
    swapped = denoise(pair, pos, neg, noise, settings)
    assert torch.equal(plain, swapped)
    assert pair.keep_both is False and pair.active == "low" and pair._swap.peak_resident <= 2


def test_expert_pair_places_everything_but_the_swapped_blocks_on_the_device():
    """Bookkeeping with a stand-in device (meta): what lands where when an expert is activated."""
    from wan22_core.placement import ExpertPair

    high, low = WanModel(CFG), WanModel(CFG)
    pair = ExpertPair(high, low, torch.device("meta"), swap_blocks=2)
    pair.get("high")
    swapped = set(pair._swap.swapped)
    for name, param in high.named_parameters():
        block = int(name.split(".")[1]) if name.startswith("blocks.") else None
        on_host = block is not None and high.blocks[block] in swapped
        assert param.device.type == ("cpu" if on_host else "meta"), name
    assert all(p.device.type == "cpu" for p in low.parameters())  # the idle expert stays offloaded


# ---------------------------------------------------------------------------------------------
# expert_pair_options: the one translation of offload / swap_blocks / compile (CLI and loader node)


@pytest.mark.parametrize("offload, swap_blocks, compile, expected", [
    ("auto", 0, False, dict(keep_both=None, swap_blocks=0)),  # ExpertPair decides from the card (experts_fit)
    ("none", 0, True, dict(keep_both=True, swap_blocks=0)),
    ("swap_experts", 0, True, dict(keep_both=False, swap_blocks=0)),
    ("block_swap", 1, False, dict(keep_both=False, swap_blocks=1)),
    ("block_swap", 5, False, dict(keep_both=False, swap_blocks=5)),
])
def test_expert_pair_options_map_each_mode(offload, swap_blocks, compile, expected):
    assert expert_pair_options(offload, swap_blocks, compile, 5) == expected
    assert offload in OFFLOAD_CHOICES


@pytest.mark.parametrize("offload, swap_blocks, compile, message", [
    ("disk", 0, False, "offload must be one of auto, none, swap_experts, block_swap; got 'disk'"),
    ("block_swap", 6, False, "swap_blocks must be an integer between 0 and 5 (the blocks of one expert), got 6"),
    ("block_swap", -1, False, "swap_blocks must be an integer between 0 and 5 (the blocks of one expert), got -1"),
    ("block_swap", True, False, "swap_blocks must be an integer between 0 and 5 (the blocks of one expert), got True"),
    ("auto", 2, False, "swap_blocks=2 needs offload='block_swap' (got offload='auto'); choose block_swap or set "
                       "swap_blocks to 0"),
    # the drift case: block swap with nothing to swap is refused, not silently run as swap_experts
    ("block_swap", 0, False, "offload='block_swap' needs swap_blocks between 1 and 5 (blocks of the active expert "
                             "kept in CPU memory), got 0; set swap_blocks, or choose offload='swap_experts' to move "
                             "whole experts only"),
    ("block_swap", 2, True, "compile and offload='block_swap' do not combine (block swap moves the weights from "
                            "hooks around each block, which a compiled block would trace); turn compile off or "
                            "choose another offload"),
])
def test_expert_pair_options_refuse_with_one_message_naming_the_fix(offload, swap_blocks, compile, message):
    with pytest.raises(ValueError) as err:
        expert_pair_options(offload, swap_blocks, compile, 5)
    assert str(err.value) == message



def test_a_switch_drops_the_device_copy_and_keeps_the_host_weights():
    """keep_host (the CLI and the node set it for a GPU; here on the CPU, where it makes real copies):
    the placed expert computes on copies, and offloading points its tensors back at the host
    data they left, the same storage (no copy back), with whatever changed there while it was
    idle (the node re-merges LoRAs between runs). The latents equal those without it."""
    from wan22_core.placement import ExpertPair
    from wan22_core.tiny import seeded

    experts = [seeded(i, lambda: WanModel(CFG)) for i in (1, 2)]
    pos, neg, noise, settings = small_job()
    plain = denoise(ExpertPair(*experts, torch.device("cpu"), keep_both=False), pos, neg, noise, settings)
    high = experts[0]
    tensors = lambda m: [*m.named_parameters(), *m.named_buffers()]  # noqa: E731
    host = {name: t.data.data_ptr() for name, t in tensors(high)}
    pair = ExpertPair(*experts, torch.device("cpu"), keep_both=False, keep_host=True)
    pair.get("high")
    assert all(t.data.data_ptr() != host[name] for name, t in tensors(high))  # computing on copies
    assert torch.equal(denoise(pair, pos, neg, noise, settings), plain)  # switched to "low" on the way
    assert pair.active == "low" and list(pair._host) == [id(experts[1])]
    assert all(t.data.data_ptr() == host[name] for name, t in tensors(high))  # back on its own storage
    weight = high.blocks[0].ffn[0].weight
    weight.data.add_(1.0)  # changed on the host while idle
    changed = weight.detach().clone()
    pair.get("high")  # the copy it computes on has the change
    assert torch.equal(weight, changed) and weight.data.data_ptr() != host["blocks.0.ffn.0.weight"]
    pair.offload_all()
    assert pair._host == {} and weight.data.data_ptr() == host["blocks.0.ffn.0.weight"]


def test_keep_host_with_both_experts_resident_places_each_once():
    """keep_both + keep_host: going back to an expert that is still placed copies nothing (a second
    copy would hold it twice on the GPU), and offload_all puts both back on their own storage."""
    from wan22_core.placement import ExpertPair
    from wan22_core.tiny import seeded

    experts = [seeded(i, lambda: WanModel(CFG)) for i in (1, 2)]
    host = [{id(t): t.data.data_ptr() for t in [*e.parameters(), *e.buffers()]} for e in experts]
    pair = ExpertPair(*experts, torch.device("cpu"), keep_both=True, keep_host=True)
    pair.get("high")
    placed = {id(t): t.data.data_ptr() for t in experts[0].parameters()}
    pair.get("low")
    pair.get("high")
    assert {id(t): t.data.data_ptr() for t in experts[0].parameters()} == placed  # not copied again
    kept = {id(t): h.data_ptr() for t, h in pair._host[id(experts[0])]}
    assert kept == host[0]  # the original host storage, not a device copy
    pair.offload_all()
    for e, ptrs in zip(experts, host):
        assert {id(t): t.data.data_ptr() for t in [*e.parameters(), *e.buffers()]} == ptrs


def test_one_process_holders_keep_host_copies_only_off_the_offload_device():
    from wan22_core.placement import keeps_host_copies

    assert keeps_host_copies(torch.device("cuda", 0)) and keeps_host_copies("cuda", "cpu")
    assert not keeps_host_copies(torch.device("cpu")) and not keeps_host_copies("cpu", torch.device("cpu"))


def test_both_experts_stay_exactly_when_the_memory_model_says_they_fit(monkeypatch):
    """The one "fits" rule (placement.experts_fit): both experts' bytes + the memory model's
    activations for the video + CUDA_OVERHEAD against the card; auto placement asks it. Real-size
    A14B on the meta device, a fake card of any size."""
    import types

    from wan22_core.config import A14B, FRAMES, HEIGHT, WIDTH
    from wan22_core.memory import CUDA_OVERHEAD, GIB, estimate_peak_bytes
    from wan22_core.placement import ExpertPair, experts_fit

    with torch.device("meta"):
        high, low = (WanModel(A14B.dit).to(torch.bfloat16) for _ in range(2))
    card = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=card["bytes"]))
    cuda = torch.device("cuda", 0)
    # the memory model's own total with both experts resident, counted from its parameter formula
    need = estimate_peak_bytes(A14B.dit, FRAMES, HEIGHT, WIDTH, offload="none")["total"] + CUDA_OVERHEAD
    assert 69 * GIB < need < 70 * GIB  # 53.2 GiB of weights, 14.5 of activations, 1.5 of overhead
    for size, fits in ((need, True), (need - 1, False), (80 * 10**9, True), (48 * GIB, False)):
        card["bytes"] = size
        assert experts_fit(high, low, cuda) is fits, size
        assert ExpertPair(high, low, cuda).keep_both is fits  # auto placement asks the same rule
    card["bytes"] = need
    small = (FRAMES, 480, 832)  # a smaller video leaves room: the rule reads the size
    assert not experts_fit(high, low, cuda, (FRAMES * 2 - 1, HEIGHT, WIDTH)) and experts_fit(high, low, cuda, small)
    assert experts_fit(high, low, torch.device("cpu"))  # host memory: nothing to gain by moving
