"""The web extension in a real browser, on the oldest and the newest ComfyUI frontend we support.

Each frontend in frontend.TESTED_FRONTENDS (its pip wheel, cached by frontend.frontend_static)
runs in Debian's headless Chromium, driven by playwright, against comfy_standin.StandInServer:
/object_info computed from our node classes as ComfyUI computes it, /extensions with our web/js
files, /workflow_templates with example_workflows/. Checked on each frontend: every example
workflow loads with all its nodes, the sampler's lines are on it and painted where they show, the
frontend turns each workflow into its API twin; each of our node types is created from the node
library's code path (LiteGraph.createNode + graph.add) and the sampler's split line follows an
edit; the worker-status, LoRA and step-cache lines follow websocket events; a failing extra is reported once
and leaves the sampler working; "Nodes 2.0" (Comfy.VueNodes.Enabled) shows the lines where the
frontend hosts canvas-drawn widgets and leaves them out without an error where it does not.
No error from our files may reach the console or the page.

What the stand-in does not cover, and scripts/comfyui_smoke.py --screenshot (a real ComfyUI
server, both frontends) does: ComfyUI's own server code and core nodes (here only placeholders for
the ten loaders frontend 1.27.10 looks up at start-up), model file lists (our loaders' combos hold
the "(no files ...)" placeholder), running a prompt (progress, previews, the worker group's real
status events, a real LoRA report), and the frontend served by `main.py --front-end-root`.

Needs Debian's chromium and the `browser` extra (playwright, aiohttp). Without them the test is
skipped with the reason, unless WAN22_BROWSER_TESTS=1 (set by .ci/run after installing them),
where a missing tool is an error.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass

import pytest

import frontend as fe
from comfy_standin import CORE_LOADERS, StandInServer, object_info

REQUIRED = "WAN22_BROWSER_TESTS"
WORKFLOW_NAMES = sorted(p.stem for p in fe.WORKFLOWS.glob("*.json"))
# Whether the frontend's "Nodes 2.0" renderer hosts canvas-drawn custom widgets (WidgetLegacy).
VUE_HOSTS_DRAWN_WIDGETS = {"1.27.10": False, "1.58.1": True}


def missing_tools() -> list[str]:
    missing = [f"the python package {name} (pip install -e '.[browser]')"
               for name in ("playwright", "aiohttp") if importlib.util.find_spec(name) is None]
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        missing.append("Debian's chromium (apt-get install chromium)")
    return missing


@pytest.fixture(scope="module")
def browser():
    missing = missing_tools()
    if missing:
        reason = f"the browser test needs {' and '.join(missing)}"
        if os.environ.get(REQUIRED) == "1":
            pytest.fail(f"{reason}; {REQUIRED}=1 requires it (.ci/run installs them)")
        pytest.skip(f"{reason}; CI runs it (.ci/run sets {REQUIRED}=1)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = fe.open_browser(playwright)
        yield browser
        browser.close()


@dataclass
class Frontend:
    version: str
    server: StandInServer
    page: object
    log: fe.PageLog

    def pack_errors(self, since: int) -> list[str]:
        return fe.PageLog(self.log.errors[since:]).from_pack()


@pytest.fixture(scope="module", params=fe.TESTED_FRONTENDS, ids=lambda v: f"frontend-{v}")
def frontend(request, browser):
    """One page per frontend, shared by the tests below (start-up is most of the time)."""
    static = fe.frontend_static(request.param)
    start = time.monotonic()
    with StandInServer(static) as server:
        server.settings.update(fe.CHECK_SETTINGS)
        page, log = fe.open_page(browser, server.url)
        assert fe.frontend_version(page) == request.param
        print(f"frontend {request.param} started in {time.monotonic() - start:.1f} s")
        try:
            yield Frontend(request.param, server, page, log)
        finally:
            page.context.close()


def test_example_workflows_load_with_every_node_and_the_lines(frontend):
    since = len(frontend.log.errors)
    for name in WORKFLOW_NAMES:
        problems = fe.load_problems(name, fe.load_workflow(frontend.page, name))
        assert problems == [], f"{name}: {problems}; errors from our files: {frontend.pack_errors(since)}"
    assert frontend.pack_errors(since) == []


def test_each_node_type_is_created_from_the_library(frontend):
    since = len(frontend.log.errors)
    ours = {name: info for name, info in object_info().items() if name not in CORE_LOADERS}
    assert fe.creation_problems(fe.create_nodes(frontend.page, list(ours)), ours) == []
    assert frontend.pack_errors(since) == []


def push_run_events(frontend, sampler_id) -> dict:
    """What a multi-GPU run with LoRAs and a step cache sends: two rank statuses, then the sampler's
    ui output (the LoRA report, the split and the step cache's passes)."""
    for rank, status in ((0, "step 2/4"), (1, "ready")):
        frontend.server.broadcast("wan22moe.worker_status", {"node": sampler_id, "rank": rank, "ranks": 2,
                                                             "status": status})
    report = ["high: lightx2v_high.safetensors x1, 400 parameters patched",
              "low: lightx2v_low.safetensors x1, 400 parameters patched"]
    passes = ["19 of 40 model passes run"]
    split = "2 GPUs: CFG 1 x Ulysses 2 x Ring 1"
    frontend.server.broadcast("executed", {"node": str(sampler_id), "display_node": str(sampler_id),
                                           "output": {"lora_report": report, "parallel_split": [split],
                                                      "step_cache": passes},
                                           "prompt_id": "standin"})
    frontend.page.wait_for_function(
        "(id) => app.graph.getNodeById(id)?.widgets?.find((w) => w.name === 'step_cache_report')?.value",
        arg=sampler_id)
    return {"expert_split": fe.SPLIT_40, "parallel_split": split,
            "worker_status": "workers: rank 0: step 2/4 | rank 1: ready",
            "lora_report": "\n".join(f"LoRA {line}" for line in report),
            "step_cache_report": "step cache: 19 of 40 model passes run"}


def test_worker_status_lora_report_and_step_cache_follow_the_server(frontend):
    since = len(frontend.log.errors)
    loaded = fe.load_workflow(frontend.page, "wan22_t2v_a14b_multigpu")
    fe.clear_painted(frontend.page)
    expected = push_run_events(frontend, loaded["samplerId"])
    shown = fe.sampler_lines(frontend.page, loaded["samplerId"])
    assert shown["lines"] == expected
    assert set(fe.lines_of(expected)) <= set(shown["painted"])
    assert frontend.pack_errors(since) == []


BREAK_OUR_WIDGETS = """([broken]) => {
  const proto = LiteGraph.LGraphNode.prototype;
  if (broken) {
    window.__wan22Add = proto.addCustomWidget;
    proto.addCustomWidget = function (widget) {
      if (widget.type === 'wan22_text') throw new TypeError('simulated frontend change');
      return window.__wan22Add.call(this, widget);
    };
  } else {
    proto.addCustomWidget = window.__wan22Add;
  }
}"""


def test_a_failing_extra_is_reported_once_and_the_sampler_still_works(frontend):
    since = len(frontend.log.errors)
    frontend.page.evaluate(BREAK_OUR_WIDGETS, [True])
    try:
        created = fe.create_nodes(frontend.page, [fe.SAMPLER, fe.SAMPLER])
    finally:
        frontend.page.evaluate(BREAK_OUR_WIDGETS, [False])
    info = object_info()[fe.SAMPLER]
    for sampler in created:
        assert "error" not in sampler, sampler["error"]
        assert fe.widget_inputs(info) <= set(sampler["widgets"])
        assert not set(fe.LINE_NAMES) & set(sampler["widgets"])
    reports = frontend.pack_errors(since)
    assert sorted(r.split(" failed")[0] for r in reports) == sorted(
        f"[wan22-moe] adding the {name} line to {fe.SAMPLER}" for name in fe.LINE_NAMES), reports


def test_nodes_2_0_shows_the_lines_or_leaves_them_out(frontend):
    since = len(frontend.log.errors)
    fe.use_nodes_2_0(frontend.page, True)
    try:
        loaded = fe.load_workflow(frontend.page, "wan22_t2v_a14b_multigpu")
        fe.clear_painted(frontend.page)
        expected = push_run_events(frontend, loaded["samplerId"])
        shown = fe.sampler_lines(frontend.page, loaded["samplerId"])
    finally:
        fe.set_setting(frontend.page, "Comfy.VueNodes.Enabled", False)  # the page is not used after this test
    saved = fe.workflow("wan22_t2v_a14b_multigpu")
    assert sorted(loaded["types"]) == sorted(n["type"] for n in saved["nodes"])
    assert shown["lines"] == expected
    if VUE_HOSTS_DRAWN_WIDGETS[frontend.version]:
        assert set(fe.lines_of(expected)) <= set(shown["painted"])
    else:
        assert shown["painted"] == []
    assert frontend.pack_errors(since) == []
