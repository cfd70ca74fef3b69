"""The README performance chart's data (benchmarks/charts.py, bench_comm.scaling_series): what the
panels draw must be the recorded H100 numbers and the same projection as bench_comm's table.
Drawing itself (matplotlib) is not exercised here."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_comm  # noqa: E402
import charts  # noqa: E402


def test_scaling_series_is_projection_rows():
    rows = bench_comm.projection_rows()
    series = bench_comm.scaling_series()
    assert series["gpus"] == [1, 2, 4, 8]
    for link in bench_comm.LINKS:
        for g, s, layout in zip(series["gpus"], series["links"][link]["s_per_step"], series["links"][link]["layout"]):
            candidates = [r for r in rows if r["gpus"] == g]
            best = min(candidates, key=lambda r: r[link][0])
            assert s == best[link][0] and layout == best["layout"]  # the same numbers, not a copy
    # the values of the table in benchmarks/RESULTS.md, to its 2 decimals
    nvlink, pcie = (series["links"][k]["s_per_step"] for k in ("NVLink 450 GB/s", "PCIe 25 GB/s"))
    assert nvlink == pytest.approx([27.52, 13.90, 6.98, 3.49], abs=0.005)
    assert pcie == pytest.approx([27.52, 16.24, 8.74, 4.37], abs=0.005)
    assert series["ideal"] == pytest.approx([27.52 / g for g in (1, 2, 4, 8)], abs=0.005)
    # official Wan2.2 README, T2V-A14B 720P on H100: whole run seconds / 40 steps
    assert series["official"] == {1: 1041.5 / 40, 4: 288.7 / 40, 8: 155.1 / 40}


def test_step_rows_from_recorded_h100_runs():
    rows = {r["config"]: r for r in charts.step_rows(charts.load_runs())}
    assert rows["official"]["s_per_step"] == pytest.approx(26.0375, abs=1e-9)
    non_block = 25.622560501098633  # ms, measured in h100_1_all.json (runs 2-4 measured none)
    own = 25.713279724121094  # ms, run 5's own
    # latest run of each configuration (run 5); runs 3 and 4 compiled before it, with run 1's non-block time
    assert rows["ours compiled"]["s_per_step"] == pytest.approx((40 * 563.1341857910156 + own) / 1e3, rel=1e-12)
    assert rows["ours compiled"]["runs_s"] == pytest.approx([(40 * 570.5482788085938 + non_block) / 1e3,
                                                             (40 * 565.6928100585938 + non_block) / 1e3,
                                                             (40 * 563.1341857910156 + own) / 1e3], rel=1e-12)
    assert rows["ours compiled + flash_attn4"]["s_per_step"] == pytest.approx((40 * 498.68592834472656 + own) / 1e3)
    assert rows["ours eager"]["s_per_step"] == pytest.approx(24.347, abs=5e-4)
    assert rows["diffusers WanTransformerBlock"]["s_per_step"] == pytest.approx(25.113, abs=5e-4)
    assert rows["ours compiled"]["ratio_to_official"] == pytest.approx(0.866, abs=5e-4)
    assert rows["ours compiled + flash_attn4"]["ratio_to_official"] == pytest.approx(0.767, abs=5e-4)
    assert not any(c.startswith("ours sdpa[") for c in rows)  # pinned-kernel diagnostics left out
    assert {"ours fp8 (auto: scaled_mm)", "ours block swap (2/2 streamed)"} <= set(rows)
    # rows measured on the old transposed stream are starred; runs that record their stream are not
    assert rows["ours fp8 (auto: scaled_mm)"]["label"].endswith("*") and not rows["ours eager"]["label"].endswith("*")
    new_run = {"file": "h100_9_new.json", "stream": "contiguous", "non_block_ms": {"720p": 25.0}, "results": [
        {"config": "ours fp8 (auto: scaled_mm)", "shape": charts.SHAPE, "ms_per_block": 600.0}]}
    rows = {r["config"]: r for r in charts.step_rows([*charts.load_runs(), new_run])}
    assert rows["ours fp8 (auto: scaled_mm)"]["s_per_step"] == pytest.approx((40 * 600 + 25) / 1e3)
    assert not rows["ours fp8 (auto: scaled_mm)"]["label"].endswith("*")


def test_missing_or_dry_run_results_fail_clearly(tmp_path):
    with pytest.raises(SystemExit, match=r"h100_\*\.json not found"):
        charts.load_runs(tmp_path)
    (tmp_path / "h100_9_dry.json").write_text(json.dumps({"dry_run": True, "machine": {"device": "CPU"}}))
    with pytest.raises(SystemExit, match="dry-run"):
        charts.load_runs(tmp_path)
