"""The worker group on one CUDA rank against the one-process CLI: real-size A14B at 480p.

    python benchmarks/bench_group.py --json out.json             # a CUDA machine, about 6 minutes
    python benchmarks/bench_group.py --dry-run --json out.json   # the same code paths on the CPU, tiny sizes

The device check of issue 16: does the worker group (what the multi-GPU node drives) cost
anything over one process on the same GPU? Phases, in order (a time budget skips the optional
tail with a note):
1. A random model set in ComfyUI's folder layout under --workdir: one real-size A14B expert in
   bf16 that both expert names point to (a symlink: half the disk, 28.6 GB), the UMT5-XXL
   encoder at real size (random, with a small SentencePiece model) and the VAE.
2. The group with gpus "0" (one NCCL rank; FSDP over one rank holds both experts whole, as one
   process does): the prompt encoded in this process first (what Wan22TextEncode does), the
   group's start, --steps steps at 480p x 81 frames, then its row-parallel decode of the result.
3. The one-process CLI on the same files (`python -m wan22_core generate`, a subprocess), its
   stage lines read back.
4. The torchrun CLI on one GPU (`--fsdp`): the text encode on rank 0's CPU overlapped with the
   load, against phase 3's serial encode + load.
5. With more GPUs: the group on P = 2, 4, 8 of them (sampling and decode).
Printed and in the JSON: seconds per step of the group (its rank's own sampling time, and the
controller's wall time) against the CLI's (the target: within 3%), peak GPU memory of each,
the decode and text encode times.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from wan22_core.runtime import default_cuda_allocator  # noqa: E402

default_cuda_allocator()  # as the CLI does, for this process's own allocations

from safetensors.torch import save_file  # noqa: E402

from wan22_core.checkpoints import ModelFiles, expert_config, load_vae  # noqa: E402
from wan22_core.checkpoints.layouts import COMFY_DIRS, NUM_HEADS_KEY  # noqa: E402
from wan22_core.cli.stages import encode_prompt  # noqa: E402
from wan22_core.config import A14B, TINY, ModelConfig, SamplerSettings  # noqa: E402
from wan22_core.memory import GIB  # noqa: E402
from wan22_core.models.text_encoder import SPIECE_KEY, build_umt5  # noqa: E402
from wan22_core.models.transformer import WanModel  # noqa: E402
from wan22_core.models.vae import WanVAE, denormalize_latent  # noqa: E402
from wan22_core.parallel import Job, ModelSpec, WorkerGroup, parallel_config  # noqa: E402
from wan22_core.pipeline import make_noise  # noqa: E402
from wan22_core.tiny import train_tiny_sentencepiece  # noqa: E402
from bench_gpu import machine  # noqa: E402  (this folder)
from bench_small_card import random_weights  # noqa: E402

PROMPT = "A red fox trots through fresh snow at sunrise, cinematic tracking shot"
STAGE_LINE = re.compile(r"^  (text encoder|load experts|wait for text|denoise|vae decode|write mp4|peak memory|total)"
                        r"\s+([\d.]+) (s|GiB)", re.M)
HIGH, LOW = "wan2.2_t2v_high_noise_14B_bf16.safetensors", "wan2.2_t2v_low_noise_14B_bf16.safetensors"


def write_model_set(root: Path, cfg: ModelConfig, device: torch.device) -> ModelFiles:
    """Random weights in ComfyUI's folders (made once per --workdir; a finished set is reused)."""
    done = root / "complete"
    if not done.exists():
        folders = {key: root / sub for key, sub in COMFY_DIRS.items()}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            expert, encoder = WanModel(cfg.dit).to(torch.bfloat16), build_umt5(cfg.text).to(torch.bfloat16)
        weights = random_weights(expert, device).state_dict()
        save_file(weights, str(folders["experts"] / HIGH), metadata={"format": "pt", NUM_HEADS_KEY: str(cfg.dit.num_heads)})
        del weights
        (folders["experts"] / LOW).unlink(missing_ok=True)
        (folders["experts"] / LOW).symlink_to(HIGH)  # both slots, one file
        weights = {k: v for k, v in random_weights(encoder, device).state_dict().items()
                   if k != "encoder.embed_tokens.weight"}  # tied to shared.weight; files store it once
        weights[SPIECE_KEY] = torch.frombuffer(bytearray(train_tiny_sentencepiece()), dtype=torch.uint8)
        save_file(weights, str(folders["text_encoder"] / "umt5_xxl_bf16.safetensors"), metadata={"format": "pt"})
        del weights
        save_file(WanVAE(cfg.vae).state_dict(), str(folders["vae"] / "wan_2.1_vae.safetensors"), metadata={"format": "pt"})
        done.touch()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the random numbers were drawn there: give the ranks the memory back
    return ModelFiles.from_model_dir(root)


def run_group(files: ModelFiles, gpus: str, video: tuple[int, int, int], steps: int, embeds) -> dict:
    """The worker group's start, `steps` steps and its decode, with the rank's and the controller's seconds."""
    config = parallel_config(gpus, 0, fsdp=True, num_heads=expert_config(files.high_noise).num_heads)
    started = time.perf_counter()
    group = WorkerGroup.get_or_create(ModelSpec(files.high_noise, files.low_noise), config)
    marks = [time.perf_counter()]
    try:
        latent = group.run(Job(embeds.positive, embeds.negative, make_noise(0, *video), SamplerSettings(steps=steps)),
                           on_step=lambda info: marks.append(time.perf_counter()))
        sampled = time.perf_counter()
        vae = load_vae(files.vae)  # the node's VAE (this process, CPU): the ranks read its file
        frames = group.decode(vae, denormalize_latent(latent[None]))
        out = dict(gpus=gpus, ranks=config.plan.world_size, start_s=marks[0] - started,
                   step_wall_s=[b - a for a, b in zip(marks, marks[1:])], sampling_wall_s=sampled - marks[0],
                   decode_wall_s=time.perf_counter() - sampled, stages=dict(group.stage_seconds),
                   peak_gib={rank: b / GIB for rank, b in group.peak_bytes.items()}, frames=list(frames.shape),
                   finite=bool(torch.isfinite(latent).all()))
    finally:
        group.shutdown()
    print(f"# group {gpus}: {group.stage_line()}", flush=True)
    return out


def run_cli(files_root: Path, video: tuple[int, int, int], steps: int, device: str, out: Path,
            torchrun: bool = False) -> dict:
    """`generate` as a user runs it (one process, or torchrun on one rank with --fsdp); its stage lines."""
    frames, height, width = video
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
                if torchrun else [sys.executable])
    command = [*launcher, "-m", "wan22_core", "generate", "--model-dir", str(files_root), "--frames", str(frames),
               "--height", str(height), "--width", str(width), "--steps", str(steps), "--device", device,
               "--prompt", PROMPT, "--output", str(out), "--overwrite", "--quiet", *(["--fsdp"] if torchrun else [])]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    print(run.stderr[-3000:], flush=True)
    if run.returncode:
        raise SystemExit(f"generate failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    stages = {name: float(value) for name, value, _ in STAGE_LINE.findall(run.stderr)}
    return dict(stages=stages, wall_s=time.perf_counter() - started, torchrun=torchrun)


def compare(group: dict, cli: dict, steps: int) -> dict:
    """Seconds per step (the same steps, the first included in both) and the group's overhead."""
    rank = group["stages"]["sampling"] / steps
    wall = group["sampling_wall_s"] / steps
    one = cli["stages"]["denoise"] / steps
    return dict(cli_s_per_step=one, group_rank_s_per_step=rank, group_wall_s_per_step=wall,
                overhead_rank=rank / one - 1, overhead_wall=wall / one - 1)


def run(args, save=lambda result: None) -> dict:
    """All phases; `save(result)` after each, so a run stopped at its time limit keeps what it measured."""
    cuda = not args.dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --dry-run to check the code paths on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    cfg = A14B if cuda else TINY
    video = (81, 480, 832) if cuda else (5, 32, 48)
    deadline = time.perf_counter() + args.budget_s
    result = dict(machine=machine(device), steps=args.steps, video=video, dry_run=not cuda, skipped=[])
    print(f"# {result['machine']}", flush=True)

    t0 = time.perf_counter()
    root = Path(args.workdir)
    files = write_model_set(root, cfg, device)
    result["write_model_set_s"] = time.perf_counter() - t0
    print(f"# model set in {root} ({result['write_model_set_s']:.0f} s)", flush=True)
    save(result)

    t0 = time.perf_counter()
    embeds = encode_prompt(files, PROMPT, None)  # on the CPU, as Wan22TextEncode (device cpu) and the CLI do
    result["text_encode_s"] = time.perf_counter() - t0
    gpus = "0" if cuda else "cpu:1"
    result["group"] = run_group(files, gpus, video, args.steps, embeds)
    save(result)
    result["cli"] = run_cli(root, video, args.steps, "cuda" if cuda else "cpu", root / "one.mp4")
    result["comparison"] = compare(result["group"], result["cli"], args.steps)
    c = result["comparison"]
    print(f"# s/step: one process {c['cli_s_per_step']:.2f}, group {c['group_rank_s_per_step']:.2f} on its rank "
          f"({c['overhead_rank']:+.1%}), {c['group_wall_s_per_step']:.2f} seen by the controller "
          f"({c['overhead_wall']:+.1%})", flush=True)
    save(result)

    if time.perf_counter() < deadline - args.phase_s:
        result["torchrun"] = run_cli(root, video, args.steps, "cuda" if cuda else "cpu", root / "one_rank.mp4",
                                     torchrun=True)
        save(result)
    else:
        result["skipped"].append("torchrun (time budget)")
    count = torch.cuda.device_count() if cuda else 0
    result["scaling"] = []
    for ranks in (2, 4, 8):
        if ranks > count:
            break
        if time.perf_counter() > deadline - args.phase_s:
            result["skipped"].append(f"group on {ranks} GPUs (time budget)")
            continue
        result["scaling"].append(run_group(files, ",".join(map(str, range(ranks))), video, args.steps, embeds))
        save(result)
    print("# dry run: OK" if not cuda else "# done", flush=True)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="denoising steps in each run (default 3)")
    p.add_argument("--workdir", default="/tmp/wan22-bench-group", help="where the random model set is written")
    p.add_argument("--budget-s", type=float, default=540, help="optional phases start only inside this budget")
    p.add_argument("--phase-s", type=float, default=150, help="time one optional phase may need")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the code paths")
    p.add_argument("--json", help="write the results here")
    return p


def main() -> None:
    args = parser().parse_args()

    def save(result: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    save(run(args, save))


if __name__ == "__main__":
    main()
