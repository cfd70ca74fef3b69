"""The ComfyUI node pack without ComfyUI: import by path, node contracts, example workflows run
end to end on tiny checkpoints, progress/interrupt through a fake adapter, LATENT convention,
the multi-GPU path through the worker group on CPU ranks (cpu:2), LoRAs, and the loader's
attention / block swap / compile options."""
import builtins
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from comfy_standin import import_pack
from fakes import hide_package
from procs import children_of
from reference import rel_l2

from wan22_core.config import TINY
from wan22_core.models.transformer import WanModel
from wan22_core.tiny import GGUF_FILES, make_tiny, write_tiny_lora
from wan22_core.video import read_mp4_info

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
API_WORKFLOWS = sorted((WORKFLOWS / "api").glob("*.json"))
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
HIGH, LOW = "wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2_t2v_low_noise_14B_fp16.safetensors"
TEXT_ENCODER, VAE = "umt5_xxl_fp16.safetensors", "wan_2.1_vae.safetensors"
GGUF_NAMES = [name.format(quant="Q8_0") for name in GGUF_FILES]  # high, low, text encoder
# ComfyUI's own Wan2.2 T2V template names for the lightx2v 4-step LoRAs.
LORA_HIGH = "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors"
LORA_LOW = "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"
STYLE_LORA = "style_lora.safetensors"
# Tiny sizes for the tiny models: 32x32 px = 2x2 tokens, 5 frames = 2 latent frames.
TINY_SIZE = {"width": 32, "height": 32, "frames": 5}
TINY_SETTINGS = {**TINY_SIZE, "steps": 3}
TOL = 1e-5  # relative L2, fp32: the worker group and LoRA modes against the in-process sampler

# The node table: class -> (required inputs, optional inputs), in INPUT_TYPES order.
CONTRACT = {
    "Wan22TextEncoderLoader": (["text_encoder", "device", "dtype"], []),
    "Wan22TextEncode": (["text_encoder", "positive", "negative"], []),
    "Wan22MoEModelLoader": (["high_noise_model", "low_noise_model", "weight_dtype", "attention", "offload"],
                            ["swap_blocks", "compile"]),
    "Wan22LoRA": (["model", "lora_high", "lora_low", "strength_high", "strength_low", "lora_mode"], []),
    "Wan22VAELoader": (["vae_name"], []),
    "Wan22MultiGPUConfig": (["gpus", "ulysses_degree", "ring_degree", "fsdp", "cfg_parallel"], ["batch_cfg"]),
    "Wan22MoESampler": (["model", "embeds", "width", "height", "frames", "steps", "cfg_high", "cfg_low", "boundary",
                         "shift", "solver", "seed"], ["latent", "denoise", "parallel", "videos", "step_cache"]),
    "Wan22VAEDecode": (["vae", "samples", "tiled"], ["parallel"]),
    "Wan22SaveVideo": (["images", "fps", "filename_prefix"], ["videos"]),
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
VIRTUAL_NODES = ("Note", "MarkdownNote", "Reroute")

IMPORT_LIKE_COMFYUI = """
import importlib.util, json, sys, time
root = sys.argv[1]
name = root.replace(".", "_x_")  # ComfyUI's sys.modules name for a pack folder
start = time.perf_counter()
spec = importlib.util.spec_from_file_location(name, root + "/__init__.py")
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
print(json.dumps({"seconds": time.perf_counter() - start, "nodes": sorted(module.NODE_CLASS_MAPPINGS),
                  "web": module.WEB_DIRECTORY, "heavy": sorted(m for m in ("transformers", "comfy", "folder_paths")
                                                               if m in sys.modules)}))
"""


PACK = import_pack()
ADAPTER = sys.modules[PACK.__name__ + ".nodes.comfy_adapter"]
CACHE = sys.modules[PACK.__name__ + ".nodes.model_cache"].CACHE
LOADERS = sys.modules[PACK.__name__ + ".nodes.loaders"]
ENGINE = PACK.__name__ + ".wan22_core"  # the pack's own copy of the engine (relative imports)
MAPPINGS = PACK.NODE_CLASS_MAPPINGS
CPU = torch.device("cpu")


def engine(module: str):
    importlib.import_module(f"{ENGINE}.{module}")
    return sys.modules[f"{ENGINE}.{module}"]


def write_tiny_loras(models: Path) -> dict[str, object]:
    """Tiny LoRAs in models/loras under the lightx2v names (lightx2v layout: low-rank + full deltas)
    and a ComfyUI-layout style LoRA; {file name: what was written}."""
    (models / "loras").mkdir(exist_ok=True)
    with torch.device("meta"):
        model = WanModel(TINY.dit)
    return {name: write_tiny_lora(models / "loras" / name, model, fmt, seed=seed)
            for name, fmt, seed in ((LORA_HIGH, "lightx2v", 1), (LORA_LOW, "lightx2v", 2), (STYLE_LORA, "comfy", 3))}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """Tiny checkpoints in ComfyUI's model-folder layout, under the Comfy-Org file names, the same
    model as GGUF Q8_0 experts and encoder beside them (QuantStack's and city96's names), and tiny LoRAs."""
    root = tmp_path_factory.mktemp("comfy")
    models = make_tiny(root / "models", "comfy")
    gguf = make_tiny(root / "gguf", "gguf", quant="Q8_0")
    for name in GGUF_NAMES:
        folder = "text_encoders" if name.startswith("umt5") else "diffusion_models"
        shutil.copy(gguf / folder / name, models / folder / name)
    write_tiny_loras(models)
    return models


@pytest.fixture(scope="module", autouse=True)
def no_worker_group_left():
    """The multi-GPU tests share one cpu:2 group (it persists across prompts); stop it at the end."""
    yield
    group = engine("parallel").WorkerGroup.current()
    if group is not None:
        group.shutdown()


@pytest.fixture
def runtime(models_dir, tmp_path, monkeypatch):
    rt = ADAPTER.StandaloneRuntime(models_dir, tmp_path / "output")
    monkeypatch.setattr(ADAPTER, "runtime", rt)
    return rt


class FakeInterrupt(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


class FakeComfyRuntime(ADAPTER.StandaloneRuntime):
    """Records progress and previews; ComfyUI's interrupt flag goes up after `interrupt_after` updates."""

    def __init__(self, models_dir, output_dir, interrupt_after=None):
        super().__init__(models_dir, output_dir)
        self.interrupt_after = interrupt_after
        self.updates, self.totals, self.freed, self.statuses = [], [], 0, []

    def progress_bar(self, total):
        self.totals.append(total)
        return self

    def update(self, value, preview=None):
        self.updates.append((value, preview))

    def previews_enabled(self):
        return True

    def free_memory(self):
        self.freed += 1

    def interrupted(self):
        return self.interrupt_after is not None and len(self.updates) >= self.interrupt_after

    def raise_if_interrupted(self):
        if self.interrupted():
            raise FakeInterrupt()

    def send_status(self, node_id, rank, ranks, status):
        self.statuses.append((node_id, rank, ranks, status))


# ---------------------------------------------------------------------------------------------
# A small prompt executor: ComfyUI's validation of widget values, then outputs in dependency order


def input_spec(cls) -> dict:
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def validate_value(node_id, name, spec, value):
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        assert value in kind, f"node {node_id} {name}: {value!r} is not one of {kind}"
    elif kind in ("INT", "FLOAT"):
        assert options.get("min", -math.inf) <= value <= options.get("max", math.inf), (node_id, name, value)


def run_prompt(prompt: dict) -> dict:
    """Run an API-format prompt; returns {node_id: ui dict} of the nodes that ran."""
    results, ui = {}, {}

    def evaluate(node_id):
        if node_id in results:
            return results[node_id]
        node = prompt[node_id]
        cls = MAPPINGS[node["class_type"]]
        spec, kwargs = input_spec(cls), {}
        required = cls.INPUT_TYPES()["required"]
        missing = set(required) - set(node["inputs"])
        assert not missing, f"node {node_id} misses required inputs {missing}"
        for name, value in node["inputs"].items():
            assert name in spec, f"node {node_id} ({node['class_type']}) has no input {name!r}"
            if isinstance(value, list):  # a link [source node id, output index]
                kwargs[name] = evaluate(value[0])[value[1]]
            else:
                validate_value(node_id, name, spec[name], value)
                kwargs[name] = value
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            ui[node_id] = out.get("ui")
            out = out.get("result", ())
        results[node_id] = out
        return out

    for node_id, node in prompt.items():
        if getattr(MAPPINGS[node["class_type"]], "OUTPUT_NODE", False):
            evaluate(node_id)
    return ui


def tiny_prompt(path: Path) -> dict:
    """An example workflow at tiny sizes (at most 4 steps) with CPU ranks for the multi-GPU config."""
    prompt = json.loads(path.read_text())
    for node in prompt.values():
        if node["class_type"] == "Wan22MoESampler":
            node["inputs"].update(TINY_SIZE, steps=min(node["inputs"]["steps"], 4))
        if node["class_type"] == "Wan22MultiGPUConfig":
            node["inputs"]["gpus"] = "cpu:2"
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


# ---------------------------------------------------------------------------------------------
# Loading like ComfyUI


def test_pack_imports_by_path_fast_and_without_heavy_modules():
    out = subprocess.run([sys.executable, "-c", IMPORT_LIKE_COMFYUI, str(ROOT)], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["nodes"] == sorted(CONTRACT)
    assert info["heavy"] == []  # no transformers at import, and ComfyUI is optional
    assert info["seconds"] < 20, info  # torch's own import dominates; no model is built
    web = ROOT / info["web"]
    assert all((web / name).is_file() for name in ("wan22_moe.js", "expert_split.js", "worker_status.js"))
    assert not list(web.rglob("*.test.*")), "ComfyUI loads every .js under WEB_DIRECTORY as an extension"


def test_nodes_use_the_pack_copy_of_the_engine():
    sampler = sys.modules[PACK.__name__ + ".nodes.sampler"]
    assert sampler.Cancelled is engine("errors").Cancelled
    assert not sampler.Cancelled.__module__.startswith("wan22_core")


# ---------------------------------------------------------------------------------------------
# Node contracts


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_input_types_are_well_formed(name, runtime):
    cls = MAPPINGS[name]
    types = cls.INPUT_TYPES()
    assert set(types) <= {"required", "optional", "hidden"}
    assert (list(types["required"]), list(types.get("optional", {}))) == CONTRACT[name]
    for input_name, spec in input_spec(cls).items():
        assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, input_name
        kind, options = spec[0], spec[1] if len(spec) == 2 else {}
        assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
        if isinstance(kind, list):
            assert kind and all(isinstance(o, str) for o in kind), (input_name, kind)
            assert options.get("default", kind[0]) in kind, input_name
        elif kind in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"], input_name
            assert options.get("step", 1) > 0 and isinstance(options["default"], int if kind == "INT" else float)
        elif kind == "BOOLEAN":
            assert isinstance(options["default"], bool)
        elif kind == "STRING":
            assert isinstance(options.get("default", ""), str)
        else:
            assert kind.isupper(), f"{name}.{input_name}: socket types are upper case, got {kind!r}"
    assert cls.CATEGORY == "Wan2.2 MoE" and cls.DESCRIPTION and callable(getattr(cls, cls.FUNCTION))
    assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    assert len(getattr(cls, "OUTPUT_TOOLTIPS", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    assert PACK.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("Wan2.2 ")


def test_official_defaults_and_the_seed_widget():
    from wan22_core.config import DEFAULT_NEGATIVE_PROMPT

    spec = input_spec(MAPPINGS["Wan22MoESampler"])
    official = {"width": 1280, "height": 720, "frames": 81, "steps": 40, "cfg_high": 4.0, "cfg_low": 3.0,
                "boundary": 0.875, "shift": 12.0, "solver": "unipc", "denoise": 1.0}
    assert {name: spec[name][1]["default"] for name in official} == official
    assert spec["seed"][1]["control_after_generate"] is True and spec["seed"][1]["max"] == 2**64 - 1
    assert input_spec(MAPPINGS["Wan22TextEncode"])["negative"][1]["default"] == DEFAULT_NEGATIVE_PROMPT
    assert MAPPINGS["Wan22SaveVideo"].OUTPUT_NODE is True


def test_empty_model_folders_show_a_clear_no_files_option(tmp_path, monkeypatch):
    monkeypatch.setattr(ADAPTER, "runtime", ADAPTER.StandaloneRuntime(tmp_path / "empty", tmp_path / "out"))
    options = input_spec(MAPPINGS["Wan22MoEModelLoader"])["high_noise_model"][0]
    assert options == ["(no files in models/diffusion_models)"]
    with pytest.raises(ValueError, match=r"not found; put it into ComfyUI/models/diffusion_models/"):
        MAPPINGS["Wan22MoEModelLoader"]().load(options[0], options[0], "auto", "auto", "auto")


@pytest.mark.parametrize("name", ["../models/x.safetensors", "/etc/passwd", "a/../../b.safetensors",
                                  "C:\\models\\x.safetensors", "..\\x.safetensors", ""])
def test_file_names_cannot_leave_the_model_folders(name, runtime):
    with pytest.raises(ValueError, match=r"(no absolute path, no '\.\.')|non-empty"):
        MAPPINGS["Wan22VAELoader"]().load(name)


def test_files_in_subfolders_are_listed_and_found(runtime, models_dir, tmp_path):
    sub = tmp_path / "models"
    shutil.copytree(models_dir, sub)
    (sub / "vae" / "wan").mkdir()
    shutil.move(sub / "vae" / VAE, sub / "vae" / "wan" / VAE)
    runtime.models_dir = sub
    assert input_spec(MAPPINGS["Wan22VAELoader"])["vae_name"][0] == [f"wan/{VAE}"]
    (vae,) = MAPPINGS["Wan22VAELoader"]().load(f"wan/{VAE}")
    assert isinstance(vae, engine("models.vae").WanVAE)


# ---------------------------------------------------------------------------------------------
# Example workflows


def ui_to_api(workflow: dict) -> dict:
    """Convert a UI (LiteGraph) workflow to API format as the frontend's graphToPrompt does:
    widgets_values map onto the widget inputs in INPUT_TYPES order, and an INT with
    control_after_generate carries one extra UI-only value right after it."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):  # notes, muted, bypassed
            continue
        cls = MAPPINGS[node["type"]]
        values, inputs = iter(node.get("widgets_values", [])), {}
        for name, spec in input_spec(cls).items():
            options = spec[1] if len(spec) > 1 else {}
            if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES and not options.get("forceInput"):
                inputs[name] = next(values)
                if options.get("control_after_generate"):
                    next(values)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin), origin_slot]
        assert next(values, None) is None, f"node {node['id']} has more widgets_values than widget inputs"
        title = node.get("title") or PACK.NODE_DISPLAY_NAME_MAPPINGS[node["type"]]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    return prompt


@pytest.mark.parametrize("ui_path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_ui_workflow_converts_to_its_api_twin(ui_path, runtime):
    twin = WORKFLOWS / "api" / ui_path.name
    assert twin.is_file(), f"{ui_path.name} needs an API twin at {twin}"
    assert ui_to_api(json.loads(ui_path.read_text())) == json.loads(twin.read_text())


def ui_nodes(name: str) -> dict:
    """{type: node} of a UI example workflow (one node per type in ours)."""
    return {n["type"]: n for n in json.loads((WORKFLOWS / name).read_text())["nodes"]}


def model_files(nodes: dict) -> dict:
    return {m["name"]: m for n in nodes.values() for m in n.get("properties", {}).get("models", [])}


def test_ui_workflow_is_wired_with_official_defaults_and_comfy_org_files():
    from wan22_core.config import DEFAULT_NEGATIVE_PROMPT

    by_type = ui_nodes("wan22_t2v_a14b.json")
    assert by_type["Wan22MoESampler"]["widgets_values"][:9] == [1280, 720, 81, 40, 4.0, 3.0, 0.875, 12.0, "unipc"]
    assert by_type["Wan22MoEModelLoader"]["widgets_values"] == [HIGH, LOW, "auto", "auto", "auto", 20, False]
    assert by_type["Wan22TextEncode"]["widgets_values"][1] == DEFAULT_NEGATIVE_PROMPT
    files = model_files(by_type)
    assert set(files) == {HIGH, LOW, TEXT_ENCODER, VAE}
    assert all(m["url"].startswith("https://huggingface.co/Comfy-Org/") and m["url"].endswith(m["name"])
               for m in files.values())
    note = by_type["MarkdownNote"]["widgets_values"][0]
    for name, folder in ((HIGH, "diffusion_models"), (TEXT_ENCODER, "text_encoders"), (VAE, "vae")):
        assert name in note and f"models/{folder}/" in note


def test_swap_block_advice_is_the_memory_models():
    """The note's and the tooltip's swap_blocks numbers are memory.min_swap_blocks's, not a copy."""
    from wan22_core.config import A14B, FRAMES, HEIGHT, WIDTH
    from wan22_core.memory import GIB, min_swap_blocks

    need = {gib: min_swap_blocks(A14B.dit, FRAMES, HEIGHT, WIDTH, gib * GIB) for gib in (24, 32)}
    assert LOADERS.SWAP_BLOCKS_720P == need
    note = ui_nodes("wan22_t2v_a14b.json")["MarkdownNote"]["widgets_values"][0]
    assert f"`swap_blocks` {need[24]} (720p, bf16; {need[32]} on a 32 GB card)" in note
    tooltip = input_spec(MAPPINGS["Wan22MoEModelLoader"])["swap_blocks"][1]["tooltip"]
    assert f"about {need[24]} on a 24 GB card and {need[32]} on a 32 GB card" in tooltip
    gguf = {(gib, video, quant): min_swap_blocks(A14B.dit, FRAMES, *size, gib * GIB, gguf=quant)
            for gib, video, size in ((24, "720p", (HEIGHT, WIDTH)), (16, "480p", (480, 832)))
            for quant in ("Q8_0", "Q4_K_M")}
    assert (f"on 24 GB at 720p Q8_0 {gguf[24, '720p', 'Q8_0']} and Q4_K_M {gguf[24, '720p', 'Q4_K_M']}, on 16 GB "
            f"at 480p Q8_0 {gguf[16, '480p', 'Q8_0']} and Q4_K_M {gguf[16, '480p', 'Q4_K_M']}") in tooltip


@pytest.mark.parametrize("ui_path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_every_ui_workflow_has_its_thumbnail(ui_path):
    thumbnail = ui_path.with_suffix(".jpg")
    assert thumbnail.is_file() and thumbnail.read_bytes()[:3] == b"\xff\xd8\xff", "the template needs its thumbnail"


def test_multigpu_workflow_connects_the_config_to_the_sampler_and_the_decode():
    workflow = json.loads((WORKFLOWS / "wan22_t2v_a14b_multigpu.json").read_text())
    by_type = {n["type"]: n for n in workflow["nodes"]}
    config, sampler, decode = by_type["Wan22MultiGPUConfig"], by_type["Wan22MoESampler"], by_type["Wan22VAEDecode"]
    assert config["widgets_values"] == ["all", 0, 0, True, False, True]  # gpus, ulysses and ring auto, fsdp, no CFG split, batched CFG
    links = [link[3:] for link in workflow["links"] if link[1] == config["id"]]
    slots = {node["id"]: [i["name"] for i in node["inputs"]].index("parallel") for node in (sampler, decode)}
    assert links == [[node, slot, "WAN22_PARALLEL"] for node, slot in slots.items()]
    assert sampler["widgets_values"][:9] == [1280, 720, 81, 40, 4.0, 3.0, 0.875, 12.0, "unipc"]
    note = by_type["MarkdownNote"]["widgets_values"][0]
    assert "cpu:3" in note and "`ring_degree`" in note and "`6 GPUs: CFG 1 x Ulysses 2 x Ring 3`" in note
    assert engine("parallel").parallel_config("cpu:6", num_heads=40).plan.describe("GPU") in note  # the split it names


def test_4step_workflow_uses_the_lightx2v_loras_and_the_distilled_settings():
    from wan22_core.sampling.moe import HIGH as HIGH_EXPERT, select_expert
    from wan22_core.sampling.schedule import partial_schedule

    by_type = ui_nodes("wan22_t2v_a14b_4step_lora.json")
    lora, sampler = by_type["Wan22LoRA"], by_type["Wan22MoESampler"]
    assert lora["widgets_values"] == [LORA_HIGH, LORA_LOW, 1.0, 1.0, "merge"]
    steps, cfg_high, cfg_low, boundary, shift, solver = sampler["widgets_values"][3:9]
    assert (steps, cfg_high, cfg_low, shift, solver) == (4, 1.0, 1.0, 5.0, "euler")
    timesteps = partial_schedule(steps, shift, solver, 1.0).timesteps.tolist()
    assert [select_expert(t, boundary) == HIGH_EXPERT for t in timesteps] == [True, True, False, False]
    files = model_files(by_type)
    for name in (LORA_HIGH, LORA_LOW):  # where ComfyUI's own template downloads them from
        assert files[name]["directory"] == "loras" and files[name]["url"] == (
            f"https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/loras/{name}")
        assert name in by_type["MarkdownNote"]["widgets_values"][0]


@pytest.mark.parametrize("api_path", API_WORKFLOWS, ids=lambda p: p.name)
def test_api_workflow_runs_end_to_end_to_an_mp4(api_path, runtime):
    prompt = tiny_prompt(api_path)
    ui = run_prompt(prompt)
    (saved,) = [ui[node_id] for node_id in nodes_of(prompt, "Wan22SaveVideo")]
    (image,) = saved["images"]
    assert saved["animated"] == (True,) and image["type"] == "output" and image["filename"].endswith(".mp4")
    info = read_mp4_info(runtime.output_dir / image["subfolder"] / image["filename"])
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (5, 32, 32, 16.0)
    (sampler,) = nodes_of(prompt, "Wan22MoESampler")
    loras = [prompt[n]["inputs"][f"lora_{e}"] for n in nodes_of(prompt, "Wan22LoRA") for e in ("high", "low")]
    reported = ui[sampler]["lora_report"]  # with tiny LoRAs under the lightx2v names for the 4-step workflow
    assert [line.split(": ")[1].split(" x")[0] for line in reported] == loras


# ---------------------------------------------------------------------------------------------
# Sampler behaviour through the adapter


def load_all(text="a red fox in the snow"):
    (encoder,) = MAPPINGS["Wan22TextEncoderLoader"]().load(TEXT_ENCODER, "cpu", "auto")
    (embeds,) = MAPPINGS["Wan22TextEncode"]().encode(encoder, text, "")
    (model,) = MAPPINGS["Wan22MoEModelLoader"]().load(HIGH, LOW, "auto", "auto", "auto")
    (vae,) = MAPPINGS["Wan22VAELoader"]().load(VAE)
    return embeds, model, vae


def run_sampler(model, embeds, seed=7, **overrides) -> dict:
    """The sampler node's whole return value: {"ui": ..., "result": (LATENT,)}."""
    settings = dict(TINY_SETTINGS, cfg_high=4.0, cfg_low=3.0, boundary=0.875, shift=12.0, solver="unipc") | overrides
    return MAPPINGS["Wan22MoESampler"]().sample(model, embeds, seed=seed, **settings)


def sample(model, embeds, seed=7, **overrides) -> dict:
    (latent,) = run_sampler(model, embeds, seed, **overrides)["result"]
    return latent


# ComfyUI's Wan2.1 latent2rgb preview table (comfy/latent_formats.py, Wan21), copied here so the
# test does not read the values it checks from the code under test: [16 channels][R, G, B], bias.
COMFY_WAN21_RGB = [
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861]]
COMFY_WAN21_RGB_BIAS = [-0.1835, -0.0868, -0.3360]


def test_progress_and_previews_reach_the_adapter(models_dir, tmp_path, monkeypatch):
    """Each step's preview is ComfyUI's latent2rgb map of that step's denoised latent (first frame)."""
    fake = FakeComfyRuntime(models_dir, tmp_path)
    monkeypatch.setattr(ADAPTER, "runtime", fake)
    embeds, model, _ = load_all()
    start = {"samples": torch.zeros(2, 16, 2, 4, 4)}  # a native empty latent, batch of 2
    sample(model, embeds, latent=start)
    assert fake.totals == [2 * TINY_SETTINGS["steps"]]
    assert [value for value, _ in fake.updates] == list(range(1, 7))
    assert fake.freed >= 1  # ComfyUI's memory was freed before the experts were loaded

    pipeline, settings = engine("pipeline"), engine("config").SamplerSettings(steps=3)
    denoised = []  # the engine's clean-latent estimates of each video's steps, as the node ran them
    for offset, latent in enumerate(engine("models.vae").normalize_latent(start["samples"])):
        noise = pipeline.make_noise(7 + offset, 5, 32, 32)
        pipeline.denoise(model.experts(CPU)[0], embeds.positive, embeds.negative, noise, settings, latent=latent,
                         on_step=lambda info: denoised.append(info.denoised.clone()))
    factors, bias = torch.tensor(COMFY_WAN21_RGB), torch.tensor(COMFY_WAN21_RGB_BIAS)
    for (_, preview), z in zip(fake.updates, denoised, strict=True):
        rgb = torch.einsum("chw,cr->hwr", z[:, 0], factors) + bias  # roughly [-1, 1]
        expected = ((rgb + 1) / 2).clamp(0, 1) * 255
        assert preview.dtype == torch.uint8 and preview.shape == (4, 4, 3)
        assert (preview.float() - expected).abs().max() <= 0.5 + 1e-3  # rounding to uint8, and float order


def test_comfyui_interrupt_stops_sampling_within_one_step(models_dir, tmp_path, monkeypatch):
    fake = FakeComfyRuntime(models_dir, tmp_path, interrupt_after=2)
    monkeypatch.setattr(ADAPTER, "runtime", fake)
    embeds, model, _ = load_all()
    with pytest.raises(FakeInterrupt):
        sample(model, embeds, steps=10)
    assert [value for value, _ in fake.updates] == [1, 2]


def test_an_interrupt_raised_by_the_progress_hook_propagates(models_dir, tmp_path, monkeypatch):
    class HookInterrupts(FakeComfyRuntime):  # ComfyUI's progress hook raises the interrupt itself
        def update(self, value, preview=None):
            super().update(value, preview)
            raise FakeInterrupt()

    monkeypatch.setattr(ADAPTER, "runtime", HookInterrupts(models_dir, tmp_path))
    embeds, model, _ = load_all()
    with pytest.raises(FakeInterrupt):
        sample(model, embeds)


@pytest.fixture
def fake_comfyui(models_dir, tmp_path, monkeypatch):
    """ComfyUI's modules as the adapter uses them, recording calls; the adapter re-imported on them."""
    calls, state = [], {"interrupt_after": None, "bars": []}

    class ProgressBar:
        def __init__(self, total):
            self.total, self.updates = total, []
            state["bars"].append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.updates.append((value, preview))

    def interrupted():
        done = len(state["bars"][-1].updates) if state["bars"] else 0  # steps of the current run
        return state["interrupt_after"] is not None and done >= state["interrupt_after"]

    def throw_if_interrupted():
        if interrupted():
            raise FakeInterrupt()

    registry = {folder: ([str(models_dir / folder)], {".safetensors"}) for folder in ("diffusion_models", "vae",
                                                                                     "text_encoders", "loras")}

    def files(folder):
        paths, extensions = registry[folder]
        return {p.name: p for path in paths for p in Path(path).iterdir() if p.suffix in extensions}

    folder_paths = types.SimpleNamespace(
        folder_names_and_paths=registry, get_filename_list=lambda folder: sorted(files(folder)),
        get_full_path=lambda folder, name: str(files(folder)[name]) if name in files(folder) else None,
        get_output_directory=lambda: str(tmp_path / "comfy_output"))
    cpu = torch.device("cpu")
    model_management = types.SimpleNamespace(
        get_torch_device=lambda: cpu, text_encoder_device=lambda: cpu, vae_device=lambda: cpu,
        unet_offload_device=lambda: cpu, unload_all_models=lambda: calls.append("unload_all_models"),
        soft_empty_cache=lambda: calls.append("soft_empty_cache"), processing_interrupted=interrupted,
        throw_exception_if_processing_interrupted=throw_if_interrupted)
    preview_method = types.SimpleNamespace(value="auto")
    cli_args = types.SimpleNamespace(args=types.SimpleNamespace(preview_method=preview_method, preview_size=512))
    comfy = types.SimpleNamespace(model_management=model_management, cli_args=cli_args,
                                  utils=types.SimpleNamespace(ProgressBar=ProgressBar))
    prompt_server = types.SimpleNamespace(client_id="client-1", send_sync=lambda event, data, sid=None: calls.append(
        ("send_sync", event, data, sid)))
    server = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=prompt_server))
    for name, module in (("folder_paths", folder_paths), ("comfy", comfy), ("comfy.model_management", model_management),
                         ("comfy.utils", comfy.utils), ("comfy.cli_args", comfy.cli_args), ("server", server)):
        monkeypatch.setitem(sys.modules, name, module)
    importlib.reload(ADAPTER)
    yield calls, state
    monkeypatch.undo()
    importlib.reload(ADAPTER)
    assert isinstance(ADAPTER.runtime, ADAPTER.StandaloneRuntime)


def test_inside_comfyui_the_adapter_uses_comfyui(fake_comfyui, tmp_path):
    calls, state = fake_comfyui
    assert type(ADAPTER.runtime).__name__ == "ComfyRuntime"
    assert input_spec(MAPPINGS["Wan22VAELoader"])["vae_name"][0] == [VAE]
    embeds, model, vae = load_all()
    assert calls == []  # the text encoder ran on the CPU: nothing to free
    sample(model, embeds)
    assert calls[:2] == ["unload_all_models", "soft_empty_cache"]
    (bar,) = state["bars"]
    assert bar.total == 3 and [v for v, _ in bar.updates] == [1, 2, 3]
    kind, picture, size = bar.updates[0][1]
    assert (kind, picture.size, size) == ("JPEG", (4, 4), 512)

    state["interrupt_after"] = 2
    with pytest.raises(FakeInterrupt):  # ComfyUI's own exception, so ComfyUI reports "interrupted"
        sample(model, embeds, steps=10)
    assert [v for v, _ in state["bars"][-1].updates] == [1, 2]
    ui = MAPPINGS["Wan22SaveVideo"]().save(torch.rand(1, 16, 16, 3), 16.0, "wan22/video")["ui"]
    assert (tmp_path / "comfy_output" / "wan22" / ui["images"][0]["filename"]).is_file()

    ADAPTER.runtime.send_status("5", 1, 2, "step 2/3")  # to the client that queued the prompt
    assert calls[-1] == ("send_sync", "wan22moe.worker_status", {"node": "5", "rank": 1, "ranks": 2,
                                                                  "status": "step 2/3"}, "client-1")


def test_sampler_latent_is_comfyui_raw_space_and_native_decode_matches_ours(runtime):
    """ComfyUI keeps Wan latents raw (its latent format normalises only around the model), so our
    sampler outputs denormalised latents; decoding them as native VAEDecode would (raw into the
    VAE, i.e. normalise then our decode) gives the engine's own sample + decode."""
    vae_mod, pipeline = engine("models.vae"), engine("pipeline")
    embeds, model, vae = load_all()
    latent = sample(model, embeds, seed=11)
    raw = latent["samples"]
    assert raw.shape == (1, 16, 2, 4, 4) and raw.dtype == torch.float32

    settings = engine("config").SamplerSettings(steps=3)
    z = pipeline.denoise(model.experts(CPU)[0], embeds.positive, embeds.negative,
                         pipeline.make_noise(11, 5, 32, 32), settings)
    torch.testing.assert_close(raw[0], vae_mod.denormalize_latent(z[None])[0], rtol=0, atol=1e-5)
    assert not torch.allclose(raw[0], z, atol=1e-2)  # really raw space, not the engine's

    (native,) = MAPPINGS["Wan22VAEDecode"]().decode(vae, {"samples": raw}, False)
    ours = pipeline.decode_to_video(vae, z)
    assert native.shape == (5, 32, 32, 3)
    torch.testing.assert_close(native, ours, rtol=0, atol=1e-5)  # float32 round trip through mean/std


def test_batches_are_seeded_by_batch_index(runtime):
    embeds, model, _ = load_all()
    empty = torch.zeros(1, 16, 2, 4, 4)
    single = sample(model, embeds, seed=3, latent={"samples": empty})["samples"]
    batch = sample(model, embeds, seed=3, latent={"samples": empty.repeat(2, 1, 1, 1, 1)})["samples"]
    shifted = sample(model, embeds, seed=2, latent={"samples": empty, "batch_index": [1]})["samples"]
    torch.testing.assert_close(batch[:1], single, rtol=0, atol=0)
    torch.testing.assert_close(shifted, single, rtol=0, atol=0)  # seed 2 + batch_index 1 = seed 3
    assert not torch.allclose(batch[0], batch[1])


def test_latents_that_do_not_fit_are_refused_with_the_fix(runtime):
    embeds, model, _ = load_all()
    with pytest.raises(ValueError, match="set them to match the latent"):
        sample(model, embeds, latent={"samples": torch.zeros(1, 16, 3, 4, 4)})
    with pytest.raises(ValueError, match="Wan2.1 video latent"):
        sample(model, embeds, latent={"samples": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(ValueError, match="noise_mask"):
        sample(model, embeds, latent={"samples": torch.zeros(1, 16, 2, 4, 4), "noise_mask": torch.ones(1)})
    with pytest.raises(ValueError, match="frames must be 4k\\+1"):
        sample(model, embeds, frames=6)


def test_loaders_cache_by_file_and_options(runtime, models_dir, tmp_path):
    CACHE.clear()
    embeds, model, _ = load_all()
    sample(model, embeds)
    loads = CACHE.loads
    embeds, model, _ = load_all()  # a re-run with the same widgets reloads nothing
    sample(model, embeds)
    assert CACHE.loads == loads

    shutil.copy(models_dir / "diffusion_models" / LOW, models_dir / "diffusion_models" / "other_low.safetensors")
    try:
        (other,) = MAPPINGS["Wan22MoEModelLoader"]().load(HIGH, "other_low.safetensors", "auto", "auto", "auto")
        sample(other, embeds)
        assert CACHE.loads == loads + 1  # only the changed expert
        (fp16,) = MAPPINGS["Wan22MoEModelLoader"]().load(HIGH, "other_low.safetensors", "fp16", "auto", "auto")
        fp16.experts(CPU)
        assert CACHE.loads == loads + 3  # another dtype is another load of both
    finally:
        (models_dir / "diffusion_models" / "other_low.safetensors").unlink()


def test_fp8_weight_dtypes_store_fp8_and_pick_the_matmul(runtime):
    fp8 = engine("fp8")
    embeds, _, _ = load_all()
    for choice, matmul in (("fp8_e4m3fn", "dequant"), ("fp8_e4m3fn_fast", "auto")):
        (model,) = MAPPINGS["Wan22MoEModelLoader"]().load(HIGH, LOW, choice, "auto", "swap_experts")
        layers = [m for m in model.experts(CPU)[0].get("high").modules() if isinstance(m, fp8.FP8Linear)]
        assert layers and {(m.stored_weight().dtype, m.compute) for m in layers} == {(torch.float8_e4m3fn, matmul)}
    assert torch.isfinite(sample(model, embeds)["samples"]).all()


def test_gguf_files_are_listed_and_their_experts_stay_quantised(runtime):
    quant = engine("quant")
    spec = input_spec(MAPPINGS["Wan22MoEModelLoader"])
    assert set(GGUF_NAMES[:2]) <= set(spec["high_noise_model"][0]) and HIGH in spec["high_noise_model"][0]
    assert GGUF_NAMES[2] in input_spec(MAPPINGS["Wan22TextEncoderLoader"])["text_encoder"][0]
    (model,) = MAPPINGS["Wan22MoEModelLoader"]().load(*GGUF_NAMES[:2], "auto", "auto", "auto")
    layers = [m for m in model.experts(CPU)[0].get("low").modules() if isinstance(m, quant.GGUFLinear)]
    assert layers and {(m.weight.dtype, m.qtype.name) for m in layers} == {(torch.uint8, "Q8_0")}
    with pytest.raises(ValueError, match="is a GGUF expert: .*weight_dtype fp8 does not apply, choose auto"):
        MAPPINGS["Wan22MoEModelLoader"]().load(*GGUF_NAMES[:2], "fp8_e4m3fn", "auto", "auto")[0].experts(CPU)
    (encoder,) = MAPPINGS["Wan22TextEncoderLoader"]().load(GGUF_NAMES[2], "cpu", "auto")
    assert encoder.encoder.load_report.layout == "gguf"


def test_inside_comfyui_gguf_files_are_listed_from_every_expert_and_encoder_folder(models_dir, tmp_path, monkeypatch):
    """ComfyUI's folder lists filter by its extensions (no .gguf); the runtime's GGUF twins share
    each folder's path list: models/unet and models/clip included, and paths added later too."""
    root = tmp_path / "models"
    for sub in ("diffusion_models", "unet", "text_encoders", "clip"):
        (root / sub).mkdir(parents=True)
    shutil.copy(models_dir / "diffusion_models" / HIGH, root / "diffusion_models")
    shutil.copy(models_dir / "diffusion_models" / GGUF_NAMES[0], root / "diffusion_models")
    shutil.copy(models_dir / "diffusion_models" / GGUF_NAMES[1], root / "unet")
    shutil.copy(models_dir / "text_encoders" / GGUF_NAMES[2], root / "clip")
    extensions = {".safetensors", ".pth"}  # ComfyUI's supported_pt_extensions, in short
    registry = {"diffusion_models": ([str(root / "unet"), str(root / "diffusion_models")], extensions),
                "text_encoders": ([str(root / "text_encoders")], extensions)}

    def listed(folder):
        paths, allowed = registry[folder]
        return sorted(p.name for path in paths for p in Path(path).iterdir() if not allowed or p.suffix in allowed)

    def full_path(folder, name):
        return next((str(Path(p) / name) for p in registry[folder][0] if name in listed(folder) and
                     (Path(p) / name).is_file()), None)

    fake = types.SimpleNamespace(folder_names_and_paths=registry, get_filename_list=listed, get_full_path=full_path)
    monkeypatch.setattr(ADAPTER, "folder_paths", fake)
    monkeypatch.setattr(ADAPTER, "runtime", ADAPTER.ComfyRuntime())
    registry["text_encoders"][0].append(str(root / "clip"))  # as extra_model_paths.yaml adds a path later
    assert input_spec(MAPPINGS["Wan22MoEModelLoader"])["low_noise_model"][0] == sorted([HIGH, *GGUF_NAMES[:2]])
    assert input_spec(MAPPINGS["Wan22TextEncoderLoader"])["text_encoder"][0] == [GGUF_NAMES[2]]
    assert listed("diffusion_models") == [HIGH]  # ComfyUI's own list is unchanged
    (model,) = MAPPINGS["Wan22MoEModelLoader"]().load(*GGUF_NAMES[:2], "auto", "auto", "auto")
    assert model.low_noise == root / "unet" / GGUF_NAMES[1]


def test_fp8_scaled_files_stay_fp8_with_auto(tmp_path, monkeypatch):
    fp8_dir = make_tiny(tmp_path / "fp8", "comfy-fp8")
    monkeypatch.setattr(ADAPTER, "runtime", ADAPTER.StandaloneRuntime(fp8_dir, tmp_path / "out"))
    high, low = (f"wan2.2_t2v_{n}_noise_14B_fp8_scaled.safetensors" for n in ("high", "low"))
    (model,) = MAPPINGS["Wan22MoEModelLoader"]().load(high, low, "auto", "auto", "auto")
    weights = {t.dtype for t in model.experts(CPU)[0].get("low").state_dict().values()}
    assert torch.float8_e4m3fn in weights


def test_save_video_never_overwrites_and_reports_the_file(runtime):
    frames = torch.rand(5, 16, 16, 3)
    save = MAPPINGS["Wan22SaveVideo"]()
    first = save.save(frames, 16.0, "wan22/clip")["ui"]["images"][0]
    second = save.save(frames, 8.0, "wan22/clip")["ui"]["images"][0]
    assert (first["filename"], second["filename"]) == ("clip_00001.mp4", "clip_00002.mp4")
    assert first["subfolder"] == "wan22" and first["type"] == "output"
    assert read_mp4_info(runtime.output_dir / "wan22" / "clip_00002.mp4")["fps"] == 8.0
    with pytest.raises(ValueError, match="inside the output folder"):
        save.save(frames, 16.0, "../outside")


# ---------------------------------------------------------------------------------------------
# Multi-GPU: the sampler's parallel input drives the worker group (2 CPU ranks on gloo)


def multigpu_config(gpus="cpu:2", ulysses_degree=0, fsdp=True, cfg_parallel=False, ring_degree=0):
    (config,) = MAPPINGS["Wan22MultiGPUConfig"]().configure(gpus, ulysses_degree, ring_degree, fsdp,
                                                            cfg_parallel)["result"]
    return config


def test_the_multigpu_node_shows_what_one_gpu_of_its_plan_needs():
    """The node's `ui` memory line: its split and memory.rank_peak_bytes for A14B per GPU (the web
    extension shows it); the batch_cfg input halves the activations; a ring's K/V blocks count."""
    node = MAPPINGS["Wan22MultiGPUConfig"]()
    batched, unbatched = (node.configure("cpu:2", 0, 0, True, False, batch_cfg)["ui"]["memory"]
                          for batch_cfg in (True, False))
    assert batched == ["2 CPU ranks: CFG 1 x Ulysses 2 x Ring 1", "720p x 81 per GPU: bf16 39.1 GiB, fp8 25.3 GiB",
                       "480p x 81 per GPU: bf16 34.1 GiB, fp8 20.4 GiB"]
    assert unbatched[1] == "720p x 81 per GPU: bf16 34.7 GiB, fp8 21.0 GiB"  # docs/multigpu.md's table, 2 GPUs
    ring = node.configure("cpu:3", 0, 0, True, False, False)["ui"]["memory"]  # 3 GPUs: Ring 3
    assert ring[:2] == ["3 CPU ranks: CFG 1 x Ulysses 1 x Ring 3", "720p x 81 per GPU: bf16 26.6 GiB, fp8 17.2 GiB"]


def current_group():
    return engine("parallel").WorkerGroup.current()


@pytest.fixture
def fake(models_dir, tmp_path, monkeypatch):
    rt = FakeComfyRuntime(models_dir, tmp_path)
    monkeypatch.setattr(ADAPTER, "runtime", rt)
    return rt


def test_sampler_on_the_worker_group_equals_in_process(fake):
    embeds, model, _ = load_all()
    here = sample(model, embeds)["samples"]
    fake.updates.clear()
    there = sample(model, embeds, parallel=multigpu_config(), unique_id="5")["samples"]
    assert rel_l2(there, here) <= TOL
    assert [value for value, _ in fake.updates] == [1, 2, 3]  # rank 0's progress, one update per step
    assert all(p.dtype == torch.uint8 and p.shape == (4, 4, 3) for _, p in fake.updates)  # and its previews
    statuses = {(rank, status) for _, rank, _, status in fake.statuses}
    assert {(0, "ready"), (1, "ready"), (0, "step 3/3")} <= statuses
    assert {(node, ranks) for node, _, ranks, _ in fake.statuses} == {("5", 2)}
    loads = CACHE.loads
    sample(model, embeds)
    assert CACHE.loads == loads + 2  # the group run released this process's copy of the experts


def test_vae_decode_on_the_worker_group_equals_in_process_and_logs_the_stages(fake, caplog):
    caplog.set_level(logging.INFO)
    embeds, model, vae = load_all()
    latent = sample(model, embeds, parallel=multigpu_config(), unique_id="5")
    decode = MAPPINGS["Wan22VAEDecode"]().decode
    (here,) = decode(vae, latent, False)
    fake.updates, fake.totals = [], []
    (there,) = decode(vae, latent, False, parallel=multigpu_config())
    assert rel_l2(there, here) <= TOL
    assert fake.totals == [2] and [value for value, _ in fake.updates] == [1, 2]  # one update per latent frame
    assert ("5", 0, 2, "decoding 2/2") in fake.statuses  # on the sampler's status line
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wan22 worker group (2 ranks)")]
    assert "sampling" in lines[0] and "decode" in lines[-1], lines
    (elsewhere,) = decode(vae, latent, False, parallel=multigpu_config(fsdp=False))  # no group runs it: here
    assert torch.equal(elsewhere, here) and "decoding in this process" in caplog.records[-1].getMessage()


def test_the_group_stays_up_across_prompts_and_interrupts(fake):
    embeds, model, _ = load_all()
    sample(model, embeds, parallel=multigpu_config())
    pids = current_group().pids
    fake.interrupt_after, fake.updates = 2, []
    with pytest.raises(FakeInterrupt):  # ComfyUI's interrupt, agreed by both ranks at the same step
        sample(model, embeds, steps=10, parallel=multigpu_config())
    assert [value for value, _ in fake.updates] == [1, 2]
    fake.interrupt_after = None
    sample(model, embeds, seed=8, parallel=multigpu_config())
    assert current_group().pids == pids  # the same processes served all three prompts


def test_a_changed_config_rebuilds_the_group(fake):
    embeds, model, _ = load_all()
    sample(model, embeds, parallel=multigpu_config())
    old = current_group().pids
    sample(model, embeds, parallel=multigpu_config(fsdp=False))  # each rank holds whole experts
    assert current_group().pids != old and not children_of(os.getpid()) & set(old)


def test_invalid_multigpu_settings_fail_before_any_process_starts(fake, monkeypatch):
    config_node, before = MAPPINGS["Wan22MultiGPUConfig"](), children_of(os.getpid())
    with pytest.raises(ValueError, match=r"ulysses degree 3 does not divide the 40 attention heads; "
                                         r"valid degrees: 1, 2, 4, 5, 8, 10, 20, 40"):
        config_node.configure("cpu:3", 3, 0, True, False)
    with pytest.raises(ValueError, match="cfg_parallel needs an even number of ranks"):
        config_node.configure("cpu:3", 0, 0, True, True)
    with pytest.raises(ValueError, match="is not 'all', a list of GPU indices"):
        config_node.configure("gpu0", 0, 0, True, False)
    with pytest.raises(ValueError, match=r"3 ranks cannot be split into cfg_parallel 1 x ulysses 1 x ring 2 = 2; "
                                         r"valid ring degrees with ulysses 1: 1, 3"):
        config_node.configure("cpu:3", 0, 2, True, False)
    embeds, model, _ = load_all()
    eight = multigpu_config("cpu:8", 8)  # fine for A14B's 40 heads, not for the tiny model's 4
    with pytest.raises(ValueError, match="ulysses degree 8 does not divide the 4 attention heads"):
        sample(model, embeds, parallel=eight)
    loader = MAPPINGS["Wan22MoEModelLoader"]()
    (model_with,) = loader.load(HIGH, LOW, "auto", "auto", "swap_experts", 20, False)
    with pytest.raises(ValueError, match=re.escape("not on the multi-GPU path: offload='swap_experts' (the ranks "
                                                   "place the experts themselves")):  # the torchrun CLI's rule
        sample(model_with, embeds, parallel=multigpu_config())
    # fp8 weights and compile go to the ranks as they are (nothing ignored; the group runs them:
    # test_fp8_shards.py); compile without a toolchain warns and runs eager, as on one GPU
    for weight_dtype, compile in (("fp8_e4m3fn", True), ("fp8_e4m3fn_fast", False)):
        (model_with,) = loader.load(HIGH, LOW, weight_dtype, "auto", "auto", 20, compile)
        spec = sys.modules[PACK.__name__ + ".nodes.parallel"].model_spec(model_with, multigpu_config())
        toolchain = engine("optimize").compile_toolchain_problem(CPU) is None
        assert (spec.weight_dtype, spec.compile) == (weight_dtype, compile and toolchain)
    with pytest.raises(ValueError, match=r"ulysses 2 x ring 1 = 2 sequence ranks but the video has only 1 tokens"):
        sample(model, embeds, frames=1, width=16, height=16, parallel=multigpu_config())
    assert children_of(os.getpid()) == before


def test_a_dead_rank_is_a_clear_error_and_the_status_line_says_error(fake):
    embeds, model, _ = load_all()
    sample(model, embeds, parallel=multigpu_config(), unique_id="5")
    group = current_group()

    def kill_rank_1(info):
        if info.index == 0:
            os.kill(group.pids[1], signal.SIGKILL)

    fake.progress_bar = lambda total: types.SimpleNamespace(update=lambda value, preview=None: kill_rank_1(
        types.SimpleNamespace(index=value - 1)))
    error = engine("parallel").WorkerGroupError
    with pytest.raises(error, match=r"rank 1 died \(killed by signal SIGKILL\).*the next run starts a fresh one"):
        sample(model, embeds, steps=10, parallel=multigpu_config(), unique_id="5")
    assert fake.statuses[-1] == ("5", 1, 2, "error")
    assert current_group() is None and not children_of(os.getpid()) & set(group.pids)


# ---------------------------------------------------------------------------------------------
# LoRA


def lora_node(model, high=LORA_HIGH, low=LORA_LOW, strength_high=1.0, strength_low=1.0, mode="merge"):
    (out,) = MAPPINGS["Wan22LoRA"]().add(model, high, low, strength_high, strength_low, mode)
    return out


def count_base_reads(monkeypatch) -> Counter:
    """Every open() of a base expert file, by name (headers and tensors are both read through it)."""
    reads, real_open = Counter(), builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name in (HIGH, LOW):
            reads[Path(file).name] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return reads


def test_changing_loras_and_strengths_reads_no_base_checkpoint(runtime, monkeypatch):
    CACHE.clear()
    reads = count_base_reads(monkeypatch)
    embeds, model, _ = load_all()
    plain = sample(model, embeds)["samples"]
    assert reads[HIGH] and reads[LOW]  # the counter sees the first load
    reads.clear()
    latents = {(mode, s): sample(lora_node(model, strength_high=s, mode=mode), embeds)["samples"]
               for mode in ("merge", "unmerged") for s in (1.0, 0.5)}
    without = sample(model, embeds)["samples"]  # the LoRAs taken out again
    assert reads == Counter(), "a LoRA or strength change re-read a base checkpoint"
    assert rel_l2(latents["merge", 1.0], plain) > 1e-2 and rel_l2(latents["merge", 0.5], latents["merge", 1.0]) > 1e-3
    for strength in (1.0, 0.5):  # merged into the weights == run beside the layers
        assert rel_l2(latents["unmerged", strength], latents["merge", strength]) <= TOL
    assert rel_l2(without, plain) <= TOL  # un-merging restores the base weights


def test_the_sampler_reports_what_each_lora_patched(runtime, models_dir):
    tiny = write_tiny_loras(models_dir)  # the same files again (same seeds), to know what they hold
    embeds, model, _ = load_all()
    chained = lora_node(lora_node(model), high=STYLE_LORA, low="None", strength_high=0.5)
    lines = run_sampler(chained, embeds)["ui"]["lora_report"]
    patched = {name: len({f"{m}.weight" for m in t.low_rank} | set(t.diffs)) for name, t in tiny.items()}
    assert lines == [f"high-noise: {LORA_HIGH} x1, {patched[LORA_HIGH]} parameters patched",
                     f"high-noise: {STYLE_LORA} x0.5, {patched[STYLE_LORA]} parameters patched",
                     f"low-noise: {LORA_LOW} x1, {patched[LORA_LOW]} parameters patched"]
    assert run_sampler(model, embeds)["ui"]["lora_report"] == []  # cleared when the LoRAs are gone


def test_lora_chains_and_their_checks(runtime, models_dir):
    _, model, _ = load_all()
    assert lora_node(model, "None", "None", mode="unmerged") is model  # nothing to add
    chained = lora_node(lora_node(model, low="None"), high="None", low=STYLE_LORA, strength_low=0.3)
    assert [(s.path.name, s.strength) for s in chained.loras_high] == [(LORA_HIGH, 1.0)]
    assert [(s.path.name, s.strength) for s in chained.loras_low] == [(STYLE_LORA, 0.3)]
    with pytest.raises(ValueError, match="lora_mode 'unmerged' differs from the 'merge' of an earlier Wan22LoRA"):
        lora_node(chained, mode="unmerged")
    assert input_spec(MAPPINGS["Wan22LoRA"])["lora_high"][0] == ["None", *sorted([LORA_HIGH, LORA_LOW, STYLE_LORA])]
    with pytest.raises(ValueError, match=r"loras file 'missing.safetensors' was not found; put it into "
                                         r"ComfyUI/models/loras/"):
        lora_node(model, high="missing.safetensors")


def test_a_lora_that_fits_nothing_fails_clearly_and_keeps_the_cached_experts(runtime, models_dir):
    from safetensors.torch import save_file

    save_file({"double_blocks.0.img_attn.qkv.lora_down.weight": torch.zeros(4, 8),
               "double_blocks.0.img_attn.qkv.lora_up.weight": torch.zeros(8, 4)},
              str(models_dir / "loras" / "flux_lora.safetensors"))
    try:
        embeds, model, _ = load_all()
        plain = sample(model, embeds)["samples"]
        loads = CACHE.loads
        with pytest.raises(engine("lora").LoraError, match="flux_lora.safetensors matches nothing .* another "
                                                           "model family"):
            sample(lora_node(model, high="flux_lora.safetensors", low="None"), embeds)
        torch.testing.assert_close(sample(model, embeds)["samples"], plain, rtol=0, atol=0)
        assert CACHE.loads == loads  # the experts were left as they were, not reloaded
    finally:
        (models_dir / "loras" / "flux_lora.safetensors").unlink()


def test_the_step_cache_reports_the_passes_run_over_the_batch_and_off_reports_nothing(runtime):
    embeds, model, _ = load_all()
    batch = {"samples": torch.zeros(2, 16, 2, 4, 4)}
    cached = run_sampler(model, embeds, steps=12, step_cache=0.2, latent=batch)
    (line,) = cached["ui"]["step_cache"]  # one line for the batch: 2 videos of 12 steps
    run = int(re.fullmatch(r"(\d+) of 24 model passes run", line).group(1))
    assert run < 24

    ran = []  # the engine's own count for the same two videos
    for offset, start in enumerate(engine("models.vae").normalize_latent(batch["samples"])):
        engine("pipeline").denoise(model.experts(CPU)[0], embeds.positive, embeds.negative,
                                   engine("pipeline").make_noise(7 + offset, 5, 32, 32),
                                   engine("config").SamplerSettings(steps=12, step_cache=0.2), latent=start,
                                   on_step=lambda info: ran.append(info.model_ran))
    assert sum(ran) == run
    exact = run_sampler(model, embeds, steps=12, latent=batch)
    assert exact["ui"]["step_cache"] == []  # off (the default): no line
    assert rel_l2(cached["result"][0]["samples"], exact["result"][0]["samples"]) > 0


def test_the_step_cache_on_the_worker_group_equals_in_process(fake):
    embeds, model, _ = load_all()
    here = run_sampler(model, embeds, steps=12, step_cache=0.2)
    there = run_sampler(model, embeds, steps=12, step_cache=0.2, parallel=multigpu_config())
    assert here["ui"]["step_cache"] != ["12 of 12 model passes run"]  # some passes reused
    assert there["ui"]["step_cache"] == here["ui"]["step_cache"]  # rank 0's step messages carry model_ran
    assert rel_l2(there["result"][0]["samples"], here["result"][0]["samples"]) <= TOL


def test_loras_on_the_worker_group_equal_in_process(fake):
    embeds, model, _ = load_all()
    with_lora = lora_node(model, strength_low=0.5)
    here = run_sampler(with_lora, embeds)
    there = run_sampler(with_lora, embeds, parallel=multigpu_config())
    assert rel_l2(there["result"][0]["samples"], here["result"][0]["samples"]) <= TOL
    assert there["ui"]["lora_report"] == here["ui"]["lora_report"]  # the same reports from the ranks' merge


# ---------------------------------------------------------------------------------------------
# Loader options: attention backends, block swap, compile


def test_attention_choices_are_the_engine_backends_and_a_missing_package_is_named(runtime, monkeypatch):
    attention = engine("models.attention")
    assert input_spec(MAPPINGS["Wan22MoEModelLoader"])["attention"][0] == list(attention.BACKENDS)
    (model,) = MAPPINGS["Wan22MoEModelLoader"]().load(HIGH, LOW, "auto", "sdpa", "auto")
    kernels = [m for m in model.experts(CPU)[0].get("high").modules() if isinstance(m, attention.AttentionKernel)]
    assert kernels and {k.backend for k in kernels} == {"sdpa"}
    hide_package(monkeypatch, "sageattention")  # missing here, whatever this machine has installed
    with pytest.raises(ValueError, match="attention backend 'sage' is selected but its module 'sageattention' is "
                                         "not installed .* or choose 'sdpa'"):
        MAPPINGS["Wan22MoEModelLoader"]().load(HIGH, LOW, "auto", "sage", "auto")


def test_block_swap_samples_the_same_latent_and_checks_the_block_count(runtime):
    embeds, model, _ = load_all()
    loader = MAPPINGS["Wan22MoEModelLoader"]()
    (swapped,) = loader.load(HIGH, LOW, "auto", "auto", "block_swap", 1)
    pair, _ = swapped.experts(CPU)
    assert (pair.swap_blocks, pair.keep_both) == (1, False)
    torch.testing.assert_close(sample(swapped, embeds)["samples"], sample(model, embeds)["samples"], rtol=0, atol=0)
    (ignored,) = loader.load(HIGH, LOW, "auto", "auto", "none", 30)  # swap_blocks counts only with block_swap
    assert ignored.experts(CPU)[0].swap_blocks == 0
    too_many = r"swap_blocks must be an integer between 0 and 2 \(the blocks of one expert\), got 3"
    with pytest.raises(ValueError, match=too_many):  # the tiny experts have 2 blocks: found from the headers
        loader.load(HIGH, LOW, "auto", "auto", "block_swap", 3)
    with pytest.raises(ValueError, match=too_many):  # a spec made without the loader: still checked before sampling
        sample(dataclasses.replace(swapped, options=dataclasses.replace(swapped.options, swap_blocks=3)), embeds)


def test_block_swap_without_blocks_is_refused_with_the_engines_message(runtime):
    """It used to run as swap_experts without a word; the CLI refuses it with the same text."""
    with pytest.raises(ValueError) as core:
        engine("offload").expert_pair_options("block_swap", 0, False, TINY.dit.num_layers)
    with pytest.raises(ValueError) as node:
        MAPPINGS["Wan22MoEModelLoader"]().load(HIGH, LOW, "auto", "auto", "block_swap", 0)
    assert str(node.value) == str(core.value)
    assert str(core.value).startswith("offload='block_swap' needs swap_blocks between 1 and 2")
    assert input_spec(MAPPINGS["Wan22MoEModelLoader"])["offload"][0] == list(engine("offload").OFFLOAD_CHOICES)


def test_compile_runs_once_per_loaded_expert_and_changing_it_reloads(runtime, monkeypatch):
    compiled = []
    monkeypatch.setattr(engine("experts"), "compile_blocks",
                        lambda model, device: compiled.append((model, device)) or None)
    CACHE.clear()
    loader = MAPPINGS["Wan22MoEModelLoader"]()
    (model,) = loader.load(HIGH, LOW, "auto", "auto", "auto", 20, True)
    first, _ = model.experts(CPU)
    model.experts(CPU)
    assert [(m, d) for m, d in compiled] == [(first.get("high"), CPU), (first.get("low"), CPU)]
    loads = CACHE.loads
    (eager,) = loader.load(HIGH, LOW, "auto", "auto", "auto", 20, False)
    eager.experts(CPU)
    assert CACHE.loads == loads + 2 and len(compiled) == 2
    with pytest.raises(ValueError, match="compile and offload='block_swap' do not combine"):
        loader.load(HIGH, LOW, "auto", "auto", "block_swap", 1, True)


# ---------------------------------------------------------------------------------------------
# Multi-GPU with any rank count: ring attention and replicas (3 CPU ranks; last, as they rebuild the group)


def test_three_ranks_run_ring_attention_and_the_sampler_reports_the_split(fake):
    """gpus cpu:3 with both degrees auto: 3 does not divide the heads, so the ring takes all three;
    8 tokens do not divide by 3 either (the padded keys stay masked)."""
    embeds, model, _ = load_all()
    here = sample(model, embeds)["samples"]
    there = run_sampler(model, embeds, parallel=multigpu_config("cpu:3"))
    assert rel_l2(there["result"][0]["samples"], here) <= TOL
    assert there["ui"]["parallel_split"] == ["3 CPU ranks: CFG 1 x Ulysses 1 x Ring 3"]
    assert (current_group().plan.ulysses, current_group().plan.ring) == (1, 3)


def test_a_batch_runs_side_by_side_on_replicas_and_is_saved_as_one_mp4_each(fake):
    """ulysses 1 x ring 1 on 3 ranks: 3 replicas (FSDP over all three) for 2 videos, so the third
    replica repeats one and drops it; the same two videos as one after another in this process."""
    embeds, model, vae = load_all()
    here = sample(model, embeds, videos=2)["samples"]
    assert torch.equal(here[1], sample(model, embeds, seed=8)["samples"][0])  # the second video is seed + 1
    fake.updates.clear()
    there = run_sampler(model, embeds, videos=2, parallel=multigpu_config("cpu:3", ulysses_degree=1, ring_degree=1))
    assert rel_l2(there["result"][0]["samples"], here) <= TOL and not torch.equal(here[0], here[1])
    assert there["ui"]["parallel_split"] == ["3 CPU ranks: CFG 1 x Ulysses 1 x Ring 1 x 3 replicas, one video each"]
    assert [value for value, _ in fake.updates] == [1, 2, 3]  # one round: both videos at once
    (frames,) = MAPPINGS["Wan22VAEDecode"]().decode(vae, there["result"][0], False)
    saved = MAPPINGS["Wan22SaveVideo"]().save(frames, 16.0, "wan22/batch", videos=2)["ui"]["images"]
    assert [image["filename"] for image in saved] == ["batch_00001.mp4", "batch_00002.mp4"]
    for image in saved:
        assert read_mp4_info(fake.output_dir / "wan22" / image["filename"])["frames"] == TINY_SIZE["frames"]
    with pytest.raises(ValueError, match="10 frames do not split into videos=3 videos"):
        MAPPINGS["Wan22SaveVideo"]().save(frames, 16.0, "wan22/batch", videos=3)
    with pytest.raises(ValueError, match="with a latent connected its batch decides"):
        sample(model, embeds, videos=2, latent=there["result"][0])
