"""Run the pack inside a real ComfyUI checkout, end to end, and leave nothing behind.

    python scripts/comfyui_smoke.py --comfyui PATH [--python PY]
        [--screenshot DIR [--frontend VERSION|newest ...] [--frontend-root PATH ...]]

Run it with a Python that can run ComfyUI (its requirements + ours installed); `--python` picks
another one for the server. Steps: a temporary base folder (so the checkout's own custom_nodes,
models, user settings and output are untouched) with this repository linked in as
custom_nodes/wan22-moe; tiny checkpoints under the Comfy-Org file names, the same model as GGUF
files under QuantStack's and city96's names (in diffusion_models/, unet/ and clip/) and tiny LoRAs
under the lightx2v 4-step names in a temporary models folder given by --extra-model-paths-config;
`main.py --cpu --listen 127.0.0.1 --port <free>`; check /object_info lists our nodes and the loaders
list the .gguf files from every expert and text-encoder folder; POST each
API example workflow with tiny sizes as a websocket client (one progress message and a live
preview per step; the multi-GPU one with gpus = cpu:3 (three ranks: the automatic split is ring
attention over all three), whose worker ranks report their status over the websocket and whose
sampler reports the split in its ui output; the 4-step one reports what its LoRAs patched); check the mp4s that /history
names; interrupt long runs through POST /interrupt, in this process and on the worker group (both
must stop within a step); shut the server down and check its worker processes are gone too.

--screenshot DIR also checks the pack in ComfyUI's frontend, in headless Chromium (Debian's
`chromium` driven by playwright: pip install -e '.[browser]'; fonts-noto-cjk for the Chinese
negative prompt), on ComfyUI's own frontend and on each `--frontend VERSION` (a
comfyui-frontend-package fetched by pip; `newest` asks the index) or `--frontend-root PATH` (an
unpacked frontend's static folder), each served by a fresh server started with `--front-end-root`;
with neither option, `--frontend newest`. On each: every UI example workflow loads with all its
nodes, the sampler's lines are on it and painted, the frontend turns the workflow into exactly its
API twin (so the lines are display-only), every node type of the pack is created from the node
library's code path, "Nodes 2.0" loads the graph too, and no error from the pack's files reaches
the console or the page. Pictures: DIR/frontend-<version>/<workflow>.jpg (the whole graph; the
template thumbnails and the README's picture come from these), DIR/frontend-<version>/sampler.png
and sampler_nodes2.png (the sampler of wan22_t2v_a14b at zoom 1, classic and Nodes 2.0).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # procs: the tests' /proc helpers; frontend: the browser checks
import frontend as fe  # noqa: E402  (standard library only)

PACK_NAME = "wan22-moe"
WORKFLOWS = REPO / "example_workflows"
BASE, MULTIGPU, FOUR_STEP = "wan22_t2v_a14b", "wan22_t2v_a14b_multigpu", "wan22_t2v_a14b_4step_lora"
GGUF = "wan22_t2v_a14b_gguf"  # API only: GGUF Q8_0 experts and encoder
# where prepare() puts the tiny GGUF files: ComfyUI reads unet/ as diffusion_models and clip/ as text_encoders
GGUF_FILES = {"Wan2.2-T2V-A14B-HighNoise-Q8_0.gguf": "diffusion_models", "Wan2.2-T2V-A14B-LowNoise-Q8_0.gguf": "unet",
              "umt5-xxl-encoder-Q8_0.gguf": "clip"}
NODES = ("Wan22TextEncoderLoader", "Wan22TextEncode", "Wan22MoEModelLoader", "Wan22LoRA", "Wan22VAELoader",
         "Wan22MultiGPUConfig", "Wan22MoESampler", "Wan22VAEDecode", "Wan22SaveVideo")
TINY_SIZE = {"width": 32, "height": 32, "frames": 5}
# The interrupted runs: steps long enough (tens of ms) that progress messages already in flight when
# POST /interrupt returns cannot pass for steps run after it (at 32x32 a step takes ~1 ms)
INTERRUPT_SIZE = {"width": 128, "height": 128, "frames": 17}
TINY_STEPS = 4  # at most: a few steps show progress, previews and the expert switch
CPU_RANKS = 3  # the multi-GPU example's ranks: a count Ulysses cannot split (40 heads), so the ring runs
SPLIT = "3 CPU ranks: CFG 1 x Ulysses 1 x Ring 3"  # what the sampler reports for it (parallel_split)
LORAS = ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
         "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors")
WORKER_STATUS_EVENT = "wan22moe.worker_status"
WORKER_MARK = "wan22_core.parallel.worker"  # in every worker rank's command line
# Frontend settings for the pictures: no minimap or fps counter over the graph.
PICTURE_SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}


def log(message: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 10.0):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def wait_for(what: str, check, timeout: float, server: subprocess.Popen | None = None, every: float = 0.5):
    """Call `check` until it returns something truthy; fail on timeout or if the server died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"ComfyUI exited (code {server.returncode}) while waiting for {what}")
        try:
            result = check()
            if result:
                return result
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop(process: subprocess.Popen | None, name: str) -> None:
    """SIGTERM the process group, SIGKILL it after 15 s; always reaped."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log(f"{name} stopped")


# ---------------------------------------------------------------------------------------------
# Setup


def prepare(work: Path) -> tuple[Path, Path]:
    """base folder with custom_nodes/wan22-moe -> this repo; tiny models and LoRAs; extra_model_paths yaml."""
    sys.path.insert(0, str(REPO))
    import torch
    from wan22_core.config import TINY
    from wan22_core.tiny import write_tiny_lora
    from wan22_core.models.transformer import WanModel
    from wan22_core.tiny import make_tiny

    base = work / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    models = make_tiny(work / "models", "comfy")
    gguf = make_tiny(work / "gguf", "gguf", quant="Q8_0")
    for name, folder in GGUF_FILES.items():
        (models / folder).mkdir(exist_ok=True)
        shutil.move(next(gguf.rglob(name)), models / folder / name)
    (models / "loras").mkdir()
    with torch.device("meta"):
        dit = WanModel(TINY.dit)
    for seed, name in enumerate(LORAS):
        write_tiny_lora(models / "loras" / name, dit, "lightx2v", seed=seed)
    config = work / "extra_model_paths.yaml"
    config.write_text(f"wan22_smoke:\n    base_path: {models}\n    diffusion_models: diffusion_models\n"
                      f"    unet: unet\n    text_encoders: text_encoders\n    clip: clip\n    vae: vae\n"
                      f"    loras: loras\n")
    log(f"tiny models: {sorted(str(p.relative_to(models)) for p in models.rglob('*.*') if p.suffix != '.json')}")
    return base, config


def start_comfyui(comfyui: Path, python: str, base: Path, config: Path, port: int, logfile: Path,
                  front_end_root: Path | None = None) -> subprocess.Popen:
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--extra-model-paths-config", str(config),
               "--database-url", "sqlite:///:memory:", "--preview-method", "auto", "--disable-api-nodes"]
    if front_end_root is not None:
        command += ["--front-end-root", str(front_end_root)]
    log(f"starting {' '.join(command)}")
    with open(logfile, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


# ---------------------------------------------------------------------------------------------
# Checks over HTTP


def check_object_info(url: str) -> None:
    info = http_json(f"{url}/object_info")
    missing = [n for n in NODES if n not in info]
    if missing:
        raise RuntimeError(f"/object_info lacks {missing}: the pack did not import (see the ComfyUI log)")
    sampler = info["Wan22MoESampler"]
    assert sampler["python_module"] == f"custom_nodes.{PACK_NAME}", sampler["python_module"]
    assert sampler["category"] == "Wan2.2 MoE" and sampler["output"] == ["LATENT"]
    log(f"/object_info lists all {len(NODES)} nodes; sampler inputs: {sampler['input_order']}")
    loaders = {"Wan22MoEModelLoader": "high_noise_model", "Wan22TextEncoderLoader": "text_encoder"}
    specs = {name: info[name]["input"]["required"][widget] for name, widget in loaders.items()}
    options = {name: spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])  # newer: "COMBO"
               for name, spec in specs.items()}
    experts = [n for n, folder in GGUF_FILES.items() if folder != "clip"]
    if not set(experts) <= set(options["Wan22MoEModelLoader"]) or "umt5-xxl-encoder-Q8_0.gguf" not in \
            options["Wan22TextEncoderLoader"]:
        raise RuntimeError(f"the loaders do not list the .gguf files from diffusion_models/, unet/ and clip/: {options}")
    log(f"the loaders list the GGUF files: {options}")
    extensions = http_json(f"{url}/extensions")
    ours = [e for e in extensions if e.startswith(f"/extensions/{PACK_NAME}/")]
    assert f"/extensions/{PACK_NAME}/wan22_moe.js" in ours, extensions
    log(f"/extensions serves {ours}")


def tiny_prompt(name: str, steps: int | None = None) -> dict:
    """An API example at tiny sizes and steps with gpus = cpu:3 for the multi-GPU config."""
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "Wan22MoESampler":
            node["inputs"].update(TINY_SIZE, steps=steps or min(node["inputs"]["steps"], TINY_STEPS))
        if node["class_type"] == "Wan22MultiGPUConfig":
            node["inputs"]["gpus"] = f"cpu:{CPU_RANKS}"
    return prompt


async def watch_prompt(url: str, prompt: dict, interrupt_at_step: int | None = None) -> dict:
    """Queue `prompt` as a websocket client and collect what ComfyUI reports until it ends.

    Returns {"prompt_id", "end" (the final event), "progress" (sampler step values), "previews"
    (binary preview frames), "after_interrupt" (progress messages after POST /interrupt),
    "statuses" (the worker group's status events), "executed" ({node: its ui output})}.
    """
    import aiohttp  # ComfyUI's own requirement

    client_id = str(uuid.uuid4())
    seen = {"progress": [], "previews": 0, "after_interrupt": None, "statuses": [], "executed": {}}
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "Wan22MoESampler")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client_id}", max_msg_size=0) as ws:
            async with session.post(f"{url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                queued = await response.json()
            if response.status != 200 or queued.get("node_errors"):
                raise RuntimeError(f"/prompt refused the workflow: {queued}")
            prompt_id = queued["prompt_id"]
            while True:
                message = await ws.receive(timeout=300)
                if message.type == aiohttp.WSMsgType.BINARY:
                    seen["previews"] += 1
                    continue
                if message.type != aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"the websocket closed ({message.type})")
                event, data = json.loads(message.data)["type"], json.loads(message.data)["data"]
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if event == WORKER_STATUS_EVENT:
                    seen["statuses"].append(data)
                elif event == "executed":
                    seen["executed"][data["node"]] = data["output"]
                elif event == "progress" and data.get("node") == sampler:
                    seen["progress"].append(data["value"])
                    if seen["after_interrupt"] is not None:
                        seen["after_interrupt"] += 1
                    elif interrupt_at_step is not None and data["value"] >= interrupt_at_step:
                        async with session.post(f"{url}/interrupt", json={}):
                            seen["after_interrupt"] = 0
                elif event in ("execution_error", "execution_interrupted", "execution_success"):
                    return {"prompt_id": prompt_id, "end": event, "data": data, **seen}


def sampler_of(prompt: dict) -> tuple[str, dict]:
    return next((k, v["inputs"]) for k, v in prompt.items() if v["class_type"] == "Wan22MoESampler")


async def run_workflow(url: str, output_dir: Path, name: str) -> dict:
    """An API example with tiny sizes: progress per step, previews, an mp4 in history."""
    prompt = tiny_prompt(name)
    steps = sampler_of(prompt)[1]["steps"]
    run = await watch_prompt(url, prompt)
    if run["end"] != "execution_success":
        raise RuntimeError(f"{name} ended with {run['end']}: {json.dumps(run['data'])[-3000:]}")
    if run["progress"] != list(range(1, steps + 1)) or run["previews"] < 1:
        raise RuntimeError(f"{name}: sampler progress {run['progress']} with {run['previews']} previews; expected one "
                           "progress message and one preview per step")
    # ComfyUI files the history entry just after it reports execution_success
    entry = wait_for("the prompt in /history", lambda: http_json(f"{url}/history/{run['prompt_id']}").get(
        run["prompt_id"]), 30)
    (video,) = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    path = output_dir / video["subfolder"] / video["filename"]
    from wan22_core.video import read_mp4_info

    info = read_mp4_info(path)
    if {k: info[k] for k in TINY_SIZE} != TINY_SIZE:
        raise RuntimeError(f"{path} is {info}, expected {TINY_SIZE}")
    with urllib.request.urlopen(f"{url}/view?filename={video['filename']}&subfolder={video['subfolder']}"
                                f"&type=output", timeout=10) as response:
        served = len(response.read())
    log(f"{name}: progress {run['progress']}, {run['previews']} previews; history has {path.name} {info}; "
        f"/view serves {served} bytes")
    return run


async def run_multigpu_workflow(url: str, output_dir: Path) -> None:
    """The multi-GPU example on 3 CPU ranks: each rank reports loading/ready/steps to the sampler,
    which reports the split it ran."""
    run = await run_workflow(url, output_dir, MULTIGPU)
    sampler, inputs = sampler_of(tiny_prompt(MULTIGPU))
    statuses = [(s["rank"], s["status"]) for s in run["statuses"]
                if s["node"] == sampler and s["ranks"] == CPU_RANKS]
    steps = inputs["steps"]
    wanted = {*((rank, "ready") for rank in range(CPU_RANKS)), (0, f"step {steps}/{steps}")}
    if not wanted <= set(statuses):
        raise RuntimeError(f"worker status events {statuses} lack {sorted(wanted - set(statuses))}")
    split = run["executed"].get(sampler, {}).get("parallel_split")
    if split != [SPLIT]:
        raise RuntimeError(f"{MULTIGPU}: the sampler reported the split {split}, expected [{SPLIT!r}]")
    log(f"{MULTIGPU}: {split[0]}; {len(statuses)} worker status events, e.g. {statuses[:3]} ... {statuses[-2:]}")


async def run_lora_workflow(url: str, output_dir: Path) -> None:
    """The 4-step example with tiny LoRAs under the lightx2v names: the sampler reports both."""
    run = await run_workflow(url, output_dir, FOUR_STEP)
    sampler, _ = sampler_of(tiny_prompt(FOUR_STEP))
    lines = run["executed"].get(sampler, {}).get("lora_report", [])
    if len(lines) != 2 or not all(name in line for name, line in zip(LORAS, lines)):
        raise RuntimeError(f"{FOUR_STEP}: the sampler reported LoRAs {lines}, expected one line for each of {LORAS}")
    log(f"{FOUR_STEP}: LoRA report {lines}")


async def interrupt_workflow(url: str, name: str) -> None:
    """A long tiny run, interrupted through ComfyUI at step 3, must stop within a step."""
    steps = 500
    prompt = tiny_prompt(name, steps)
    sampler_of(prompt)[1].update(INTERRUPT_SIZE)
    run = await watch_prompt(url, prompt, interrupt_at_step=3)
    if run["end"] != "execution_interrupted" or run["after_interrupt"] > 1:
        raise RuntimeError(f"{name} interrupt: ended with {run['end']} after progress {run['progress'][-5:]} "
                           f"({run['after_interrupt']} steps after POST /interrupt)")
    log(f"{name}: POST /interrupt at step 3 of {steps}: execution_interrupted, last step {run['progress'][-1]}")


def worker_pids(server_pid: int) -> list[int]:
    """The server's worker-rank processes (children whose command line runs our worker)."""
    from procs import children_of

    def command(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            return ""

    return sorted(pid for pid in children_of(server_pid) if WORKER_MARK in command(pid))


def check_workers_gone(pids: list[int], timeout: float = 15.0) -> None:
    """After the server stopped, its worker ranks must exit on their own (they watch their parent)."""
    from procs import process_alive

    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if process_alive(p)]
    if alive:
        for pid in alive:  # do not leave them behind, then fail
            os.kill(pid, signal.SIGKILL)
        raise RuntimeError(f"worker processes {alive} outlived the ComfyUI server")
    log(f"the server's worker ranks {pids} exited with it")


# ---------------------------------------------------------------------------------------------
# The pack in the frontend, in headless Chromium (tests/frontend.py has the page scripts)

# Zooms the whole graph into the free canvas area (between the side bar, the menu and the bottom
# toolbar) and returns that area as the picture's clip.
FIT_GRAPH = """() => {
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const badge = 24;  // the pack badge above each title
  const x0 = Math.min(...app.graph.nodes.map((n) => n.pos[0]));
  const y0 = Math.min(...app.graph.nodes.map((n) => n.pos[1] - title - badge));
  const x1 = Math.max(...app.graph.nodes.map((n) => n.pos[0] + n.size[0]));
  const y1 = Math.max(...app.graph.nodes.map((n) => n.pos[1] + n.size[1]));
  const free = { left: 80, top: 110, right: window.innerWidth - 20, bottom: window.innerHeight - 70 };
  const scale = Math.min((free.right - free.left) / (x1 - x0), (free.bottom - free.top) / (y1 - y0));
  const ds = app.canvas.ds;
  const canvas = app.canvas.canvas.getBoundingClientRect();  // graph coordinates start at its corner
  ds.scale = scale;
  ds.offset[0] = (free.left - canvas.left) / scale - x0;
  ds.offset[1] = (free.top - canvas.top) / scale - y0;
  app.graph.setDirtyCanvas(true, true);
  const pad = 16;
  return { x: free.left - pad, y: free.top - pad, width: (x1 - x0) * scale + 2 * pad,
           height: (y1 - y0) * scale + 2 * pad };
}"""

# The page area of a node: its own element where the frontend renders nodes as elements, else its
# box on the graph canvas (with title and badge).
NODE_CLIP = """(id) => {
  const pad = 12;
  const element = document.querySelector(`[data-node-id="${id}"]`);
  let box;
  if (element) {
    box = element.getBoundingClientRect();
  } else {
    const node = app.graph.getNodeById(id);
    const { scale, offset } = app.canvas.ds;
    const canvas = app.canvas.canvas.getBoundingClientRect();
    const top = LiteGraph.NODE_TITLE_HEIGHT + 24;
    box = { left: canvas.left + (node.pos[0] + offset[0]) * scale,
            top: canvas.top + (node.pos[1] - top + offset[1]) * scale,
            width: node.size[0] * scale, height: (node.size[1] + top) * scale };
  }
  return { x: box.left - pad, y: box.top - pad, width: box.width + 2 * pad, height: box.height + 2 * pad };
}"""


def close_dialogs(page) -> None:
    """The first-run template browser and the like would cover the graph in the pictures."""
    page.keyboard.press("Escape")
    page.wait_for_timeout(500)


def check_workflows(page, shots: Path) -> None:
    """Every UI example: all nodes, the lines, the API twin; pictures of the graph and the sampler."""
    for name in fe.EXPECTED_LINES:
        report = fe.load_workflow(page, name)
        problems = fe.load_problems(name, report)
        if problems:
            raise RuntimeError(f"frontend {fe.frontend_version(page)}, {name}: " + "; ".join(problems))
        close_dialogs(page)
        if name == BASE:
            fe.sampler_lines(page, report["samplerId"])  # centred at zoom 1 again
            page.screenshot(path=shots / "sampler.png", clip=page.evaluate(NODE_CLIP, report["samplerId"]))
        page.screenshot(path=shots / f"{name}.jpg", type="jpeg", quality=88, clip=page.evaluate(FIT_GRAPH))
        log(f"frontend {fe.frontend_version(page)}: {name} has all {len(report['types'])} nodes, "
            f"graphToPrompt == API twin; sampler lines {report['lines']}")


def check_nodes_2_0(page, shots: Path) -> None:
    """The base example with the frontend's element-based node renderer ("Nodes 2.0")."""
    fe.use_nodes_2_0(page, True)
    try:
        report = fe.load_workflow(page, BASE)
        close_dialogs(page)
        shown = fe.sampler_lines(page, report["samplerId"])
        page.screenshot(path=shots / "sampler_nodes2.png", clip=page.evaluate(NODE_CLIP, report["samplerId"]))
    finally:
        fe.use_nodes_2_0(page, False)
    if sorted(report["types"]) != sorted(n["type"] for n in fe.workflow(BASE)["nodes"]):
        raise RuntimeError(f"Nodes 2.0: {BASE} created only {report['types']}")
    log(f"frontend {fe.frontend_version(page)}, Nodes 2.0: {BASE} has all nodes; lines painted there: "
        f"{shown['painted'] or 'none (this renderer does not host canvas-drawn widgets)'}")


def check_in_browser(url: str, out_dir: Path) -> None:
    """The pack in the frontend that `url` serves; pictures in out_dir/frontend-<version>/."""
    from playwright.sync_api import sync_playwright

    http_json(f"{url}/settings", {**PICTURE_SETTINGS, **fe.CHECK_SETTINGS})
    with sync_playwright() as playwright:
        browser = fe.open_browser(playwright)
        try:
            page, page_log = fe.open_page(browser, url)
            version = fe.frontend_version(page)
            shots = out_dir / f"frontend-{version}"
            shots.mkdir(parents=True, exist_ok=True)
            close_dialogs(page)
            check_workflows(page, shots)
            infos = http_json(f"{url}/object_info")
            problems = fe.creation_problems(fe.create_nodes(page, list(NODES)), infos)
            if problems:
                raise RuntimeError(f"frontend {version}, nodes created from the library: " + "; ".join(problems))
            log(f"frontend {version}: all {len(NODES)} node types created from the library")
            check_nodes_2_0(page, shots)
            errors = page_log.from_pack()
            if errors:
                raise RuntimeError(f"frontend {version}: errors from the pack's files:\n" + "\n".join(errors))
            log(f"frontend {version}: no error from the pack; pictures in {shots}")
        finally:
            browser.close()


def frontend_roots(args) -> list[Path]:
    """The static folders of the frontends to check besides ComfyUI's own, fetched before any start."""
    roots = []
    for path in args.frontend_root:
        candidates = (path, path / "static", path / "comfyui_frontend_package" / "static")
        found = [p for p in candidates if (p / "index.html").is_file()]
        if not found:
            raise RuntimeError(f"--frontend-root {path} holds no index.html (give the package's static folder)")
        roots.append(found[0])
    for spec in args.frontend or ([] if args.frontend_root else ["newest"]):
        version = fe.newest_frontend_version() if spec == "newest" else spec
        roots.append(fe.frontend_static(version))
        log(f"--frontend {spec}: comfyui-frontend-package {version} in {roots[-1]}")
    return roots


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout (the folder with main.py)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs ComfyUI (default: this one)")
    parser.add_argument("--screenshot", type=Path, metavar="DIR",
                        help="also check the pack in the frontend(s) in headless Chromium and save pictures in "
                             "DIR/frontend-<version>/")
    parser.add_argument("--frontend", action="append", default=[], metavar="VERSION",
                        help="with --screenshot: also check comfyui-frontend-package VERSION, or `newest` "
                             "(fetched by pip; repeatable; default: newest unless --frontend-root is given)")
    parser.add_argument("--frontend-root", action="append", default=[], type=Path, metavar="PATH",
                        help="with --screenshot: also check the frontend in PATH (an unpacked "
                             "comfyui-frontend-package or its static folder; repeatable)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for start-up and for the prompt")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, outputs)")
    args = parser.parse_args(argv)
    if not (args.comfyui / "main.py").is_file():
        parser.error(f"--comfyui {args.comfyui} has no main.py; give the ComfyUI checkout folder")
    if (args.frontend or args.frontend_root) and args.screenshot is None:
        parser.error("--frontend and --frontend-root choose frontends for --screenshot DIR; give it too")

    work = Path(tempfile.mkdtemp(prefix="wan22-comfyui-smoke-"))
    logfile, server = work / "comfyui.log", None
    try:
        other_frontends = frontend_roots(args) if args.screenshot is not None else []
        base, config = prepare(work)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_comfyui(args.comfyui.resolve(), args.python, base, config, port, logfile)
        wait_for("ComfyUI to answer /object_info", lambda: http_json(f"{url}/object_info", timeout=30),
                 args.timeout, server, every=1.0)
        check_object_info(url)
        output = base / "output"
        asyncio.run(asyncio.wait_for(run_workflow(url, output, BASE), args.timeout))
        asyncio.run(asyncio.wait_for(run_workflow(url, output, GGUF), args.timeout))
        asyncio.run(asyncio.wait_for(interrupt_workflow(url, BASE), args.timeout))
        asyncio.run(asyncio.wait_for(run_lora_workflow(url, output), args.timeout))
        asyncio.run(asyncio.wait_for(run_multigpu_workflow(url, output), args.timeout))
        asyncio.run(asyncio.wait_for(interrupt_workflow(url, MULTIGPU), args.timeout))
        workers = worker_pids(server.pid)
        if len(workers) != CPU_RANKS:
            raise RuntimeError(f"expected the {CPU_RANKS} worker ranks to stay up between prompts, found {workers}")
        if args.screenshot is not None:
            check_in_browser(url, args.screenshot.resolve())
        stop(server, "ComfyUI")
        check_workers_gone(workers)
        for index, root in enumerate(other_frontends):  # a fresh server for each (--front-end-root)
            port, logfile = free_port(), work / f"comfyui-frontend-{index}.log"
            url = f"http://127.0.0.1:{port}"
            server = start_comfyui(args.comfyui.resolve(), args.python, base, config, port, logfile, root)
            wait_for("ComfyUI to answer /object_info", lambda: http_json(f"{url}/object_info", timeout=30),
                     args.timeout, server, every=1.0)
            check_in_browser(url, args.screenshot.resolve())
            stop(server, "ComfyUI")
        log("OK")
        return 0
    except Exception as err:  # one report: what failed, then the server's last words
        log(f"FAILED: {type(err).__name__}: {err}")
        if logfile.is_file():
            print("---- ComfyUI log (last 60 lines) ----\n" + "\n".join(
                logfile.read_text(errors="replace").splitlines()[-60:]), flush=True)
        return 1
    finally:
        stop(server, "ComfyUI")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
