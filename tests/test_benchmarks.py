"""The GPU benchmark scripts, dry-run on the CPU: a device session gets one short try, so the
scripts must not reach it broken. Each runs its real code path at tiny sizes and writes its JSON.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BENCH


def run(script: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--dry-run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_bench_gpu_dry_run_measures_the_engine_layout(tmp_path):
    run("bench_gpu.py", "--only", "ours,attention,fp8,swap,overhead", "--repeats", "1", "--warmup", "1",
        "--json", str(tmp_path / "gpu.json"), cwd=tmp_path)
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["dry_run"] and data["stream"] == "contiguous"
    configs = {r["config"] for r in data["results"] if r["ms_per_block"]}
    assert {"ours eager", "ours block swap (2/2 streamed)"} <= configs, configs
    assert any(c.startswith("ours fp8") for c in configs), configs
    assert data["projection"] and all(p["total_s"] > 0 for p in data["projection"])
    kernels = data["attention_kernel"]  # the attention kernel alone, per installed backend and shape
    assert {k["shape"] for k in kernels} == {"720p b2", "480p b2"}, kernels
    sizes = {r["shape"]: (r["tokens"], r["batch"]) for r in data["results"]}
    for k in kernels:
        tokens, batch = sizes[k["shape"]]
        flops = batch * 4 * tokens**2 * data["cfg"]["dim"]  # QK^T and PV: 2 matmuls of L^2 d multiply-adds
        assert k["ms"] > 0 and k["tflops"] == pytest.approx(flops / (k["ms"] * 1e-3) / 1e12, rel=1e-9), k


def test_bench_small_card_dry_run_samples_with_block_swap_and_decodes(tmp_path):
    out = run("bench_small_card.py", "--switch-timing", "--json", str(tmp_path / "card.json"), cwd=tmp_path)
    data = json.loads((tmp_path / "card.json").read_text())
    assert data["swap_blocks"] == 2 and len(data["step_s"]) == data["steps"] == 3
    assert data["finite"] and data["video_shape"] == [data["frames"], data["height"], data["width"], 3]
    assert "dry run: OK" in out and data["switch"]["gb"] > 0


def test_bench_rank_dry_run_builds_one_rank_of_a_two_gpu_fp8_plan_and_times_its_steps(tmp_path):
    """Rank 0 of 2 (Ulysses + FSDP, fp8) through the ranks' own loader, the other rank a fake
    process group. Eager only here: compiling the tiny block costs a minute of CI, and the
    compiled rank path is checked on real ranks (test_fp8_shards.py); the GPU run compiles."""
    out = run("bench_rank.py", "--no-compile", "--steps", "2", "--json", str(tmp_path / "rank.json"), cwd=tmp_path)
    data = json.loads((tmp_path / "rank.json").read_text())
    assert data["plan"] == {"gpus": 2, "ulysses": 2, "cfg_parallel": 1, "fsdp": True} and data["weights"] == "fp8"
    assert len(data["eager_step_s"]) == 2 and not data["out_of_memory"] and data["predicted_gib"] > 0
    assert "compiled_step_s" not in data and "rank 0 of 2" in out


def test_bench_small_card_adds_two_blocks_when_the_cap_is_hit(monkeypatch, tmp_path):
    """An out-of-memory error under the cap costs one retry with 2 more swapped blocks, not the run."""
    import torch

    import bench_small_card

    real, calls = bench_small_card.denoise, []

    def denoise(experts, *args, **kwargs):
        calls.append(experts.swap_blocks)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(experts, *args, **kwargs)

    monkeypatch.setattr(bench_small_card, "denoise", denoise)
    result = bench_small_card.run(bench_small_card.parser().parse_args(["--dry-run", "--steps", "2", "--text-tokens", "8"]))
    assert calls == [2, 4] and result["out_of_memory_at_swap"] == [2] and result["swap_blocks"] == 4
    assert result["finite"] and len(result["step_s"]) == 2



def test_bench_group_dry_run_compares_the_worker_group_with_both_clis(tmp_path):
    """The device script of issue 16 (device_run.sh group) on one CPU rank: model set, text encode,
    the group (start, steps, decode), the one-process CLI and their stage times. The torchrun
    phase (the same `run_cli` with torchrun in front) is left to the time budget here: the torchrun
    CLI itself is test_vae_parallel's."""
    out = run("bench_group.py", "--steps", "2", "--budget-s", "0", "--workdir", str(tmp_path / "models"), "--json",
              str(tmp_path / "group.json"), cwd=tmp_path)
    data = json.loads((tmp_path / "group.json").read_text())
    group, cli = data["group"], data["cli"]
    assert "dry run: OK" in out and data["dry_run"] and data["text_encode_s"] > 0
    assert data["skipped"] == ["torchrun (time budget)"] and "torchrun" not in data
    assert group["ranks"] == 1 and group["finite"] and group["frames"] == [5, 32, 48, 3]
    assert set(group["stages"]) == {"start", "load", "sampling", "decode"} and len(group["step_wall_s"]) == 2
    assert {"text encoder", "load experts", "denoise", "vae decode", "write mp4"} <= set(cli["stages"])
    comparison = data["comparison"]
    assert comparison["group_rank_s_per_step"] == pytest.approx(group["stages"]["sampling"] / 2)
    assert comparison["cli_s_per_step"] == pytest.approx(cli["stages"]["denoise"] / 2)


def test_bench_whole_run_projects_every_stage_with_the_engines_split():
    """The projection's arithmetic on its own inputs (no measurement): P = 1 is one GPU's steps plus
    the other stages; each row's split is the engine's and uses all its GPUs; totals add up."""
    import bench_whole_run as w

    for size in w.SIZES:
        rows = w.rows(size, write_s=1.0)
        assert [r["gpus"] for r in rows] == list(w.GPU_COUNTS)
        for row in rows:
            cfg, ulysses, ring = (int(n) for n in row["split"].split("x"))
            assert cfg * ulysses * ring == row["gpus"] and (cfg, ulysses, ring) == w.auto_split(row["gpus"])
            for link in w.LINKS:
                stage = row[link]
                assert stage["total"] == pytest.approx(row["load"] + stage["sampling"] + stage["decode"] + 1.0)
        one = rows[0][next(iter(w.LINKS))]
        assert one["sampling"] == pytest.approx(w.STEPS * w.step_seconds(size, 1, 1, 1, next(iter(w.LINKS))))
        assert rows[-1][next(iter(w.LINKS))]["sampling"] < one["sampling"] / 8  # 16 GPUs on NVLink-class links


def test_bench_gguf_dry_run_dequantises_and_compiles(tmp_path):
    """BF16 (bf16 output is a view: no work to time) and Q4_K, eager and compiled; one thread, as
    a busy 2-core box times steadier that way. Every type's parity is in test_gguf_dequant."""
    run("bench_gguf.py", "--types", "BF16,Q4_K", "--compile", "--threads", "1", "--json", str(tmp_path / "gguf.json"),
        cwd=tmp_path)
    data = json.loads((tmp_path / "gguf.json").read_text())
    assert data["dry_run"] and not data["errors"], data["errors"]
    rows = {r["type"]: r for r in data["dequant"]}
    assert list(rows) == ["BF16", "Q4_K"] and rows["BF16"]["ours_bfloat16_gbps"] is None
    for row in rows.values():
        assert row["max_diff_vs_numpy"] == 0 and row["ours_float32_gbps"] > 0 and row["numpy_float32_gbps"] > 0
        assert row["compiled_max_diff_vs_eager"] == 0 and row["compile_s"] > 0 and row["compiled_bfloat16_gbps"] > 0
    assert rows["Q4_K"]["ours_bfloat16_gbps"] > 0
    assert {r["type"]: r["same_output"] for r in data["linear"]} == {"Q8_0": True, "Q4_K": True}


def test_bench_gguf_dry_run_times_a_block_in_bf16_q8_0_and_q4_k_in_one_run(tmp_path):
    """The GPU section as device_run.sh runs it (seconds per 720p block, Q8_0 and Q4_K against bf16,
    eager and compiled) on a tiny block: every configuration timed, the GGUF blocks equal to bf16
    blocks holding their dequantised weights, the compiled ones to eager within bf16 fusion ulps."""
    run("bench_gguf.py", "--types", "Q8_0", "--block", "--compile", "--threads", "1", "--json",
        str(tmp_path / "gguf.json"), cwd=tmp_path)
    blocks = json.loads((tmp_path / "gguf.json").read_text())["block"]
    compiled = {r["config"]: r for r in blocks if r["compiled"]}
    assert list(compiled) == ["bf16", "Q8_0", "Q4_K"]
    # bf16 blocks: inductor's fusions round differently; measured 2.5e-4 for all three
    assert all(r["compile_s"] >= 0 and r["rel_l2_vs_eager"] <= 2e-3 for r in compiled.values()), compiled
    rows = {r["config"]: r for r in blocks if not r["compiled"]}
    assert list(rows) == ["bf16", "Q8_0", "Q4_K"] and all(r["s_per_block"] > 0 for r in rows.values())
    assert rows["bf16"]["over_bf16"] == 1 and rows["Q8_0"]["max_diff_vs_dequantised"] == 0
    assert rows["Q4_K"]["max_diff_vs_dequantised"] == 0
    dense = rows["bf16"]["weight_bytes"]
    assert rows["Q4_K"]["weight_bytes"] < rows["Q8_0"]["weight_bytes"] < dense  # 4.5 and 8.5 bits vs 16
