// node --test web/tests/   (the extension's pure logic, against vectors written by Python)
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import test from "node:test";

import { describeSplit, highNoiseSteps, partialTimesteps, settingsError } from "../js/expert_split.js";

const vectors = JSON.parse(readFileSync(new URL("./vectors.json", import.meta.url), "utf8"));

test("timesteps and the expert split equal the engine's for every shared vector", () => {
  assert.ok(vectors.length > 100);
  for (const v of vectors) {
    const label = JSON.stringify({ ...v, timesteps: undefined });
    assert.deepEqual(partialTimesteps(v.steps, v.shift, v.solver, v.denoise), v.timesteps, label);
    assert.equal(highNoiseSteps(v), v.high_noise_steps, label);
  }
});

test("the label of the official defaults", () => {
  const defaults = { steps: 40, shift: 12.0, boundary: 0.875, solver: "unipc", denoise: 1.0 };
  assert.equal(describeSplit(defaults), "high-noise steps 1-26 | low-noise 27-40");
});

test("labels for one-sided and single-step splits", () => {
  const base = { steps: 40, shift: 12.0, solver: "unipc" };
  assert.equal(describeSplit({ ...base, boundary: 0.0 }), "high-noise steps 1-40 | low-noise none");
  assert.equal(describeSplit({ ...base, boundary: 1.0 }), "high-noise none | low-noise steps 1-40");
  assert.equal(describeSplit({ ...base, steps: 1, solver: "euler", boundary: 0.5 }),
    "high-noise step 1 | low-noise none");
  const oneLow = vectors.find((v) => v.high_noise_steps === v.steps - 1 && v.steps > 2);
  assert.ok(oneLow, "the vectors hold a split with a single low-noise step");
  assert.equal(describeSplit(oneLow), `high-noise steps 1-${oneLow.steps - 1} | low-noise ${oneLow.steps}`);
});

test("settings the engine refuses give a message instead of a split", () => {
  const ok = { steps: 40, shift: 12.0, boundary: 0.875, solver: "unipc", denoise: 1.0 };
  assert.equal(settingsError(ok), null);
  const refused = [{ steps: 0 }, { steps: 2.5 }, { steps: 10001 }, { shift: 0 }, { shift: 1e-9 }, { boundary: 1.5 }, { solver: "ddim" },
    { denoise: 0 }, { steps: 1000, denoise: 0.01 }];
  for (const bad of refused) {
    assert.match(describeSplit({ ...ok, ...bad }), /^expert split: /, JSON.stringify(bad));
  }
});
