// ComfyUI frontend extension: a read-only line on Wan22MoESampler showing which steps each
// expert runs, e.g. "high-noise steps 1-26 | low-noise 27-40".
//
// The line is recomputed from the node's own widgets every time the node is drawn, so it follows
// steps/shift/boundary/solver/denoise edits, undo and workflow loads without listening to each.
// It is display-only: `serialize: false` keeps it out of the saved workflow's widgets_values and
// `options.serialize: false` keeps it out of the API prompt.
import { app } from "../../scripts/app.js";
import { describeSplit } from "./expert_split.js";

const NODE_TYPE = "Wan22MoESampler";
const WIDGET_NAME = "expert_split";
const SETTINGS = ["steps", "shift", "boundary", "solver", "denoise"];
const LINE_HEIGHT = 22;

function currentSettings(node) {
  const settings = {};
  for (const name of SETTINGS) {
    const linked = node.inputs?.some((input) => input.name === name && input.link != null);
    if (linked) return null; // the value comes from another node: unknown until the prompt runs
    const widget = node.widgets?.find((w) => w.name === name);
    if (widget) settings[name] = widget.value;
  }
  return settings;
}

function splitLabel(node) {
  const settings = currentSettings(node);
  return settings ? describeSplit(settings) : "expert split: set by a linked input";
}

function makeSplitWidget() {
  return {
    type: "wan22_expert_split",
    name: WIDGET_NAME,
    value: "",
    serialize: false,
    options: { serialize: false },
    draw(ctx, node, width, y) {
      this.value = splitLabel(node);
      ctx.save();
      ctx.fillStyle = globalThis.LiteGraph?.WIDGET_SECONDARY_TEXT_COLOR ?? "#999";
      ctx.font = "12px sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(this.value, width / 2, y + LINE_HEIGHT / 2, width - 20);
      ctx.restore();
    },
    computeSize(width) {
      return [width, LINE_HEIGHT];
    },
  };
}

app.registerExtension({
  name: "wan22moe.ExpertSplit",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      // Added last, after every input widget, so widgets_values keeps INPUT_TYPES order.
      this.addCustomWidget(makeSplitWidget());
      const [width, height] = this.computeSize();
      this.setSize([Math.max(width, this.size[0]), Math.max(height, this.size[1])]);
      return result;
    };
  },
});
