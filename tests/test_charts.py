"""The README performance chart's data (benchmarks/charts.py, bench_comm.scaling_series): what the
panels draw must be the recorded H100 numbers and bench_comm's projection table in RESULTS.md.
Drawing itself (matplotlib) is not exercised here."""
import json

import bench_comm  # benchmarks/, on sys.path from conftest.py
import charts
import pytest


def test_scaling_series_has_the_projection_table_values():
    series = bench_comm.scaling_series()
    assert series["gpus"] == [1, 2, 4, 8]
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
