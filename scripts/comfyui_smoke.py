"""Run the pack inside a real ComfyUI checkout, end to end, and leave nothing behind.

    python scripts/comfyui_smoke.py --comfyui PATH [--python PY] [--screenshot DIR]

Run it with a Python that can run ComfyUI (its requirements + ours installed); `--python` picks
another one for the server. Steps: a temporary base folder (so the checkout's own custom_nodes,
models, user settings and output are untouched) with this repository linked in as
custom_nodes/wan22-moe; tiny checkpoints under the Comfy-Org file names and tiny LoRAs under the
lightx2v 4-step names in a temporary models folder given by --extra-model-paths-config;
`main.py --cpu --listen 127.0.0.1 --port <free>`; check /object_info lists our nodes; POST each
API example workflow with tiny sizes as a websocket client (one progress message and a live
preview per step; the multi-GPU one with gpus = cpu:2, whose worker ranks report their status
over the websocket; the 4-step one reports what its LoRAs patched); check the mp4s that /history
names; interrupt long runs through POST /interrupt, in this process and on the worker group (both
must stop within a step); shut the server down and check its worker processes are gone too.

--screenshot DIR also opens ComfyUI's own frontend in headless Chromium (Debian's `chromium`,
driven over the DevTools protocol), loads each UI example workflow with `app.loadGraphData`,
checks that the frontend turns it into exactly its API twin (so the sampler's read-only lines
are display-only), closes any dialog and saves DIR/<workflow>.jpg (the template thumbnails; the
README's graph picture is wan22_t2v_a14b.jpg).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
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
sys.path.insert(0, str(REPO / "tests"))  # procs: the tests' /proc helpers
PACK_NAME = "wan22-moe"
WORKFLOWS = REPO / "example_workflows"
BASE, MULTIGPU, FOUR_STEP = "wan22_t2v_a14b", "wan22_t2v_a14b_multigpu", "wan22_t2v_a14b_4step_lora"
NODES = ("Wan22TextEncoderLoader", "Wan22TextEncode", "Wan22MoEModelLoader", "Wan22LoRA", "Wan22VAELoader",
         "Wan22MultiGPUConfig", "Wan22MoESampler", "Wan22VAEDecode", "Wan22SaveVideo")
TINY_SIZE = {"width": 32, "height": 32, "frames": 5}
TINY_STEPS = 4  # at most: a few steps show progress, previews and the expert switch
LORAS = ("wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
         "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors")
WORKER_STATUS_EVENT = "wan22moe.worker_status"
WORKER_MARK = "wan22_core.parallel.worker"  # in every worker rank's command line
# The sampler's read-only lines right after loading each UI workflow in the frontend.
EXPECTED_LINES = {
    BASE: {"expert_split": "high-noise steps 1-26 | low-noise 27-40", "worker_status": ""},
    MULTIGPU: {"expert_split": "high-noise steps 1-26 | low-noise 27-40",
               "worker_status": "workers: start on the first run"},
    FOUR_STEP: {"expert_split": "high-noise steps 1-2 | low-noise 3-4", "worker_status": ""},
}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars"]
VIEWPORT = (1600, 1000)
# Frontend settings for the picture: no minimap or fps counter over the graph.
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
    (models / "loras").mkdir()
    with torch.device("meta"):
        dit = WanModel(TINY.dit)
    for seed, name in enumerate(LORAS):
        write_tiny_lora(models / "loras" / name, dit, "lightx2v", seed=seed)
    config = work / "extra_model_paths.yaml"
    config.write_text(f"wan22_smoke:\n    base_path: {models}\n    diffusion_models: diffusion_models\n"
                      f"    text_encoders: text_encoders\n    vae: vae\n    loras: loras\n")
    log(f"tiny models: {sorted(str(p.relative_to(models)) for p in models.rglob('*.safetensors'))}")
    return base, config


def start_comfyui(comfyui: Path, python: str, base: Path, config: Path, port: int, logfile: Path) -> subprocess.Popen:
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--extra-model-paths-config", str(config),
               "--database-url", "sqlite:///:memory:", "--preview-method", "auto", "--disable-api-nodes"]
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
    extensions = http_json(f"{url}/extensions")
    ours = [e for e in extensions if e.startswith(f"/extensions/{PACK_NAME}/")]
    assert f"/extensions/{PACK_NAME}/wan22_moe.js" in ours, extensions
    log(f"/extensions serves {ours}")


def tiny_prompt(name: str, steps: int | None = None) -> dict:
    """An API example at tiny sizes and steps with gpus = cpu:2 for the multi-GPU config."""
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "Wan22MoESampler":
            node["inputs"].update(TINY_SIZE, steps=steps or min(node["inputs"]["steps"], TINY_STEPS))
        if node["class_type"] == "Wan22MultiGPUConfig":
            node["inputs"]["gpus"] = "cpu:2"
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
    """The multi-GPU example on 2 CPU ranks: each rank reports loading/ready/steps to the sampler."""
    run = await run_workflow(url, output_dir, MULTIGPU)
    sampler, inputs = sampler_of(tiny_prompt(MULTIGPU))
    statuses = [(s["rank"], s["status"]) for s in run["statuses"] if s["node"] == sampler and s["ranks"] == 2]
    steps = inputs["steps"]
    wanted = {(0, "ready"), (1, "ready"), (0, f"step {steps}/{steps}")}
    if not wanted <= set(statuses):
        raise RuntimeError(f"worker status events {statuses} lack {sorted(wanted - set(statuses))}")
    log(f"{MULTIGPU}: {len(statuses)} worker status events, e.g. {statuses[:3]} ... {statuses[-2:]}")


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
    run = await watch_prompt(url, tiny_prompt(name, steps), interrupt_at_step=3)
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
# Screenshot through the DevTools protocol


class DevTools:
    """Just enough of the Chrome DevTools protocol: send a command, wait for its answer."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=120)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {json.dumps(result['exceptionDetails'])[:2000]}")
        return result["result"].get("value")


PAGE_SCRIPT = """(async () => {
  const workflow = %s;
  await app.loadGraphData(workflow, true, true, %s);
  await new Promise((resolve) => setTimeout(resolve, 1500));
  const dialogs = document.querySelectorAll('.p-dialog').length;
  for (const close of document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close')) close.click();
  const sampler = app.graph.nodes.find((n) => n.type === 'Wan22MoESampler');
  app.graph.setDirtyCanvas(true, true);
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));  // lines drawn
  const lines = Object.fromEntries(['expert_split', 'worker_status', 'lora_report']
    .map((name) => [name, sampler.widgets.find((w) => w.name === name)?.value]));
  const { output } = await app.graphToPrompt();
  // Zoom the whole graph into the free canvas area (between the side bar, the menu and the
  // bottom toolbar), then report that area as the picture's clip.
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const x0 = Math.min(...app.graph.nodes.map((n) => n.pos[0]));
  const badge = 24;  // the pack badge above each title
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
  const clip = { x: free.left - pad, y: free.top - pad, width: (x1 - x0) * scale + 2 * pad,
                 height: (y1 - y0) * scale + 2 * pad, scale: 1 };
  return JSON.stringify({ dialogs, output, clip, lines, widgets_values: app.graph.serialize().nodes
    .find((n) => n.type === 'Wan22MoESampler').widgets_values });
})()"""


async def screenshot(url: str, out_dir: Path, work: Path) -> None:
    """Each UI example in ComfyUI's frontend: checked against its API twin, saved as out_dir/<name>.jpg."""
    import aiohttp  # ComfyUI's own requirement

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("--screenshot needs Debian's chromium (apt-get install chromium fonts-noto-cjk)")
    http_json(f"{url}/settings", PICTURE_SETTINGS)
    profile = work / "chromium"
    browser = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port = wait_for("Chromium's DevTools port", lambda: (profile / "DevToolsActivePort").is_file()
                        and (profile / "DevToolsActivePort").read_text().split()[0], 30)
        page = next(t for t in http_json(f"http://127.0.0.1:{port}/json/list") if t["type"] == "page")
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                await tools.call("Emulation.setDeviceMetricsOverride", width=VIEWPORT[0], height=VIEWPORT[1],
                                 deviceScaleFactor=1, mobile=False)
                await tools.call("Page.navigate", url=url)
                for _ in range(240):  # the frontend is ready when its app has a graph and a canvas
                    if await tools.evaluate("!!(window.app && app.graph && app.canvas && "
                                            "LiteGraph.registered_node_types.Wan22MoESampler)"):
                        break
                    await asyncio.sleep(0.5)
                else:
                    raise TimeoutError("ComfyUI's frontend did not start in the browser")
                await tools.evaluate("new Promise((resolve) => setTimeout(resolve, 2000))")
                await tools.evaluate("document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click())")
                out_dir.mkdir(parents=True, exist_ok=True)
                for name in (BASE, MULTIGPU, FOUR_STEP):
                    ui_text = (WORKFLOWS / f"{name}.json").read_text()
                    result = json.loads(await tools.evaluate(PAGE_SCRIPT % (ui_text, json.dumps(name))))
                    check_frontend_result(name, result)
                    await asyncio.sleep(1.0)
                    shot = await tools.call("Page.captureScreenshot", format="jpeg", quality=88, clip=result["clip"])
                    out = out_dir / f"{name}.jpg"
                    out.write_bytes(base64.b64decode(shot["data"]))
                    log(f"screenshot {out} ({out.stat().st_size} bytes); dialogs closed: {result['dialogs']}")
    finally:
        stop(browser, "chromium")


def check_frontend_result(name: str, result: dict) -> None:
    """The frontend's own graphToPrompt must give our API twin; the read-only lines are on the node, not in it."""
    twin = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    if result["output"] != twin:
        raise RuntimeError(f"the frontend converts {name} to\n"
                           f"{json.dumps(result['output'], ensure_ascii=False)}\nwhich is not the API twin")
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    saved = next(n for n in ui["nodes"] if n["type"] == "Wan22MoESampler")["widgets_values"]
    if result["widgets_values"] != saved:
        raise RuntimeError(f"{name}: the frontend saves the sampler as {result['widgets_values']}, "
                           f"the file has {saved}")
    expected = {**EXPECTED_LINES[name], "lora_report": ""}
    if result["lines"] != expected:
        raise RuntimeError(f"{name}: the sampler's lines are {result['lines']}, expected {expected}")
    log(f"frontend: {name} graphToPrompt == API twin; sampler lines {result['lines']}")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout (the folder with main.py)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs ComfyUI (default: this one)")
    parser.add_argument("--screenshot", type=Path, metavar="DIR",
                        help="also save DIR/<workflow>.jpg of each UI example workflow in the frontend")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for start-up and for the prompt")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, outputs)")
    args = parser.parse_args(argv)
    if not (args.comfyui / "main.py").is_file():
        parser.error(f"--comfyui {args.comfyui} has no main.py; give the ComfyUI checkout folder")

    work = Path(tempfile.mkdtemp(prefix="wan22-comfyui-smoke-"))
    logfile, server = work / "comfyui.log", None
    try:
        base, config = prepare(work)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_comfyui(args.comfyui.resolve(), args.python, base, config, port, logfile)
        wait_for("ComfyUI to answer /object_info", lambda: http_json(f"{url}/object_info", timeout=30),
                 args.timeout, server, every=1.0)
        check_object_info(url)
        output = base / "output"
        asyncio.run(asyncio.wait_for(run_workflow(url, output, BASE), args.timeout))
        asyncio.run(asyncio.wait_for(interrupt_workflow(url, BASE), args.timeout))
        asyncio.run(asyncio.wait_for(run_lora_workflow(url, output), args.timeout))
        asyncio.run(asyncio.wait_for(run_multigpu_workflow(url, output), args.timeout))
        asyncio.run(asyncio.wait_for(interrupt_workflow(url, MULTIGPU), args.timeout))
        workers = worker_pids(server.pid)
        if len(workers) != 2:
            raise RuntimeError(f"expected the 2 worker ranks to stay up between prompts, found {workers}")
        if args.screenshot is not None:
            asyncio.run(screenshot(url, args.screenshot.resolve(), work))
        stop(server, "ComfyUI")
        check_workers_gone(workers)
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
