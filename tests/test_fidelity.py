"""benchmarks/fidelity.py: its machinery against diffusers (always), against the official Wan2.2
code when WAN22_OFFICIAL_REPO names a checkout, its bound check and its bf16 dry run."""
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fidelity
from reference import float64_attention
from wan22_core.config import SamplerSettings


@pytest.fixture(scope="module")
def model_sets(tmp_path_factory):
    return fidelity.write_model_set(tmp_path_factory.mktemp("fidelity") / "models", comfy=False)


def test_machinery_against_diffusers(model_sets, tmp_path, monkeypatch):
    """Every case kind through the script's own functions, diffusers as the reference (no checkout in CI):
    ours (API and CLI) within the published bound, and the LoRA, the odd sizes and the ranks really in play."""
    monkeypatch.setattr(fidelity, "RANK_LAYOUTS", fidelity.RANK_LAYOUTS[:1])  # one 2-rank group: seconds, not a minute
    monkeypatch.setattr(fidelity, "CLI_CASES", ("lora", "ranks"))  # the CLI with LoRA flags, and under torchrun
    run = fidelity.Run(sets=model_sets, workdir=tmp_path, device=torch.device("cpu"))
    cases = [replace(fidelity.CASES[name], settings=replace(fidelity.CASES[name].settings, steps=4))
             for name in ("defaults", "odd", "lora", "ranks")]
    rows = fidelity.run_cases(cases, run)

    assert fidelity.failures(rows) == []
    by_name = {(row.case, row.quantity.split(" (")[0]): row.cells["ours"] for row in rows}
    for case in ("defaults", "odd", "lora"):
        for quantity in ("DiT forward, high-noise expert", "DiT forward, low-noise expert", "final latents"):
            cell = by_name[(case, quantity)]
            # measured 4e-7 - 1e-6 (forwards), 4e-7 - 7e-7 (latents): fp32 op-order rounding
            assert cell.bound is not None and cell.rel <= cell.bound, (case, quantity, cell)
    ranks = by_name[("ranks", "final latents, 2 ranks: Ulysses 2 + FSDP")]
    assert ranks.rel <= fidelity.BOUNDS[("ours", "latents")]
    # our CLI as a subprocess (`generate --dtype fp32 --text-dtype fp32 --no-video`), one process and torchrun
    for key in [("lora", f"final latents, CLI `{' '.join(fidelity.CLI_FP32)}`"),
                ("ranks", "final latents, CLI under torchrun, 2 ranks: `--ulysses 2 --fsdp`")]:
        assert by_name[key].bound == fidelity.BOUNDS[("ours", "latents")] and by_name[key].rel <= by_name[key].bound, key
    latents = {name: ref for name, (ref, _) in run.reference_latents.items()}
    assert latents["odd"].shape == (16, 4, 6, 10)  # 13 frames of 80 x 48
    # the LoRA moved the result: both sides applied it (hand-merged for diffusers, apply_loras for ours)
    assert fidelity.rel_l2(latents["lora"], latents["defaults"]) > 1e-3  # measured 7.9e-3, 1e4 x the tolerance
    assert "| defaults | final latents (4 steps, unipc) |" in fidelity.table(rows, run.reference_name)


def test_a_case_over_its_bound_exits_1(monkeypatch, capsys):
    monkeypatch.setitem(fidelity.BOUNDS, ("ours", "latents"), 1e-12)
    monkeypatch.setattr(fidelity, "CLI_CASES", ())
    assert fidelity.main(["--cases", "defaults", "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "over its bound: defaults / final latents (2 steps, unipc) / ours" in err


def test_missing_packages_and_bad_cases_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(fidelity, "OFFICIAL_PACKAGES", ("ftfy_is_not_this", "regex"))
    assert fidelity.main(["--official-repo", str(tmp_path)]) == 2
    assert "pip install ftfy_is_not_this" in capsys.readouterr().err
    monkeypatch.undo()
    assert fidelity.main(["--cases", "defaults,nope"]) == 2
    assert "--cases: unknown nope; choose from defaults, dpm++, odd, lora, ranks" in capsys.readouterr().err


def test_official_attention_stand_in_matches_masked_softmax():
    """The flash-attention stand-in against softmax(q k^T / sqrt(d) + key mask) v in float64."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 8, generator=g) for _ in range(3))  # [B, L, heads, dim]
    k_lens = torch.tensor([7, 4])
    out = fidelity.official_attention_stand_in(None)(q, k, v, k_lens=k_lens)
    expected, _ = float64_attention(q, k, v, key_lens=k_lens)
    assert out.dtype == torch.float32 and fidelity.rel_l2(out, expected) <= 1e-6  # measured 1.1e-7
    bf16 = fidelity.official_attention_stand_in(torch.bfloat16)(q, k, v, k_lens=k_lens)
    assert bf16.dtype == torch.float32 and 1e-4 < fidelity.rel_l2(bf16, expected) < 2e-2  # FlashAttention's bf16 inputs
    with pytest.raises(NotImplementedError):
        fidelity.official_attention_stand_in(None)(q, k, v, causal=True)


def test_bf16_section_dry_run(capsys):
    """The GPU section at tiny size on the CPU: ours bf16 no less accurate than diffusers' bf16."""
    assert fidelity.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "| bf16 480p | final latents (2 steps) |" in out
    assert "noise floor: ours vs ours, other op order" in out and "ours bf16 vs fp32" in out


def test_against_the_official_code():
    """All cases against a checkout of Wan-Video/Wan2.2: fp32 final latents within 1e-6, multi-rank included."""
    repo = os.environ.get("WAN22_OFFICIAL_REPO")
    if not repo:
        pytest.skip("WAN22_OFFICIAL_REPO is not set: no checkout of Wan-Video/Wan2.2 to compare with "
                    "(the machinery runs against diffusers in test_machinery_against_diffusers)")
    assert fidelity.main(["--official-repo", str(Path(repo))]) == 0


def test_settings_override_keeps_the_rest_of_the_case():
    args = fidelity.parser().parse_args(["--cases", "odd", "--steps", "3"])
    (case,) = fidelity.selected_cases(args)
    assert case.settings == SamplerSettings(steps=3, shift=5.0, boundary=0.9) and case.frames == 13
