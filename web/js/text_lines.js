// A read-only widget that shows a few lines of text on a node, one row each, and takes no room
// when there are none.
//
// Written against the widget interface both frontends share (1.27.10 and the store-backed 1.5x):
// a plain object handed to node.addCustomWidget, with draw(ctx, node, width, y) and
// computeLayoutSize(node). The frontend may wrap or adopt the object and then owns its fields
// (1.5x makes `node` getter-only), so nothing here assigns a frontend field other than `value`,
// and the node always comes from the closure or the call, never from `this.node`.
// In the canvas-free "Nodes 2.0" renderer of 1.5x the same draw paints into the widget's own
// small canvas; renderers without such a host skip the widget.
// No browser or ComfyUI imports: node's test runner loads this file as it is.

import { guarded } from "./guard.js";

export const LINE_HEIGHT = 22;
const NO_ROOM = { minHeight: 0, maxHeight: 0, minWidth: 0 };

// The widget for `node`; lines(node) gives the rows; failures go to report(what, error).
export function makeLinesWidget(node, name, lines, report) {
  const rowsOf = guarded(report, `the ${name} line's text`, () => lines(node), []);
  return {
    type: "wan22_text",
    name,
    value: "",
    serialize: false, // not in the saved workflow's widgets_values
    options: { serialize: false }, // not in the API prompt
    draw: guarded(report, `drawing the ${name} line`, function (ctx, _node, width, y) {
      const rows = rowsOf();
      showText(this, rows);
      ctx.save();
      try {
        ctx.fillStyle = globalThis.LiteGraph?.WIDGET_SECONDARY_TEXT_COLOR ?? "#999";
        ctx.font = "12px sans-serif";
        ctx.textAlign = "center";
        ctx.textBaseline = "middle";
        rows.forEach((row, i) => ctx.fillText(row, width / 2, y + (i + 0.5) * LINE_HEIGHT, width - 20));
      } finally {
        ctx.restore();
      }
    }),
    // Fixed height (min = max), so the layout neither stretches nor squeezes the rows.
    computeLayoutSize: guarded(report, `sizing the ${name} line`, () => {
      const height = rowsOf().length * LINE_HEIGHT;
      return { minHeight: height, maxHeight: height, minWidth: 0 };
    }, NO_ROOM),
  };
}

// Keep the widget's value equal to the text shown (read by tests and by other extensions).
export function showText(widget, rows) {
  const text = rows.join("\n");
  if (widget.value !== text) widget.value = text;
}
