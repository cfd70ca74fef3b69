"""benchmarks/fast_modes.py (step caching: passes saved vs deviation): its pieces, and its dry run through
the engine's loop with the step cache."""
import json
import math

import fast_modes  # benchmarks/, on sys.path from conftest.py
import pytest
import torch


def test_psnr_of_frames():
    frames = torch.rand(5, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    assert fast_modes.psnr(frames, frames) == math.inf
    shifted = frames + torch.where(torch.rand(frames.shape) < 0.5, 0.01, -0.01)  # mse 1e-4 up to float32 rounding
    assert fast_modes.psnr(shifted, frames) == pytest.approx(40.0, abs=1e-4)  # 10 log10(1 / 1e-4)


def test_table_names_every_threshold_with_its_passes():
    rows = [dict(threshold=t, passes_run=p, steps=40, seconds=s, time_ratio=s / 2.0, rel_l2=e, psnr_db=db)
            for t, p, s, e, db in ((0.0, 40, 2.0, 0.0, math.inf), (0.05, 31, 1.6, 2e-3, 48.2))]
    lines = fast_modes.table(rows).splitlines()
    assert lines[2] == "| 0 | 40 of 40 | 2.00 (1.00) | 0.00e+00 | inf |"
    assert lines[3] == "| 0.05 | 31 of 40 | 1.60 (0.80) | 2.00e-03 | 48.2 |"


def test_the_chart_plots_the_rows_that_saved_passes_and_names_the_others():
    rows = [dict(threshold=t, passes_run=p, steps=40) for t, p in ((0.0, 40), (0.02, 40), (0.1, 36), (0.2, 19))]
    plotted, exact = fast_modes.chart_rows(rows)
    assert [r["threshold"] for r in plotted] == [0.1, 0.2] and exact == [0.02]


def test_the_exact_run_comes_first():
    with pytest.raises(ValueError, match="the first threshold must be 0"):
        fast_modes.measure(None, (0.05, 0.0), repeats=1)


def test_build_makes_a_tiny_problem_the_loop_and_vae_run():
    setup = fast_modes.build(steps=2, frames=5, size=32)
    assert setup.noise.shape == (16, 2, 4, 4) and setup.settings.steps == 2
    latent = fast_modes.denoise(setup.experts, setup.positive, setup.negative, setup.noise, setup.settings)
    frames = fast_modes.decode_to_video(setup.vae, latent)
    assert frames.shape == (5, 32, 32, 3) and torch.isfinite(frames).all()


def test_dry_run_saves_passes_and_measures_the_deviation(tmp_path):
    fast_modes.main(["--dry-run", "--json", str(tmp_path / "fast.json")])
    data = json.loads((tmp_path / "fast.json").read_text())
    rows = data["rows"]
    assert data["dry_run"] and [r["threshold"] for r in rows] == list(fast_modes.THRESHOLDS)
    assert rows[0]["passes_run"] == rows[0]["steps"] == 12 and rows[0]["rel_l2"] == 0
    passes = [r["passes_run"] for r in rows]
    assert passes == sorted(passes, reverse=True) and passes[-1] < passes[0]  # more threshold, fewer passes
    for r in rows:  # a run that skipped nothing is the exact run; one that skipped deviates
        assert (r["rel_l2"] > 0) == (r["passes_run"] < r["steps"])
