"""The scripts' `--append-results`: one measured section appended to benchmarks/RESULTS.md."""
from __future__ import annotations

from pathlib import Path

import torch

RESULTS_MD = Path(__file__).parent / "RESULTS.md"


def append_results(heading: str, script: str, conditions: str, text: str) -> None:
    """Append `## heading`, the command line with torch's version and `conditions`, and `text`."""
    with RESULTS_MD.open("a") as f:
        f.write(f"\n## {heading}\n\n`python benchmarks/{script}` (torch {torch.__version__}{conditions}).\n\n{text}\n")
