// The multi-GPU status line of Wan22MoESampler: what each worker rank is doing.
//
// The sampler's worker group reports one rank at a time ("loading high-noise expert", "ready",
// "step 3/40", "error"); the server forwards each as a `wan22moe.worker_status` websocket event
// {node, rank, ranks, status}. Neighbouring ranks in the same state share one entry, so 8
// ranks in lockstep read "ranks 0-7: step 3/40".
// No browser or ComfyUI imports: node's test runner loads this file as it is.

export const EVENT = "wan22moe.worker_status";
const NOT_STARTED = "workers: start on the first run";
const UNHEARD = "starting";

// The statuses after one event; a different rank count means a new group, so start afresh.
export function applyStatus(state, { rank, ranks, status }) {
  const statuses = state && state.ranks === ranks ? [...state.statuses] : Array(ranks).fill(UNHEARD);
  if (Number.isInteger(rank) && rank >= 0 && rank < ranks) statuses[rank] = String(status);
  return { ranks, statuses };
}

function rankSpan(first, last) {
  return first === last ? `rank ${first}` : `ranks ${first}-${last}`;
}

// "workers: ranks 0-1: step 3/40" or "workers: rank 0: ready | rank 1: loading low-noise expert".
export function describeRanks(state) {
  if (!state || !state.ranks) return NOT_STARTED;
  const parts = [];
  let first = 0;
  for (let rank = 1; rank <= state.ranks; rank++) {
    if (rank === state.ranks || state.statuses[rank] !== state.statuses[first]) {
      parts.push(`${rankSpan(first, rank - 1)}: ${state.statuses[first]}`);
      first = rank;
    }
  }
  return `workers: ${parts.join(" | ")}`;
}
