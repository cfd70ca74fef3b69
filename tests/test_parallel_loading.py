"""Shard-aware expert loading (`checkpoints.DitRowReader`) gives exactly the single-process
weights: the rows every rank reads, put back together, equal `load_dit` bit for bit in every
layout and dtype, scaled fp8 included (a multi-GPU run must compute what one GPU computes)."""
import math
from pathlib import Path

import pytest
import torch
from procs import start_gloo_ranks, wait_ranks
from safetensors.torch import load_file, save_file

from wan22_core.checkpoints import DIT, CheckpointError, DitRowReader, load_dit
from wan22_core.config import TINY
from wan22_core.models.text_encoder import SCALED_FP8_MARKER
from wan22_core.models.transformer import WanModel
from wan22_core.tiny import COMFY_FILES, make_tiny

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """{layout: high-noise expert path} for the official (fp32, sharded folder), comfy (fp16) and
    comfy-fp8 (scaled fp8 block Linears, fp16 rest) tiny sets."""
    root = tmp_path_factory.mktemp("experts")
    return {"official": make_tiny(root / "official", "official", TINY) / "high_noise_model",
            "comfy": make_tiny(root / "comfy", "comfy", TINY) / "diffusion_models" / COMFY_FILES["comfy"][0],
            "comfy-fp8": make_tiny(root / "fp8", "comfy-fp8", TINY) / "diffusion_models" / COMFY_FILES["comfy-fp8"][0]}


def rank_rows(reader, name, rows, dtype, world):
    """The rows of `name` each of `world` FSDP ranks reads (torch.chunk layout), in rank order."""
    per_rank = math.ceil(rows / world)
    starts = [r * per_rank for r in range(world)]
    return [reader.rows(name, s, min(s + per_rank, rows), dtype) for s in starts if s < rows]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", ["official", "comfy", "comfy-fp8"])
def test_rank_rows_put_together_equal_the_single_process_weights(experts, layout, dtype):
    path = experts[layout]
    expected = load_dit(path, dtype, weight_dtype=dtype).state_dict()
    with torch.device("meta"):
        model = WanModel(TINY.dit)
    fp8_stored = 0
    with DitRowReader(path) as reader:
        reader.check_names(name for name, _ in model.named_parameters())
        for name, param in model.named_parameters():
            fp8_stored += reader.entry(name).dtype == torch.float8_e4m3fn
            for world in (2, 3):
                pieces = rank_rows(reader, name, param.shape[0], dtype, world)
                assert all(p.dtype == dtype for p in pieces), name
                got = torch.cat(pieces)
                mismatched = (got != expected[name]).sum().item()
                assert mismatched == 0, (f"{name} with {world} ranks: {mismatched} of {got.numel()} values "
                                         f"differ from load_dit in {dtype}")
    # the fp8 file really has fp8 weights to dequantise (else this test would check nothing new)
    assert (fp8_stored > 0) == (layout == "comfy-fp8")


def test_unscaled_fp8_rows_equal_the_single_process_weights(experts, tmp_path):
    """fp8 weights without a scale (scale 1) are converted as load_dit converts them."""
    source = load_file(str(experts["comfy-fp8"]))
    unscaled = tmp_path / "unscaled_fp8.safetensors"
    save_file({k: v for k, v in source.items() if not k.endswith(".scale_weight") and k != SCALED_FP8_MARKER},
              str(unscaled), metadata={"num_heads": str(TINY.dit.num_heads)})
    expected = load_dit(unscaled, torch.bfloat16, weight_dtype=torch.bfloat16).state_dict()
    with DitRowReader(unscaled) as reader:
        for name, value in expected.items():
            got = torch.cat(rank_rows(reader, name, value.shape[0], torch.bfloat16, 2))
            assert torch.equal(got, value), name


def test_a_missing_tensor_is_named_with_the_single_process_message(experts, tmp_path):
    source = load_file(str(experts["comfy"]))
    del source["blocks.0.self_attn.q.bias"]
    damaged = tmp_path / "no_bias.safetensors"
    save_file(source, str(damaged), metadata={"num_heads": str(TINY.dit.num_heads)})
    with torch.device("meta"):
        model = WanModel(TINY.dit)
    with DitRowReader(damaged) as reader, pytest.raises(
            CheckpointError, match=rf"no_bias.safetensors is missing 1 tensors of a {DIT} \(e.g. "
                                   r"blocks.0.self_attn.q.bias\); the file is incomplete or a different model size"):
        reader.check_names(name for name, _ in model.named_parameters())


def test_a_file_cut_short_after_opening_fails_with_the_truncation_message(experts, tmp_path):
    path = tmp_path / "expert.safetensors"
    path.write_bytes(experts["comfy"].read_bytes())
    with DitRowReader(path) as reader:
        name = "head.head.weight"  # the tensors are in name order; this one ends near the file's end
        entry = reader.entry(name)
        with open(path, "r+b") as f:
            f.truncate(entry.start + entry.nbytes // 2)
        with pytest.raises(CheckpointError, match=rf"ended inside tensor '{name}'; the file is truncated, "
                                                  "download it again"):
            reader.rows(name, 0, entry.shape[0], torch.float16)


RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from procs import join_gloo_group
from torch.distributed.tensor import DTensor
from wan22_core.config import TINY
from wan22_core.parallel import ParallelPlan
from wan22_core.parallel.loading import load_expert
from wan22_core.parallel.mesh import init_groups

args = json.loads(sys.argv[1])
rank, world = args["rank"], args["world"]
join_gloo_group(rank, world, args["port"])
cpu, shards = torch.device("cpu"), {}
groups = init_groups(ParallelPlan(world_size=world, num_heads=TINY.dit.num_heads, fsdp=True), cpu)
for case, (path, dtype, weight_dtype) in args["cases"].items():
    dtype, weight_dtype = getattr(torch, dtype), weight_dtype and getattr(torch, weight_dtype)
    model = load_expert(path, groups, cpu, dtype, weight_dtype=weight_dtype)
    shards[case] = {n: p.to_local().clone() for n, p in model.named_parameters() if isinstance(p, DTensor)}
    shards[case].update({n: b.clone() for n, b in model.named_buffers()})
torch.save(shards, f"{args['out']}/rank{rank}.pt")
dist.destroy_process_group()
"""
CASES = {  # name: (layout, compute dtype, weight_dtype): what load_dit holds for these arguments
    "fp8 file dequantised to bf16": ("comfy-fp8", "bfloat16", "bfloat16"),
    "fp8 file dequantised to fp16": ("comfy-fp8", "float16", "float16"),
    "fp8 file kept fp8": ("comfy-fp8", "bfloat16", None),
    "fp16 file quantised to fp8": ("comfy", "float32", "float8_e4m3fn"),
}


def test_fsdp_ranks_hold_what_one_process_holds_for_each_weight_dtype(experts, tmp_path):
    """Two gloo ranks load with FSDP (`load_expert`); their shards, put together, are `load_dit`'s
    parameters bit for bit, and every rank's buffers (fp8 scales) equal its: an fp8 file
    dequantised into bf16 / fp16, an fp8 file kept fp8 (its bytes as stored: uint8 rows and the
    file's scales), and an fp16 file quantised to fp8 per rank (the scale of the whole tensor,
    from one all-reduce of the rows' amax)."""
    import subprocess

    world = 2
    cases = {case: (str(experts[layout]), dtype, weight_dtype) for case, (layout, dtype, weight_dtype) in CASES.items()}
    store, procs = start_gloo_ranks(["-c", RANK_SCRIPT], world, dict(cases=cases, out=str(tmp_path)),
                                    cwd=Path(__file__).parent,  # `-c` puts the working folder on sys.path: procs
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failures = wait_ranks(procs, timeout=240)
    assert not failures, "\n".join(failures)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case, (path, dtype, weight_dtype) in cases.items():
        expected = load_dit(path, getattr(torch, dtype), weight_dtype=weight_dtype and getattr(torch, weight_dtype))
        fp8_layers = 0
        for name, value in expected.named_parameters():
            got = torch.cat([ranks[case][name] for ranks in per_rank])
            assert got.dtype == value.dtype and torch.equal(got, value), f"{case}: {name}"
            fp8_layers += value.dtype == torch.uint8
        for name, value in expected.named_buffers():
            assert all(torch.equal(ranks[case][name], value) for ranks in per_rank), f"{case}: {name}"
        assert fp8_layers == (0 if weight_dtype in ("bfloat16", "float16") else 10 * TINY.dit.num_layers), case


