// ComfyUI frontend extension: read-only lines on Wan22MoESampler and Wan22MultiGPUConfig.
//
// - expert_split: which steps each expert runs, e.g. "high-noise steps 1-26 | low-noise 27-40",
//   recomputed from the node's own widgets every time the node is drawn, so it follows
//   steps/shift/boundary/solver/denoise edits, undo and workflow loads without listening to each.
// - parallel_split: with the `parallel` input connected, how the last run split the GPUs, e.g.
//   "6 GPUs: CFG 2 x Ulysses 1 x Ring 3" (the sampler's `ui` output: the split is chosen on the
//   server, where the GPU count is known).
// - worker_status: with the `parallel` input connected, what each multi-GPU worker rank is doing
//   (from the server's wan22moe.worker_status events).
// - lora_report: after a run with LoRAs, what each LoRA patched (the sampler's `ui` output).
// - step_cache_report: after a run with a step cache, how many model passes ran (the sampler's `ui`
//   output "step_cache"; the line has its own name because `step_cache` is the threshold's widget).
// - memory (on Wan22MultiGPUConfig): after a run, its split and what one GPU of the plan needs for
//   A14B at 720p and 480p in bf16 and fp8, and the smallest GPU's memory (the config node's `ui` output).
// All are display-only (text_lines.js). Every extra runs behind a guard (guard.js): a failure is
// reported once in the console and the sampler and its widgets keep working without the line.
// Only interfaces both supported frontends offer are used (1.27.10 and 1.5x: see README).
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { describeSplit } from "./expert_split.js";
import { guarded, makeReporter } from "./guard.js";
import { makeLinesWidget, showText } from "./text_lines.js";
import { EVENT, applyStatus, describeRanks } from "./worker_status.js";

const NODE_TYPE = "Wan22MoESampler";
const CONFIG_TYPE = "Wan22MultiGPUConfig";
const SETTINGS = ["steps", "shift", "boundary", "solver", "denoise"];
const report = makeReporter();

function currentSettings(node) {
  const settings = {};
  for (const name of SETTINGS) {
    if (isLinked(node, name)) return null; // the value comes from another node: unknown until the prompt runs
    const widget = node.widgets?.find((w) => w.name === name);
    if (widget) settings[name] = widget.value;
  }
  return settings;
}

function isLinked(node, inputName) {
  return node.inputs?.some((input) => input.name === inputName && input.link != null) ?? false;
}

// Each line's rows for a node, in the order the widgets are added (after every input widget,
// so widgets_values keeps INPUT_TYPES order).
const LINES = {
  expert_split(node) {
    const settings = currentSettings(node);
    return [settings ? describeSplit(settings) : "expert split: set by a linked input"];
  },
  parallel_split(node) {
    return isLinked(node, "parallel") ? node.wan22Split ?? [] : [];
  },
  worker_status(node) {
    return isLinked(node, "parallel") || node.wan22Workers ? [describeRanks(node.wan22Workers)] : [];
  },
  lora_report(node) {
    return (node.wan22Lora ?? []).map((line) => `LoRA ${line}`);
  },
  step_cache_report(node) {
    return (node.wan22StepCache ?? []).map((line) => `step cache: ${line}`);
  },
};

const CONFIG_LINES = {
  memory(node) {
    return node.wan22Memory ?? [];
  },
};

function addLines(node, table = LINES) {
  for (const [name, lines] of Object.entries(table)) {
    guarded(report, `adding the ${name} line to ${node.type}`, () => {
      const widget = node.addCustomWidget(makeLinesWidget(node, name, lines, report));
      showText(widget, lines(node));
    })();
  }
  const [width, height] = node.computeSize();
  node.setSize([Math.max(width, node.size[0]), Math.max(height, node.size[1])]);
}

// New text in each line, redrawn wherever the node is rendered.
function showLines(node, table = LINES) {
  for (const widget of node.widgets ?? []) {
    if (widget.type !== "wan22_text" || !(widget.name in table)) continue;
    showText(widget, table[widget.name](node));
    redrawHosted(widget);
  }
}

// Renderers that host canvas-drawn widgets outside the graph canvas ("Nodes 2.0") set
// triggerDraw and size the host from the frontend's layout of the node, which the graph canvas
// renews on its next frame: redraw after that one, so new rows get their room.
function redrawHosted(widget) {
  if (!widget.triggerDraw) return;
  requestAnimationFrame(() => requestAnimationFrame(() => widget.triggerDraw?.()));
}

// After an event changed what the lines say: new text, and room for it.
function refresh(node, table = LINES) {
  showLines(node, table);
  const [, height] = node.computeSize();
  if (height > node.size[1]) node.setSize([node.size[0], height]);
  node.setDirtyCanvas(true, true);
}

function onWorkerStatus(event) {
  const { node: id, ...status } = event.detail ?? {};
  const graph = app.rootGraph ?? app.graph; // rootGraph where the frontend has it (app.graph is deprecated there)
  const node = id == null ? null : graph?.getNodeById(id);
  if (node?.type !== NODE_TYPE) return; // e.g. a node inside a subgraph, or another tab's graph
  node.wan22Workers = applyStatus(node.wan22Workers, status);
  refresh(node);
}

// prototype[method] runs the frontend's own handler first, then `extra` behind a guard.
function chain(prototype, method, what, extra) {
  const original = prototype[method];
  const guardedExtra = guarded(report, what, extra);
  prototype[method] = function (...args) {
    const result = original?.apply(this, args);
    guardedExtra.apply(this, args);
    return result;
  };
}

app.registerExtension({
  name: "wan22moe.SamplerLines",
  setup: guarded(report, "listening for worker status events", () => {
    api.addEventListener(EVENT, guarded(report, "showing a worker status event", onWorkerStatus));
  }),
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const proto = nodeType.prototype;
    chain(proto, "onNodeCreated", `adding the lines to ${NODE_TYPE}`, function () {
      addLines(this);
    });
    chain(proto, "onConfigure", "updating the lines after a workflow load", function () {
      showLines(this); // the saved size already has room for them
    });
    chain(proto, "onConnectionsChange", "updating the lines after a link change", function () {
      if (this.graph) refresh(this); // the status line comes and goes with the parallel link
    });
    chain(proto, "onExecuted", "showing the run's reports", function (output) {
      this.wan22Lora = output?.lora_report ?? [];
      this.wan22Split = output?.parallel_split ?? [];
      this.wan22StepCache = output?.step_cache ?? [];
      refresh(this);
    });
  },
});

app.registerExtension({
  name: "wan22moe.MultiGPUMemory",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== CONFIG_TYPE) return;
    const proto = nodeType.prototype;
    chain(proto, "onNodeCreated", `adding the memory line to ${CONFIG_TYPE}`, function () {
      addLines(this, CONFIG_LINES);
    });
    chain(proto, "onExecuted", "showing what one GPU needs", function (output) {
      this.wan22Memory = output?.memory ?? [];
      refresh(this, CONFIG_LINES);
    });
  },
});
