"""ComfyUI's frontend in headless Chromium, for the browser test and scripts/comfyui_smoke.py.

- frontend_static(version): the `static` folder of a `comfyui-frontend-package` wheel, fetched by
  pip once and kept under $WAN22_CACHE/frontends/<version> (default ~/.cache/wan22-moe).
- open_browser / open_page: Debian's chromium driven by playwright (never playwright's own
  browser downloads); a page records console and page errors and blocks every request that
  leaves the server under test.
- load_workflow / create_nodes / sampler_lines: what the page reports about our nodes, and
  load_problems / creation_problems: what is wrong with such a report.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
PACKAGE = "comfyui-frontend-package"
# The oldest frontend we support (the one ComfyUI 0.3.64 pins, our pyproject's floor) and the newest
# published when the extension was last checked; README's "Frontend versions" lists the same two.
TESTED_FRONTENDS = ("1.27.10", "1.58.1")
SAMPLER = "Wan22MoESampler"
LINE_NAMES = ("expert_split", "parallel_split", "worker_status", "lora_report", "step_cache_report")
# The sampler's read-only lines right after loading each UI example workflow.
SPLIT_40, SPLIT_4 = "high-noise steps 1-26 | low-noise 27-40", "high-noise steps 1-2 | low-noise 3-4"
EXPECTED_LINES = {
    "wan22_t2v_a14b": {"expert_split": SPLIT_40, "parallel_split": "", "worker_status": "", "lora_report": "",
                       "step_cache_report": ""},
    "wan22_t2v_a14b_multigpu": {"expert_split": SPLIT_40, "parallel_split": "",  # known after a run
                                "worker_status": "workers: start on the first run", "lora_report": "",
                                "step_cache_report": ""},
    "wan22_t2v_a14b_4step_lora": {"expert_split": SPLIT_4, "parallel_split": "", "worker_status": "",
                                  "lora_report": "", "step_cache_report": ""},
}
EXTENSION_MARKS = ("/extensions/wan22-moe/", "[wan22-moe]")  # our files' URLs and our reports' prefix
VIEWPORT = {"width": 1600, "height": 1000}
# Server-side settings for the checks: a reloaded page must not restore the previous workflow
# (it would land after, and replace, the workflow a check loads).
CHECK_SETTINGS = {"Comfy.Workflow.Persist": False}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def cache_dir() -> Path:
    # The same cache root as `python -m wan22_core demo` (wan22_core/cli.py --cache-dir)
    return Path(os.environ.get("WAN22_CACHE", Path.home() / ".cache" / "wan22-moe")) / "frontends"


def newest_frontend_version() -> str:
    """The newest comfyui-frontend-package on the package index pip uses."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", PACKAGE], capture_output=True, text=True)
    found = re.search(rf"^{PACKAGE} \(([^)]+)\)", out.stdout, re.MULTILINE)
    if out.returncode or not found:
        raise RuntimeError(f"`pip index versions {PACKAGE}` failed: {(out.stderr or out.stdout).strip()[-500:]}")
    return found.group(1)


def frontend_static(version: str) -> Path:
    """The unpacked static folder of comfyui-frontend-package==version (downloaded once)."""
    target = cache_dir() / version
    static = target / "comfyui_frontend_package" / "static"
    if (static / "index.html").is_file():
        return static
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{version}-") as tmp:
        out = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{PACKAGE}=={version}",
                              "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if out.returncode or len(wheels) != 1:
            why = (out.stderr or out.stdout).strip()[-500:]
            raise RuntimeError(f"pip could not download {PACKAGE}=={version}: {why}")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(unpacked)
        if not (unpacked / "comfyui_frontend_package" / "static" / "index.html").is_file():
            raise RuntimeError(f"{wheels[0].name} has no comfyui_frontend_package/static/index.html")
        shutil.rmtree(target, ignore_errors=True)
        unpacked.rename(target)  # complete or absent: a crash above leaves only the temp folder
    return static


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("Debian's chromium is not installed: apt-get install chromium")
    return found


def open_browser(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)


# Records every string painted with fillText inside the bounds of its canvas (the graph canvas or a
# widget's own canvas), so a test can tell that a line was drawn where it shows, not only computed.
RECORD_PAINTED_TEXT = """
window.__wan22Painted = new Set();
const fillText = CanvasRenderingContext2D.prototype.fillText;
CanvasRenderingContext2D.prototype.fillText = function (text, x, y, ...rest) {
  const m = this.getTransform();  // the anchor point in the canvas bitmap: inside it, or not shown
  const [px, py] = [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f];
  if (px >= 0 && py >= 0 && px <= this.canvas.width && py <= this.canvas.height) {
    window.__wan22Painted.add(String(text));
  }
  return fillText.call(this, text, x, y, ...rest);
};
"""


@dataclass
class PageLog:
    """Console errors and uncaught page errors, as text with their stacks."""
    errors: list[str] = field(default_factory=list)

    def from_pack(self) -> list[str]:
        return [e for e in self.errors if any(mark in e for mark in EXTENSION_MARKS)]


def open_page(browser, url: str, timeout_s: float = 120):
    """A fresh browser context on `url`, started up to the point where our sampler type exists."""
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script(RECORD_PAINTED_TEXT)
    origin = url.rstrip("/")
    context.route(lambda u: not u.startswith(origin), lambda route: route.abort())  # no outside requests
    page = context.new_page()
    log = PageLog()
    page.on("console", lambda m: m.type == "error" and log.errors.append(m.text))
    page.on("pageerror", lambda e: log.errors.append(f"{e}\n{e.stack or ''}"))
    page.goto(url)
    wait_until_ready(page, timeout_s)
    return page, log


def wait_until_ready(page, timeout_s: float = 120) -> None:
    """Until the app has a graph, knows our sampler type and has its websocket to the server open."""
    page.wait_for_function("() => !!(window.app?.graph && window.app?.canvas && "
                           f"window.LiteGraph?.registered_node_types?.{SAMPLER})", timeout=timeout_s * 1000)
    page.wait_for_function("async () => (await import('/scripts/api.js')).api.socket?.readyState === WebSocket.OPEN",
                           timeout=timeout_s * 1000)


def use_nodes_2_0(page, enabled: bool) -> None:
    """Switch the frontend's element-based node renderer ("Nodes 2.0") and reload the page: 1.27.10
    keeps showing the graph it had when the setting changed until the page is reloaded."""
    set_setting(page, "Comfy.VueNodes.Enabled", enabled)
    page.reload()
    wait_until_ready(page)


def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def api_twin(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


# Shared by the page scripts below: the sampler's lines as its widgets hold them, and the lines
# painted while the sampler is centred at zoom 1 (so neither culled nor drawn in low quality).
PAGE_HELPERS = """
const frames = (n) => new Promise((resolve) => {
  const step = () => (n-- > 0 ? requestAnimationFrame(step) : setTimeout(resolve, 300));
  step();
});
const linesOf = (node) => Object.fromEntries(
  %s.map((name) => [name, node.widgets?.find((w) => w.name === name)?.value]));
async function paintedLines(node) {  // since the script began (or clear_painted)
  app.canvas.ds.scale = 1;
  app.canvas.centerOnNode(node);
  app.canvas.setDirty(true, true);
  await frames(4);
  return [...window.__wan22Painted].filter((t) => /^(high-noise|expert split|workers:|LoRA |step cache: |\\d+ (GPU|CPU rank)s?: CFG )/.test(t));
}
""" % json.dumps(list(LINE_NAMES))

LOAD_WORKFLOW = PAGE_HELPERS + """
return (async ({ workflow, name }) => {
  window.__wan22Painted.clear();
  await app.loadGraphData(workflow, true, true, name);
  await frames(2);
  const sampler = app.graph.nodes.find((n) => n.type === '%s');
  const { output } = await app.graphToPrompt();
  return {
    types: app.graph.nodes.map((n) => n.type),
    samplerId: sampler?.id ?? null,
    lines: sampler ? linesOf(sampler) : null,
    painted: sampler ? await paintedLines(sampler) : [],
    widgetsValues: sampler?.serialize().widgets_values ?? null,
    prompt: output,
  };
})(args);
""" % SAMPLER

CREATE_NODES = PAGE_HELPERS + """
return (async (types) => {
  const created = [];
  for (const type of types) {
    window.__wan22Painted.clear();
    try {
      const node = LiteGraph.createNode(type);
      if (!node) throw new Error('LiteGraph.createNode returned ' + node);
      app.graph.add(node);
      const report = { type, widgets: (node.widgets ?? []).map((w) => w.name) };
      if (type === '%s') {
        report.lines = linesOf(node);
        const steps = node.widgets.find((w) => w.name === 'steps');
        steps.value = 1;  // as an edit in the UI would: the split line must follow on the next draw
        steps.callback?.(1, app.canvas, node);
        report.painted = await paintedLines(node);
        report.linesAfterEdit = linesOf(node);
      }
      app.graph.remove(node);
      created.push(report);
    } catch (error) {
      created.push({ type, error: String(error?.stack ?? error) });
    }
  }
  return created;
})(args);
""" % SAMPLER

SAMPLER_LINES = PAGE_HELPERS + """
return (async (id) => {
  const node = app.graph.getNodeById(id);
  return { lines: linesOf(node), painted: await paintedLines(node) };
})(args);
"""


def run(page, script: str, args):
    """Evaluate one of the scripts above with `args`."""
    return page.evaluate(f"(args) => {{ {script} }}", args)


def load_workflow(page, name: str) -> dict:
    return run(page, LOAD_WORKFLOW, {"workflow": workflow(name), "name": name})


def create_nodes(page, types: list[str]) -> list[dict]:
    return run(page, CREATE_NODES, types)


def sampler_lines(page, node_id) -> dict:
    return run(page, SAMPLER_LINES, node_id)


def frontend_version(page) -> str:
    return page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")


def lines_of(text_by_line: dict) -> list[str]:
    """The rows the lines {name: text} show, one string each. (A page reports every row it painted
    since the check began, so earlier states may be there too: checks ask for these rows among them.)"""
    return sorted(row for text in text_by_line.values() if text for row in text.split("\n"))


def load_problems(name: str, report: dict) -> list[str]:
    """What is wrong with load_workflow's report on example workflow `name` (nothing: [])."""
    saved = workflow(name)
    problems = []
    types = sorted(n["type"] for n in saved["nodes"])
    if sorted(report["types"]) != types:
        problems.append(f"nodes created {sorted(report['types'])}, the workflow has {types}")
    if report["lines"] != EXPECTED_LINES[name]:
        problems.append(f"the sampler's lines are {report['lines']}, expected {EXPECTED_LINES[name]}")
    unpainted = set(lines_of(EXPECTED_LINES[name])) - set(report["painted"])
    if unpainted:
        problems.append(f"rows not painted inside the canvas: {sorted(unpainted)} (painted: {report['painted']})")
    if report["prompt"] != api_twin(name):
        problems.append(f"graphToPrompt gives {json.dumps(report['prompt'], ensure_ascii=False)}, not the API twin")
    sampler = next(n for n in saved["nodes"] if n["type"] == SAMPLER)
    if report["widgetsValues"] != sampler["widgets_values"]:
        problems.append(f"the sampler saves as {report['widgetsValues']}, the file has {sampler['widgets_values']}")
    return problems


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def widget_inputs(info: dict) -> set[str]:
    """The inputs of an /object_info entry that the frontend turns into widgets (primitives, combos)."""
    return {name for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()
            if isinstance(spec[0], list) or spec[0] in WIDGET_TYPES}


# The sampler right after it is created from the library, and after its steps widget is set to 1
# (timestep 999 >= 875: the one step is high-noise).
AFTER_STEPS_1 = "high-noise step 1 | low-noise none"


def creation_problems(created: list[dict], infos: dict) -> list[str]:
    """What is wrong with create_nodes' report, given the /object_info entries of the types."""
    problems = []
    for report in created:
        if "error" in report:
            problems.append(f"{report['type']}: {report['error']}")
            continue
        missing = widget_inputs(infos[report["type"]]) - set(report["widgets"])
        if missing:
            problems.append(f"{report['type']} lacks the widgets {sorted(missing)}")
        if report["type"] == SAMPLER:
            if report["lines"] != EXPECTED_LINES["wan22_t2v_a14b"]:  # the node's defaults are the official ones
                problems.append(f"a new sampler's lines are {report['lines']}")
            if report["linesAfterEdit"]["expert_split"] != AFTER_STEPS_1 or AFTER_STEPS_1 not in report["painted"]:
                problems.append(f"after steps = 1 the split line is {report['linesAfterEdit']['expert_split']!r}, "
                                f"painted {report['painted']}")
    return problems


def clear_painted(page) -> None:
    page.evaluate("() => window.__wan22Painted.clear()")


def set_setting(page, key: str, value) -> None:
    page.evaluate("([key, value]) => app.extensionManager.setting.set(key, value)", [key, value])
