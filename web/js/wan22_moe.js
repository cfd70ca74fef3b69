// ComfyUI frontend extension: read-only lines on Wan22MoESampler.
//
// - expert_split: which steps each expert runs, e.g. "high-noise steps 1-26 | low-noise 27-40",
//   recomputed from the node's own widgets every time the node is drawn, so it follows
//   steps/shift/boundary/solver/denoise edits, undo and workflow loads without listening to each.
// - worker_status: with the `parallel` input connected, what each multi-GPU worker rank is doing
//   (from the server's wan22moe.worker_status events).
// - lora_report: after a run with LoRAs, what each LoRA patched (the sampler's `ui` output).
// All are display-only: `serialize: false` keeps them out of the saved workflow's widgets_values
// and `options.serialize: false` keeps them out of the API prompt.
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { describeSplit } from "./expert_split.js";
import { EVENT, applyStatus, describeRanks } from "./worker_status.js";

const NODE_TYPE = "Wan22MoESampler";
const SETTINGS = ["steps", "shift", "boundary", "solver", "denoise"];
const LINE_HEIGHT = 22;
const HIDDEN = [0, -4]; // a widget of no height (LiteGraph adds 4 px between widgets)

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

function splitLines(node) {
  const settings = currentSettings(node);
  return [settings ? describeSplit(settings) : "expert split: set by a linked input"];
}

function statusLines(node) {
  return isLinked(node, "parallel") || node.wan22Workers ? [describeRanks(node.wan22Workers)] : [];
}

function loraLines(node) {
  return (node.wan22Lora ?? []).map((line) => `LoRA ${line}`);
}

// A read-only widget showing `lines(node)`, one row each, and taking no room when there are none.
function makeTextWidget(name, lines) {
  return {
    type: "wan22_text",
    name,
    value: "",
    serialize: false,
    options: { serialize: false },
    draw(ctx, node, width, y) {
      const rows = lines(node);
      this.value = rows.join("\n");
      ctx.save();
      ctx.fillStyle = globalThis.LiteGraph?.WIDGET_SECONDARY_TEXT_COLOR ?? "#999";
      ctx.font = "12px sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      rows.forEach((row, i) => ctx.fillText(row, width / 2, y + (i + 0.5) * LINE_HEIGHT, width - 20));
      ctx.restore();
    },
    computeSize(width) {
      const rows = this.node ? lines(this.node).length : 1;
      return rows ? [width, rows * LINE_HEIGHT] : HIDDEN;
    },
  };
}

function fitHeight(node) {
  const [, height] = node.computeSize();
  if (height > node.size[1]) node.setSize([node.size[0], height]);
  node.setDirtyCanvas(true, true);
}

function onWorkerStatus(event) {
  const { node: id, ...status } = event.detail ?? {};
  const node = id == null ? null : app.graph?.getNodeById(id);
  if (node?.type !== NODE_TYPE) return; // e.g. a node inside a subgraph, or another tab's graph
  node.wan22Workers = applyStatus(node.wan22Workers, status);
  fitHeight(node);
}

app.registerExtension({
  name: "wan22moe.SamplerLines",
  setup() {
    api.addEventListener(EVENT, onWorkerStatus);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const { onNodeCreated, onConnectionsChange, onExecuted } = nodeType.prototype;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      // Added last, after every input widget, so widgets_values keeps INPUT_TYPES order.
      for (const [name, lines] of [["expert_split", splitLines], ["worker_status", statusLines],
        ["lora_report", loraLines]]) {
        const widget = this.addCustomWidget(makeTextWidget(name, lines));
        widget.node = this;
      }
      const [width, height] = this.computeSize();
      this.setSize([Math.max(width, this.size[0]), Math.max(height, this.size[1])]);
      return result;
    };
    nodeType.prototype.onConnectionsChange = function () {
      const result = onConnectionsChange?.apply(this, arguments);
      if (this.graph) fitHeight(this); // the status line comes and goes with the parallel link
      return result;
    };
    nodeType.prototype.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      this.wan22Lora = output?.lora_report ?? [];
      fitHeight(this);
      return result;
    };
  },
});
