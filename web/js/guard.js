// Failures inside the extension never break a node: each extra runs behind a guard that logs
// the first failure of each kind once, naming what failed, and lets the node work without it.
// No browser or ComfyUI imports: node's test runner loads this file as it is.

export const PREFIX = "[wan22-moe]";

// report(what, error): console.error once per `what`, however often it fails afterwards.
export function makeReporter(log = console) {
  const reported = new Set();
  return (what, error) => {
    if (reported.has(what)) return;
    reported.add(what);
    log.error(`${PREFIX} ${what} failed (reported once; the node works without it): ${error?.message ?? error}`, error);
  };
}

// fn, except that a throw is reported as `what` and `fallback` is returned instead.
export function guarded(report, what, fn, fallback) {
  return function (...args) {
    try {
      return fn.apply(this, args);
    } catch (error) {
      report(what, error);
      return fallback;
    }
  };
}
