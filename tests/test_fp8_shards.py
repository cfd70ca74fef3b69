"""Quantised shards (fp8, GGUF) on 2 and 4 CPU ranks (gloo) against the one-process run, and compile on the ranks.

Each rank holds its rows of every block Linear as fp8 bytes (`quant.QuantizedLinear`), FSDP2
gathers them as uint8, and each forward dequantises as the one-process `FP8Linear` does, so in
fp32 compute the latents equal `denoise` on `load_dit(..., weight_dtype=fp8)` experts up to the
reordered float sums of the parallel paths (<= 1e-5 relative; measured in the test names'
scenarios: see TOL). Three sources of fp8 rows: a full-precision file quantised per rank (the
whole tensor's scale), an fp8_scaled file kept as stored, and LoRAs merged into fp8 rows. GGUF
experts (Q8_0, and Q4_K on a model whose rows are 256 weights) go through the same seam: each
rank holds its rows as the file's block bytes and FSDP2 gathers those bytes.

The rank processes are this file executed as a script (see the bottom), as in test_parallel.py.
The compiled scenario, the worker group and torchrun run the same plan and shapes, so the
inductor cache compiles the block graph once per session.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from procs import join_gloo_group, run_gloo_worlds, start_torchrun_generate
from reference import rel_l2
from safetensors.torch import load_file

from wan22_core.checkpoints import load_dit
from wan22_core.config import TINY, SamplerSettings
from wan22_core.lora import LoraSpec, apply_loras
from wan22_core.models.transformer import WanBlock, WanModel
from wan22_core.optimize import compile_toolchain_problem
from wan22_core.parallel import ParallelPlan
from wan22_core.pipeline import denoise, make_noise
from wan22_core.placement import ExpertPair
from wan22_core.quant import QuantizedLinear
from wan22_core.tiny import COMFY_FILES, GGUF_FILES, make_tiny, tiny_config, write_tiny_lora

# Measured (fp32): 0 on the FSDP-only paths, <= 4e-7 with CFG-parallel (batch 1 vs 2 kernels),
# compiled vs eager 3e-7 (inductor reorders sums); the bound leaves > 20x margin.
TOL = 1e-5
HEADS = TINY.dit.num_heads
SETTINGS = SamplerSettings(steps=4, shift=5.0)  # 2 high-noise + 2 low-noise steps
SHAPE = (9, 48, 48)  # 27 tokens: padded on 2 and 4 ranks
K_QUANT = tiny_config(dim=256, ffn_dim=256)  # K-quant rows are whole 256-weight blocks
COMPILES = compile_toolchain_problem(torch.device("cpu")) is None
SCENARIOS = {  # degrees, plus: source (the fp8 rows' origin), compile
    2: {"ulysses+fsdp": dict(ulysses=2, fsdp=True),
        "cfg+fsdp": dict(cfg_parallel=2, fsdp=True),
        "ulysses+fsdp, fp8 file": dict(ulysses=2, fsdp=True, source="fp8 file"),
        "ulysses+fsdp, loras": dict(ulysses=2, fsdp=True, source="loras"),
        "ulysses+fsdp, gguf Q8_0": dict(ulysses=2, fsdp=True, source="gguf Q8_0"),
        "cfg+fsdp, gguf Q4_K": dict(cfg_parallel=2, fsdp=True, source="gguf Q4_K"),
        "ulysses+fsdp, gguf Q8_0, loras": dict(ulysses=2, fsdp=True, source="gguf Q8_0, loras"),
        "ring+fsdp": dict(ring=2, fsdp=True),
        **({"ulysses+fsdp, compiled": dict(ulysses=2, fsdp=True, compile=True),
            "ring+fsdp, compiled": dict(ring=2, fsdp=True, compile=True)} if COMPILES else {})},
    4: {"ulysses+fsdp": dict(ulysses=4, fsdp=True),
        "cfg+ulysses+fsdp": dict(cfg_parallel=2, ulysses=2, fsdp=True)},
}


def job_inputs():
    g = torch.Generator().manual_seed(11)
    return torch.randn(7, TINY.dit.text_dim, generator=g), torch.randn(3, TINY.dit.text_dim, generator=g), \
        make_noise(5, *SHAPE)


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory):
    """{source: (high, low, weight_dtype, {expert: [(lora file, strength)]})}: the official fp32 set
    quantised at load (with and without LoRAs), Comfy-Org's fp8_scaled files kept as stored, and
    GGUF files kept in their types."""
    root = tmp_path_factory.mktemp("fp8")
    comfy = make_tiny(root / "comfy-fp8", "comfy-fp8", TINY) / "diffusion_models"
    lora = write_tiny_lora(root / "lora.safetensors", WanModel(TINY.dit), "lightx2v", seed=2).path
    official = (str(tiny_model_dir / "high_noise_model"), str(tiny_model_dir / "low_noise_model"))
    gguf = {quant: make_tiny(root / quant, "gguf", cfg, quant=quant) / "diffusion_models"
            for quant, cfg in (("Q8_0", TINY), ("Q4_K", K_QUANT))}
    return {"quantised at load": (*official, "float8_e4m3fn", {}),
            "fp8 file": (*(str(comfy / name) for name in COMFY_FILES["comfy-fp8"][:2]), None, {}),
            "loras": (*official, "float8_e4m3fn", {"high": [(str(lora), 0.8)], "low": [(str(lora), -1.5)]}),
            **{f"gguf {quant}": (*(str(folder / name.format(quant=quant)) for name in GGUF_FILES[:2]), None, {})
               for quant, folder in gguf.items()},
            "gguf Q8_0, loras": (*(str(gguf["Q8_0"] / name.format(quant="Q8_0")) for name in GGUF_FILES[:2]), None,
                                 {"high": [(str(lora), 0.8)], "low": [(str(lora), -1.5)]})}


# A LoRA change on live ranks (the worker's update): new strengths for the same files
UPDATED_STRENGTHS = {"high": 0.3, "low": 1.2}


def updated(loras):
    return {name: [(path, UPDATED_STRENGTHS[name]) for path, _ in pairs] for name, pairs in loras.items()}


def one_process_experts(high, low, weight_dtype, loras):
    """The one-process fp8 pair: what `load_experts` holds for weight_dtype fp8_e4m3fn (or auto on an fp8 file)."""
    experts = [load_dit(path, torch.float32, weight_dtype=weight_dtype and getattr(torch, weight_dtype))
               for path in (high, low)]
    for expert, name in zip(experts, ("high", "low")):
        apply_loras(expert, [LoraSpec(path, strength) for path, strength in loras.get(name, [])])
    return experts


@pytest.fixture(scope="module")
def reference(sources):
    """{source: (latent, [fp8 high expert, fp8 low expert])} from one process."""
    out = {}
    for source, spec in sources.items():
        experts = one_process_experts(*spec)
        out[source] = (denoise(ExpertPair(*experts, torch.device("cpu")), *job_inputs(), SETTINGS), experts)
        if "gguf" in source and spec[3]:
            *files, weight_dtype, loras = spec
            out[f"{source}, updated"] = denoise(ExpertPair(*one_process_experts(*files, weight_dtype, updated(loras)),
                                                           torch.device("cpu")), *job_inputs(), SETTINGS)
    return out


@pytest.fixture(scope="module")
def runs(sources, tmp_path_factory):
    """{world size: [per-rank results]}: one launch per world size, run side by side."""
    out = {world: tmp_path_factory.mktemp(f"fp8ranks{world}") for world in SCENARIOS}
    return run_gloo_worlds(__file__, out, lambda folder: dict(sources=sources, out=str(folder)), timeout=400)


CASES = [(world, scenario) for world in SCENARIOS for scenario in SCENARIOS[world]]


@pytest.mark.parametrize("world,scenario", CASES, ids=[f"{w}ranks-{s}".replace(" ", "") for w, s in CASES])
def test_fp8_shards_give_the_one_process_fp8_latents(runs, reference, world, scenario):
    per_rank = [results[scenario]["latent"] for results in runs[world]]
    expected, _ = reference[SCENARIOS[world][scenario].get("source", "quantised at load")]
    assert rel_l2(per_rank[0], expected) <= TOL
    for rank, latent in enumerate(per_rank[1:], start=1):
        assert torch.equal(latent, per_rank[0]), f"rank {rank} differs from rank 0"


def test_loras_on_gguf_shards_run_on_the_fly_and_a_strength_change_on_live_ranks(runs, reference):
    """GGUF blocks take no merge: on the ranks, as on one GPU, their LoRA terms run as branches
    (whole factors on every rank); the rest merges into the shards. Equal to one process, and
    again after the worker's LoRA update (set_expert_loras) to other strengths."""
    scenario, source = "ulysses+fsdp, gguf Q8_0, loras", "gguf Q8_0, loras"
    assert rel_l2(reference[source][0], reference["gguf Q8_0"][0]) > 1e-2  # the LoRA changes the video
    for results in runs[2]:
        assert rel_l2(results[scenario]["updated"], reference[f"{source}, updated"]) <= TOL
        assert rel_l2(results[scenario]["updated"], results[scenario]["latent"]) > 1e-2


@pytest.mark.skipif(not COMPILES, reason="no C++ compiler for inductor on this machine")
@pytest.mark.parametrize("eager", ["ulysses+fsdp", "ring+fsdp"])
def test_compiled_ranks_equal_eager_ranks(runs, eager):
    """Each block compiled, then sharded; the ring's point-to-point sends stay outside the graph."""
    for results in runs[2]:
        assert rel_l2(results[f"{eager}, compiled"]["latent"], results[eager]["latent"]) <= TOL
        assert results[f"{eager}, compiled"]["compiled_blocks"] == 2 * TINY.dit.num_layers


HELD = [(world, scenario) for world, scenario in CASES
        if scenario == "ulysses+fsdp" or "gguf" in scenario]


@pytest.mark.parametrize("world,scenario", HELD, ids=[f"{w}ranks-{s}".replace(" ", "") for w, s in HELD])
def test_each_rank_holds_its_rows_of_the_quantised_parameters(runs, reference, world, scenario):
    """Counted on the ranks' parameters: exactly the torch.chunk rows of every parameter of the
    one-process experts (block Linears as their bytes: 1-byte fp8 or the GGUF blocks, as uint8
    rows; the rest fp32), so the ranks together hold the quantised bytes once, each about 1/P."""
    _, experts = reference[SCENARIOS[world][scenario].get("source", "quantised at load")]
    total = sum(p.nbytes for expert in experts for p in expert.parameters())
    held = []
    for rank, results in enumerate(runs[world]):
        expected = sum(p.chunk(world)[rank].nbytes if rank < len(p.chunk(world)) else 0
                       for expert in experts for p in expert.parameters())
        assert results[scenario]["parameter_bytes"] == expected
        assert results[scenario]["quantised_layers"] == [["torch.uint8", sum(
            isinstance(m, QuantizedLinear) for e in experts for m in e.modules())]]
        held.append(expected)
    assert sum(held) == total and max(held) <= total / world * 1.1


# ---------------------------------------------------------------------------------------------
# The worker group and torchrun take fp8 and compile


def test_worker_group_runs_fp8_shards_compiled_as_one_process_does(sources, reference):
    from wan22_core.parallel import Job, ModelSpec, WorkerGroup, parallel_config

    high, low, _, _ = sources["quantised at load"]
    spec = ModelSpec(high, low, weight_dtype="fp8_e4m3fn", compile=COMPILES)
    config = parallel_config("cpu:2", ulysses_degree=2, fsdp=True, num_heads=HEADS)
    group = WorkerGroup.get_or_create(spec, config)
    try:
        latent = group.run(Job(*job_inputs(), SETTINGS))
        _, experts = reference["quantised at load"]
        fp8_total = sum(p.nbytes for expert in experts for p in expert.parameters())
        assert sum(group.parameter_bytes.values()) == fp8_total
    finally:
        group.shutdown()
    assert rel_l2(latent, reference["quantised at load"][0]) <= TOL


def test_torchrun_and_one_process_take_weight_dtype_fp8_and_compile(tiny_model_dir, tmp_path):
    """`--weight-dtype fp8_e4m3fn --compile` on 2 torchrun ranks (Ulysses + FSDP) against the same
    flag in one process, eager: the same latents; without the flag one process computes others."""
    from wan22_core.cli import main

    common = ["generate", "--model-dir", str(tiny_model_dir), "--frames", "9", "--height", "48", "--width", "48",
              "--steps", "4", "--shift", "5", "--quiet"]
    fp8 = ["--weight-dtype", "fp8_e4m3fn"]
    torchrun = start_torchrun_generate(  # started first: it runs while this process makes the references
        [*common, *fp8, "--ulysses", "2", "--fsdp", *(["--compile"] if COMPILES else []),
         "--output", str(tmp_path / "two.mp4"), "--save-latents", str(tmp_path / "two.st")], cwd=tmp_path)
    for name, flags in (("one", fp8), ("dense", [])):
        assert main([*common, *flags, "--output", str(tmp_path / f"{name}.mp4"),
                     "--save-latents", str(tmp_path / f"{name}.st")]) == 0
    output = torchrun.communicate(timeout=400)[0]
    assert torchrun.returncode == 0, output
    assert "compile ignored" not in output
    two, one, dense = (load_file(tmp_path / f"{name}.st")["latents"] for name in ("two", "one", "dense"))
    assert rel_l2(two, one) <= TOL
    assert rel_l2(one, dense) > 1e-3  # the control: fp8 weights really were used (measured ~1e-2)


# ---------------------------------------------------------------------------------------------
# What each rank process runs (this file executed as a script)


def rank_main(rank, world, port, sources, out):
    from torch.distributed.tensor import DTensor

    from wan22_core.parallel.loading import load_expert_pair, local_parameter_bytes, set_expert_loras
    from wan22_core.parallel.mesh import init_groups

    join_gloo_group(rank, world, port)
    cpu, results = torch.device("cpu"), {}
    for scenario, degrees in SCENARIOS[world].items():
        degrees = dict(degrees)
        high, low, weight_dtype, loras = sources[degrees.pop("source", "quantised at load")]
        compile = degrees.pop("compile", False)
        groups = init_groups(ParallelPlan(world_size=world, num_heads=HEADS, **degrees), cpu)
        experts = load_expert_pair(high, low, groups, cpu, torch.float32,
                                   *([LoraSpec(p, s) for p, s in loras.get(name, [])] for name in ("high", "low")),
                                   weight_dtype=weight_dtype and getattr(torch, weight_dtype), compile=compile)
        layers = [m for e in experts.experts.values() for m in e.modules() if isinstance(m, QuantizedLinear)]
        results[scenario] = dict(  # bytes before sampling: FSDP keeps the head gathered once it ran
            parameter_bytes=sum(local_parameter_bytes(e) for e in experts.experts.values()),
            latent=denoise(experts, *job_inputs(), SETTINGS),
            quantised_layers=[[dtype, len(layers)] for dtype in sorted(
                {str(m.weight.to_local().dtype if isinstance(m.weight, DTensor) else m.weight.dtype) for m in layers})],
            compiled_blocks=sum(getattr(block, "_compiled_call_impl", None) is not None
                                for e in experts.experts.values() for block in e.modules()
                                if isinstance(block, WanBlock)))
        if "gguf" in scenario and loras:  # the worker's LoRA update: new strengths, nothing re-read
            for name, expert in experts.experts.items():
                set_expert_loras(expert, [LoraSpec(p, s) for p, s in updated(loras)[name]])
            results[scenario]["updated"] = denoise(experts, *job_inputs(), SETTINGS)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(**json.loads(sys.argv[1]))
