"""The frontend extension's contracts with the Python side.

web/js/expert_split.js re-implements the expert switch (schedule + select_expert) for the live
label on Wan22MoESampler; web/tests/expert_split.test.mjs (node --test) checks it against
web/tests/vectors.json. This test checks that file against the engine, so a change to the
schedule fails here until the vectors (and then the JS) are updated:

    .venv/bin/python tests/test_web.py --write

The worker status line and the LoRA report listen for names the nodes send: those are checked
against the Python constants here, and the frontend versions the browser test runs against the
pin in pyproject.toml and the README.
"""
import ast
import json
import random
import re
import sys
from pathlib import Path

from wan22_core.config import MAX_STEPS, MIN_SHIFT, SOLVERS
from wan22_core.sampling.moe import HIGH, select_expert
from wan22_core.sampling.schedule import partial_schedule

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "web" / "tests" / "vectors.json"


def _case(steps: int, shift: float, boundary: float, solver: str, denoise: float) -> dict:
    timesteps = partial_schedule(steps, shift, solver, denoise).timesteps.tolist()
    high = sum(select_expert(t, boundary) == HIGH for t in timesteps)
    return dict(steps=steps, shift=shift, boundary=boundary, solver=solver, denoise=denoise,
                timesteps=timesteps, high_noise_steps=high)


def build_vectors() -> list[dict]:
    """Defaults, every solver, edge values, then random widget-like values (seeded)."""
    cases = [_case(40, 12.0, 0.875, solver, 1.0) for solver in SOLVERS]
    for steps in (1, 2, 3, 4, 8, 20, 50):
        for shift in (1.0, 3.0, 5.0, 8.0, 12.0, 17.5):
            cases.append(_case(steps, shift, 0.875, SOLVERS[steps % 3], 1.0))
    for boundary in (0.0, 0.5, 0.9, 0.95, 0.999, 1.0):
        cases.append(_case(40, 12.0, boundary, "unipc", 1.0))
    for denoise in (0.3, 0.5, 0.75, 0.99):
        cases.append(_case(20, 8.0, 0.875, "euler", denoise))
    rng = random.Random(0)
    for _ in range(120):
        cases.append(_case(rng.randint(1, 80), round(rng.uniform(0.5, 25.0), rng.choice((1, 3, 6))),
                           round(rng.uniform(0.5, 1.0), rng.choice((2, 3, 5))), rng.choice(SOLVERS),
                           rng.choice((1.0, 1.0, round(rng.uniform(0.05, 1.0), 2)))))
    return cases


def test_vectors_match_the_engine():
    assert VECTORS.is_file(), f"{VECTORS} is missing; run: .venv/bin/python tests/test_web.py --write"
    committed = json.loads(VECTORS.read_text())
    assert committed == build_vectors(), "the schedule changed: run .venv/bin/python tests/test_web.py --write"


def test_vectors_cover_both_experts_and_the_default_split():
    cases = build_vectors()
    default = cases[0]
    assert (default["steps"], default["solver"], default["high_noise_steps"]) == (40, "unipc", 26)
    highs = {(c["high_noise_steps"] == 0, c["high_noise_steps"] == c["steps"]) for c in cases}
    assert highs == {(False, False), (True, False), (False, True)}  # split, all low, all high


def python_constant(path: Path, name: str) -> str:
    """A module-level string constant, read without importing the pack (its imports are relative)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path.name} defines no {name} = ...")


def test_the_label_refuses_what_the_engine_refuses():
    """expert_split.js copies the engine's solver names and step limit: they must stay equal."""
    js = (ROOT / "web/js/expert_split.js").read_text()
    assert json.loads(re.search(r"export const SOLVERS = (\[[^\]]*\]);", js).group(1)) == list(SOLVERS)
    assert int(re.search(r"export const MAX_STEPS = (\d+);", js).group(1)) == MAX_STEPS
    assert float(re.search(r"export const MIN_SHIFT = ([\d.]+);", js).group(1)) == MIN_SHIFT


def test_the_status_event_and_the_ui_keys_match_the_nodes():
    js_event = re.search(r'export const EVENT = "([^"]+)"', (ROOT / "web/js/worker_status.js").read_text()).group(1)
    assert js_event == python_constant(ROOT / "nodes/comfy_adapter.py", "WORKER_STATUS_EVENT")
    sampler, extension = (ROOT / "nodes/sampler.py").read_text(), (ROOT / "web/js/wan22_moe.js").read_text()
    assert 'ui = {"lora_report": ' in sampler and "output?.lora_report" in extension
    assert 'ui["parallel_split"] = ' in sampler and "output?.parallel_split" in extension
    assert '"step_cache": [passes_summary(' in sampler and "output?.step_cache" in extension
    config = (ROOT / "nodes/parallel.py").read_text()  # the multi-GPU node's memory line
    assert '{"ui": {"memory": ' in config and "output?.memory" in extension


def test_the_oldest_tested_frontend_is_the_pinned_floor_and_the_readme_names_both():
    """tests/test_browser.py runs TESTED_FRONTENDS; pyproject's pin and the README must say the same."""
    from frontend import TESTED_FRONTENDS

    floor = re.search(r'"comfyui-frontend-package>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert TESTED_FRONTENDS[0] == floor
    readme = (ROOT / "README.md").read_text()
    assert [v for v in TESTED_FRONTENDS if f"**{v}**" not in readme] == []


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_web.py --write")
    VECTORS.write_text(json.dumps(build_vectors(), separators=(",", ":")) + "\n")
    print(f"wrote {VECTORS}")
