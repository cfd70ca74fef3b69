// Where Wan22MoESampler switches from the high-noise to the low-noise expert.
//
// The same arithmetic as wan22_core.sampling.schedule (flow_schedule, partial_schedule) and
// wan22_core.sampling.moe.select_expert, operation for operation in float64, so the label agrees
// with the sampler on every step; web/tests/vectors.json (written from Python) checks that.
// No browser or ComfyUI imports: node's test runner loads this file as it is.

const NUM_TRAIN_TIMESTEPS = 1000;
// The official UniPC grid starts at its first training sigma stored as float32, read back.
const UNIPC_SIGMA_MAX = Math.fround(1 - 1 / NUM_TRAIN_TIMESTEPS);
export const SOLVERS = ["unipc", "dpm++", "euler"];
// The longest schedule the engine builds (wan22_core.config.MAX_STEPS; tests/test_web.py checks both).
export const MAX_STEPS = 10000;
export const MIN_SHIFT = 0.001; // wan22_core.config.MIN_SHIFT

// numpy.linspace(start, stop, num)[:count]: i * step + start, step = (stop - start) / (num - 1).
function linspaceHead(start, stop, num, count) {
  const step = (stop - start) / (num - 1);
  return Array.from({ length: count }, (_, i) => i * step + start);
}

function shiftSigma(sigma, shift) {
  return (shift * sigma) / (1 + (shift - 1) * sigma);
}

// int(sigma' * 1000) timesteps of a full schedule of `steps` steps.
export function flowTimesteps(steps, shift, solver) {
  const start = solver === "unipc" ? UNIPC_SIGMA_MAX : 1.0;
  return linspaceHead(start, 0.0, steps + 1, steps).map((s) => Math.trunc(shiftSigma(s, shift) * NUM_TRAIN_TIMESTEPS));
}

// The last `steps` timesteps of a max(steps, int(steps / denoise))-step schedule.
export function partialTimesteps(steps, shift, solver, denoise = 1.0) {
  const total = Math.max(steps, Math.trunc(steps / denoise));
  return flowTimesteps(total, shift, solver).slice(total - steps);
}

// Why the settings cannot be sampled (the engine's checks), or null when they can.
export function settingsError({ steps, shift, boundary, solver, denoise = 1.0 }) {
  if (!Number.isInteger(steps) || steps < 1) return "steps must be an integer >= 1";
  if (steps > MAX_STEPS) return `steps must be at most ${MAX_STEPS}`;
  if (!Number.isFinite(shift) || shift < MIN_SHIFT) return `shift must be >= ${MIN_SHIFT}`;
  if (!(boundary >= 0 && boundary <= 1)) return "boundary must be in [0, 1]";
  if (!SOLVERS.includes(solver)) return `unknown solver ${solver}`;
  if (!(denoise > 0 && denoise <= 1)) return "denoise must be in (0, 1]";
  if (steps / denoise > MAX_STEPS) return `steps / denoise is over ${MAX_STEPS}: use denoise >= ${steps / MAX_STEPS}`;
  return null;
}

// Number of leading steps that run the high-noise expert (timesteps only decrease).
export function highNoiseSteps({ steps, shift, boundary, solver, denoise = 1.0 }) {
  const threshold = boundary * NUM_TRAIN_TIMESTEPS;
  return partialTimesteps(steps, shift, solver, denoise).filter((t) => t >= threshold).length;
}

function span(first, last) {
  return first === last ? `${first}` : `${first}-${last}`;
}

function stepsLabel(first, last) {
  return `${first === last ? "step" : "steps"} ${span(first, last)}`;
}

// "high-noise steps 1-26 | low-noise 27-40", or what is wrong with the settings.
export function describeSplit(settings) {
  const error = settingsError(settings);
  if (error) return `expert split: ${error}`;
  const { steps } = settings;
  const high = highNoiseSteps(settings);
  if (high === steps) return `high-noise ${stepsLabel(1, steps)} | low-noise none`;
  if (high === 0) return `high-noise none | low-noise ${stepsLabel(1, steps)}`;
  return `high-noise ${stepsLabel(1, high)} | low-noise ${span(high + 1, steps)}`;
}
