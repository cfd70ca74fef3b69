"""`python -m wan22_core {demo,generate,make-tiny}` (the command-line contract, design.md §4).

parser: the flags and the plain values read back from them; stages: encode, denoise, save,
shared by one process and the torchrun ranks; commands: `main` and each command; torchrun:
`generate` on the ranks of `torchrun`.
"""
from .commands import main
from .parser import build_parser

__all__ = ["main", "build_parser"]
