"""A stand-in for the part of ComfyUI's HTTP API that its frontend reads at start-up.

Serves one unpacked `comfyui_frontend_package` (its `static` folder) plus our pack the way a
ComfyUI 0.3.64 server (server.py, app/custom_node_manager.py) would with the pack in
custom_nodes/wan22-moe: `/object_info` computed from our node classes as server.py's node_info()
computes it (plus placeholders for the core loaders the frontend looks up, see CORE_LOADERS),
`/extensions` listing the frontend's core extensions and our web/js files (served under
/extensions/wan22-moe/), `/workflow_templates` with example_workflows/, settings and user data
kept in memory, a websocket that greets with the queue status and can push events (`broadcast`),
and empty answers for the queue, history, models and the rest. Everything is also reachable under
/api, as in ComfyUI. It runs no prompts: execution is the real-server smoke's job
(scripts/comfyui_smoke.py).
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sys
import threading
import uuid
from pathlib import Path

try:
    from aiohttp import web
except ImportError:  # the `browser` extra; test_nodes.py imports only import_pack from here
    web = None

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "wan22-moe"  # the folder name ComfyUI sees under custom_nodes/
WEB_DIR = ROOT / "web" / "js"  # __init__.py's WEB_DIRECTORY
WORKFLOWS = ROOT / "example_workflows"


def import_pack():
    """Import the repository root the way ComfyUI's load_custom_node does: by file path, under
    the folder path (dots mangled) as module name, so only relative imports can work."""
    name = str(ROOT).replace(".", "_x_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def node_info(name: str, cls, display_names: dict) -> dict:
    """One /object_info entry for a V1 node class, with the keys and defaults of ComfyUI's server.py
    node_info(); the loader sets python_module to custom_nodes.<folder>."""
    inputs = cls.INPUT_TYPES()
    info = {
        "input": inputs,
        "input_order": {section: list(spec) for section, spec in cls.INPUT_TYPES().items()},
        "output": cls.RETURN_TYPES,
        "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
        "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
        "name": name,
        "display_name": display_names.get(name, name),
        "description": getattr(cls, "DESCRIPTION", ""),
        "python_module": f"custom_nodes.{PACK_NAME}",
        "category": getattr(cls, "CATEGORY", "sd"),
        "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
    }
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = cls.OUTPUT_TOOLTIPS
    for flag, key in (("DEPRECATED", "deprecated"), ("EXPERIMENTAL", "experimental")):
        if getattr(cls, flag, False):
            info[key] = True
    if hasattr(cls, "API_NODE"):
        info["api_node"] = cls.API_NODE
    return info


# Core loaders that frontend 1.27.10 maps model folders to at start-up (its modelToNodeStore);
# without their definitions it throws while registering any node with a `vae_name`, `lora_name`
# or `ckpt_name` combo. A real server always has them; here each is a placeholder with that one input.
CORE_LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "ImageOnlyCheckpointLoader": "ckpt_name",
                "LoraLoader": "lora_name", "LoraLoaderModelOnly": "lora_name", "VAELoader": "vae_name",
                "ControlNetLoader": "control_net_name", "UNETLoader": "unet_name",
                "UpscaleModelLoader": "model_name", "StyleModelLoader": "style_model", "GLIGENLoader": "gligen_name"}


def core_placeholder(name: str, key: str) -> dict:
    return {"input": {"required": {key: [[]]}}, "input_order": {"required": [key]}, "output": [],
            "output_is_list": [], "output_name": [], "name": name, "display_name": name,
            "description": "stand-in placeholder", "python_module": "nodes", "category": "loaders",
            "output_node": False}


def object_info() -> dict:
    """/object_info: our pack's nodes, as JSON text carries them (tuples become lists), and the
    core loader placeholders."""
    pack = import_pack()
    ours = {name: node_info(name, cls, pack.NODE_DISPLAY_NAME_MAPPINGS)
            for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    return {**{name: core_placeholder(name, key) for name, key in CORE_LOADERS.items()}, **json.loads(json.dumps(ours))}


def extension_urls(static_root: Path) -> list[str]:
    """/extensions: the frontend's own extensions/**/*.js, then ours under /extensions/<pack>/."""
    core = ["/" + p.relative_to(static_root).as_posix() for p in sorted((static_root / "extensions").rglob("*.js"))]
    ours = [f"/extensions/{PACK_NAME}/{p.relative_to(WEB_DIR).as_posix()}" for p in sorted(WEB_DIR.rglob("*.js"))]
    return core + ours


# Fixed answers of a fresh single-user ComfyUI with an empty queue and no models.
QUEUE_INFO = {"exec_info": {"queue_remaining": 0}}
EMPTY_ANSWERS = {
    "/embeddings": [], "/models": [], "/experiment/models": [], "/i18n": {}, "/history": {},
    "/templates/index.json": [],  # core templates (the comfyui-workflow-templates package): none
    "/queue": {"queue_running": [], "queue_pending": []}, "/prompt": QUEUE_INFO,
    "/users": {"storage": "server", "migrated": True}, "/userdata": [], "/v2/userdata": [],
    "/features": {"supports_preview_metadata": False, "max_upload_size": 100 * 1024 * 1024},
    "/system_stats": {"system": {"os": "posix", "ram_total": 0, "ram_free": 0, "comfyui_version": "0.3.64",
                                 "python_version": sys.version, "pytorch_version": "", "embedded_python": False,
                                 "argv": ["main.py"]}, "devices": []},
}


class StandInServer:
    """aiohttp on 127.0.0.1 (port chosen by the OS) in a thread of its own; a context manager.
    `broadcast` pushes a websocket message to every connected page, as ComfyUI's send_sync does."""

    def __init__(self, static_root: Path):
        self.static_root = static_root
        self.settings: dict = {}
        self.userdata: dict[str, bytes] = {}
        self.url = ""
        self._sockets: set = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="comfy-standin", daemon=True)
        self._runner = None
        self._object_info: dict = {}

    def __enter__(self) -> StandInServer:
        self._thread.start()
        try:
            self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    async def _stop(self) -> None:
        for ws in list(self._sockets):  # open pages would hold the shutdown up
            await ws.close()
        await self._runner.cleanup()

    def broadcast(self, event: str, data: dict) -> None:
        message = json.dumps({"type": event, "data": data})
        asyncio.run_coroutine_threadsafe(self._send_all(message), self._loop).result(timeout=30)

    async def _send_all(self, message: str) -> None:
        for ws in list(self._sockets):
            await ws.send_str(message)

    async def _start(self) -> str:
        self._object_info = object_info()
        app = web.Application()
        app.add_routes([web.route("*", "/{path:.*}", self._handle)])
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))  # a free port, chosen by the OS
        await web.SockSite(self._runner, listener).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    async def _handle(self, request):
        path = request.path.removeprefix("/api") if request.path.startswith("/api/") else request.path
        if path == "/ws":
            return await self._websocket(request)
        if request.method == "POST":
            return await self._post(request, path)
        if path == "/":
            return web.FileResponse(self.static_root / "index.html")
        if path == "/object_info":
            return web.json_response(self._object_info)
        if path.startswith("/object_info/"):
            name = path.removeprefix("/object_info/")
            return web.json_response({name: self._object_info[name]} if name in self._object_info else {})
        if path == "/extensions":
            return web.json_response(extension_urls(self.static_root))
        if path == "/workflow_templates":
            return web.json_response({PACK_NAME: sorted(p.stem for p in WORKFLOWS.glob("*.json"))})
        if path == "/settings":
            return web.json_response(self.settings)
        if path.startswith("/settings/"):
            return web.json_response(self.settings.get(path.removeprefix("/settings/")))
        if path.startswith("/userdata/"):
            body = self.userdata.get(path.removeprefix("/userdata/"))
            return web.Response(body=body) if body is not None else web.Response(status=404)
        if path in EMPTY_ANSWERS or path.startswith("/models/") or path.startswith("/experiment/models/"):
            return web.json_response(EMPTY_ANSWERS.get(path, []))
        return self._static(request.path)

    def _static(self, path: str):
        """Our web files, the example workflows, else a file of the frontend's static folder."""
        for prefix, folder in ((f"/extensions/{PACK_NAME}/", WEB_DIR),
                               (f"/api/workflow_templates/{PACK_NAME}/", WORKFLOWS), ("/", self.static_root)):
            if path.startswith(prefix):
                file = (folder / path.removeprefix(prefix)).resolve()
                if file.is_relative_to(folder.resolve()) and file.is_file():
                    return web.FileResponse(file)
                break
        return web.Response(status=404)

    async def _post(self, request, path: str):
        if path == "/settings":
            self.settings.update(await request.json())
        elif path.startswith("/settings/"):
            self.settings[path.removeprefix("/settings/")] = await request.json()
        elif path.startswith("/userdata/"):
            self.userdata[path.removeprefix("/userdata/")] = await request.read()
        else:
            return web.Response(status=404)
        return web.json_response({})

    async def _websocket(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            sid = request.query.get("clientId") or uuid.uuid4().hex
            await ws.send_json({"type": "status", "data": {"status": QUEUE_INFO, "sid": sid}})
            async for _ in ws:  # the client's feature_flags message needs no answer here
                pass
        finally:
            self._sockets.discard(ws)
        return ws
