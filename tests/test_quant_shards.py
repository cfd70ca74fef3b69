"""The one mechanism for quantised shards: `quant.QuantizedLinear` under FSDP2 on 2 gloo ranks.

A small stack of an FP8Linear, a GGUFLinear (Q4_K) and a plain fp32 Linear, each its own FSDP
unit with the engine's policy (`parallel.fsdp.mixed_precision`). Checked on the ranks:
- each rank stores exactly its torch.chunk rows of every quantised weight as uint8 bytes (the
  one-process bytes, nothing dequantised), and its scale as a whole buffer;
- every all-gather FSDP issues moves uint8 (never an fp8 dtype), as many bytes as the stored
  rows: for the fp8 unit half of what a bf16 weight would move;
- the sharded forward equals the one-process forward bit for bit (the gathered rows are the
  stored bytes and each rule dequantises them as one process does).
"""
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fakes import random_gguf_blocks
from procs import join_gloo_group, start_gloo_ranks, wait_ranks
from torch import nn

from wan22_core.fp8 import FP8Linear, quantize_fp8
from wan22_core.quant import TYPES, GGUFLinear

IN, HIDDEN = 256, 40  # 40 rows: 20 per rank; Q4_K's 256-weight blocks fill a row


def make_stack() -> nn.Sequential:
    """The same random stack on every process (seeded): random valid Q4_K blocks."""
    g = torch.Generator().manual_seed(0)
    fp8 = FP8Linear(IN, HIDDEN, bias=True, bias_dtype=torch.float32)
    weight, scale = quantize_fp8(torch.randn(HIDDEN, IN, generator=g))
    fp8.fp8_weight.copy_(weight)
    fp8.scale_weight.copy_(scale)
    fp8.bias.data.copy_(torch.randn(HIDDEN, generator=g))
    q4 = GGUFLinear(IN, HIDDEN, "Q4_K", bias=False)
    q4.weight.data.copy_(torch.from_numpy(random_gguf_blocks("Q4_K", HIDDEN * IN // 256, seed=2)).reshape(HIDDEN, -1))
    plain = nn.Linear(IN, HIDDEN)
    nn.init.normal_(plain.weight, generator=g)
    return nn.Sequential(fp8, Widen(q4), Widen(plain))


class Widen(nn.Module):
    """x [N, HIDDEN] -> layer(x padded to IN features): lets the three layers chain."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(nn.functional.pad(x, (0, IN - x.shape[-1])))


def rank_main(rank, world, port, out):
    from torch.distributed.fsdp import fully_shard

    from wan22_core.parallel.fsdp import mixed_precision

    join_gloo_group(rank, world, port)
    gathered = []  # (dtype, bytes) of every all-gather input FSDP issues (torch 2.13: all_gather_single)
    real = dist.all_gather_single

    def recording(output, input, *args, **kwargs):
        gathered.append((str(input.dtype), input.nbytes))
        return real(output, input, *args, **kwargs)

    dist.all_gather_single = recording
    from torch.distributed.device_mesh import DeviceMesh

    stack = make_stack()
    mesh = DeviceMesh("cpu", list(range(world)))
    for unit in (stack[0], stack[1], stack[2], stack):
        fully_shard(unit, mesh=mesh, mp_policy=mixed_precision())
    local = {name: p.to_local().clone() for name, p in stack.named_parameters()}
    buffers = {name: b.clone() for name, b in stack.named_buffers()}
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_sharded = stack(x)
    torch.save(dict(local=local, buffers=buffers, gathered=gathered, out=out_sharded), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_quantised_linears_shard_and_gather_as_bytes_and_compute_as_one_process(tmp_path):
    world = 2
    _, procs = start_gloo_ranks([__file__], world, dict(out=str(tmp_path)), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    failures = wait_ranks(procs, timeout=120)
    assert not failures, "\n".join(failures)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    stack = make_stack()
    with torch.no_grad():
        expected = stack(torch.randn(3, IN, generator=torch.Generator().manual_seed(1)))
    whole = dict(stack.named_parameters())
    for name in ("0.weight", "1.layer.weight"):
        rows = whole[name].chunk(world)
        for r, result in enumerate(ranks):
            shard = result["local"][name]
            assert shard.dtype == torch.uint8 and torch.equal(shard, rows[r]), (name, r)
    for result in ranks:
        assert torch.equal(result["buffers"]["0.scale_weight"], stack[0].scale_weight)  # replicated, whole
        assert torch.equal(result["out"], expected)  # bit for bit
        # one all-gather per unit per forward: fp8 rows + fp32 bias (uint8 buffer), Q4_K rows alone
        # (uint8 already), the fp32 Linear in fp32; the root holds no parameters
        fp8_bytes = HIDDEN * IN // world + HIDDEN * 4 // world
        q4_bytes = HIDDEN * TYPES["Q4_K"].nbytes(IN) // world
        fp32_bytes = (HIDDEN * IN + HIDDEN) * 4 // world
        assert result["gathered"] == [("torch.uint8", fp8_bytes), ("torch.uint8", q4_bytes),
                                      ("torch.float32", fp32_bytes)]
        assert fp8_bytes < 0.51 * (HIDDEN * IN + HIDDEN) * 2 // world  # about half a bf16 layer's bytes


if __name__ == "__main__":
    rank_main(**json.loads(sys.argv[1]))
