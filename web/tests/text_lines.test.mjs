// node --test web/tests/   (the read-only lines widget and the guard around every extra)
import assert from "node:assert/strict";
import test from "node:test";

import { guarded, makeReporter } from "../js/guard.js";
import { LINE_HEIGHT, makeLinesWidget } from "../js/text_lines.js";

function fakeContext() {
  const calls = { fillText: [], depth: 0, maxDepth: 0 };
  return {
    calls,
    save() { calls.maxDepth = Math.max(calls.maxDepth, ++calls.depth); },
    restore() { calls.depth--; },
    fillText(text, x, y, maxWidth) { calls.fillText.push({ text, x, y, maxWidth }); },
  };
}

function recorder() {
  const errors = [];
  return { errors, report: makeReporter({ error: (message) => errors.push(message) }) };
}

// A widget as the 1.5x frontend adopts it: `node` readable but getter-only (assigning throws).
function adopted(widget, node) {
  Object.defineProperty(widget, "node", { get: () => node, configurable: true });
  return widget;
}

test("one row per line at LINE_HEIGHT, centred, and the value is the text shown", () => {
  const node = { rows: ["first", "second"] };
  const { errors, report } = recorder();
  const widget = adopted(makeLinesWidget(node, "demo", (n) => n.rows, report), node);
  const ctx = fakeContext();
  widget.draw(ctx, node, 300, 100);
  assert.deepEqual(ctx.calls.fillText, [
    { text: "first", x: 150, y: 100 + 0.5 * LINE_HEIGHT, maxWidth: 280 },
    { text: "second", x: 150, y: 100 + 1.5 * LINE_HEIGHT, maxWidth: 280 },
  ]);
  assert.equal(ctx.calls.depth, 0, "every save is restored");
  assert.equal(widget.value, "first\nsecond");
  const height = 2 * LINE_HEIGHT;
  assert.deepEqual(widget.computeLayoutSize(node), { minHeight: height, maxHeight: height, minWidth: 0 });
  assert.deepEqual(errors, []);
});

test("no rows take no room and paint nothing", () => {
  const node = {};
  const { report } = recorder();
  const widget = makeLinesWidget(node, "demo", () => [], report);
  const ctx = fakeContext();
  widget.draw(ctx, node, 300, 0);
  assert.deepEqual(ctx.calls.fillText, []);
  assert.deepEqual(widget.computeLayoutSize(node), { minHeight: 0, maxHeight: 0, minWidth: 0 });
  assert.equal(widget.value, "");
});

test("the rows follow the node the widget was made for, whatever node is passed or `this` is", () => {
  const node = { rows: ["mine"] };
  const { report } = recorder();
  const widget = makeLinesWidget(node, "demo", (n) => n.rows, report);
  const ctx = fakeContext();
  widget.draw.call(adopted({ value: "" }, { rows: ["other"] }), ctx, { rows: ["other"] }, 100, 0);
  assert.deepEqual(ctx.calls.fillText.map((c) => c.text), ["mine"]);
  node.rows = ["mine", "more"];
  assert.equal(widget.computeLayoutSize().minHeight, 2 * LINE_HEIGHT, "no node argument needed");
});

test("a failing line paints nothing, takes no room, throws nothing and is reported once", () => {
  const node = {};
  const { errors, report } = recorder();
  const widget = makeLinesWidget(node, "expert_split", () => { throw new TypeError("boom"); }, report);
  const ctx = fakeContext();
  for (let i = 0; i < 3; i++) widget.draw(ctx, node, 300, 0);
  assert.deepEqual(widget.computeLayoutSize(node), { minHeight: 0, maxHeight: 0, minWidth: 0 });
  assert.deepEqual(ctx.calls.fillText, []);
  assert.equal(ctx.calls.depth, 0);
  assert.equal(errors.length, 1, errors.join("\n"));
  assert.match(errors[0], /^\[wan22-moe\] the expert_split line's text failed .*: boom$/);
});

test("a canvas that throws mid-draw still gets its state restored, and the draw is reported", () => {
  const node = {};
  const { errors, report } = recorder();
  const widget = makeLinesWidget(node, "lora_report", () => ["a"], report);
  const ctx = fakeContext();
  ctx.fillText = () => { throw new Error("lost context"); };
  widget.draw(ctx, node, 300, 0);
  assert.equal(ctx.calls.depth, 0);
  assert.deepEqual(errors.map((e) => e.split(" failed")[0]), ["[wan22-moe] drawing the lora_report line"]);
});

test("guarded passes this and the arguments through, and returns the fallback on a throw", () => {
  const { errors, report } = recorder();
  const add = guarded(report, "adding", function (x) { return this.base + x; }, -1);
  assert.equal(add.call({ base: 2 }, 3), 5);
  const broken = guarded(report, "breaking", () => { throw new Error("no"); }, "fallback");
  assert.equal(broken(), "fallback");
  assert.equal(broken(), "fallback");
  assert.equal(errors.length, 1, "each kind of failure is reported once");
});
