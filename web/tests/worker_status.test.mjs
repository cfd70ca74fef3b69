// node --test web/tests/   (the multi-GPU status line's pure logic)
import assert from "node:assert/strict";
import test from "node:test";

import { applyStatus, describeRanks } from "../js/worker_status.js";

function replay(events) {
  return events.reduce((state, event) => applyStatus(state, event), null);
}

test("before any event the line says the workers start on the first run", () => {
  assert.equal(describeRanks(null), "workers: start on the first run");
});

test("ranks in the same state share one entry", () => {
  const state = replay([0, 1, 2, 3].map((rank) => ({ rank, ranks: 4, status: "step 3/40" })));
  assert.equal(describeRanks(state), "workers: ranks 0-3: step 3/40");
});

test("ranks not heard from yet read as starting; different states are listed in rank order", () => {
  const state = replay([
    { rank: 0, ranks: 4, status: "loading high-noise expert" },
    { rank: 3, ranks: 4, status: "ready" },
  ]);
  assert.equal(describeRanks(state), "workers: rank 0: loading high-noise expert | ranks 1-2: starting | rank 3: ready");
});

test("an error on one rank shows next to the others", () => {
  const state = replay([
    { rank: 0, ranks: 2, status: "step 2/4" },
    { rank: 1, ranks: 2, status: "step 2/4" },
    { rank: 1, ranks: 2, status: "error" },
  ]);
  assert.equal(describeRanks(state), "workers: rank 0: step 2/4 | rank 1: error");
});

test("a new rank count is a new group: the old statuses are dropped", () => {
  const old = replay([0, 1].map((rank) => ({ rank, ranks: 2, status: "ready" })));
  const fresh = applyStatus(old, { rank: 0, ranks: 4, status: "ready" });
  assert.equal(describeRanks(fresh), "workers: rank 0: ready | ranks 1-3: starting");
  assert.equal(describeRanks(old), "workers: ranks 0-1: ready", "the old state is not modified");
});

test("a rank outside the group is ignored", () => {
  const state = applyStatus(null, { rank: 5, ranks: 2, status: "ready" });
  assert.equal(describeRanks(state), "workers: ranks 0-1: starting");
});
