"""How P ranks split one run: CFG (1 or 2) x Ulysses x Ring, the rest replicas. The engine's one
rule, pure integer arithmetic: `parallel.plan` builds and checks plans from it, and the memory
model's command line (which the plan imports) prints a rank of the same split."""
from __future__ import annotations

from .config import A14B

A14B_HEADS = A14B.dit.num_heads


def valid_ulysses_degrees(num_heads: int = A14B_HEADS) -> list[int]:
    """Ulysses scatters whole heads, so the degree must divide the head count (40 -> 1, 2, 4, 5, 8, 10, 20, 40)."""
    return divisors(num_heads)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_split(world_size: int, num_heads: int = A14B_HEADS, *, ulysses: int = 0, ring: int = 0,
                 cfg_parallel: bool | None = None, guidance_batched: bool = True,
                 ranks_per_node: int | None = None) -> tuple[int, int, int]:
    """(cfg_parallel, ulysses, ring) for `world_size` ranks; 0 / None means "choose".

    CFG-parallel, unless set, where it helps: an even rank count, both guidance passes batched
    (batch_cfg, no guidance scale of 1), and the set degrees fit in a half; its one exchange per
    step is the cheapest split there is. Ulysses next, unless set: the largest divisor of the
    heads that divides what is left and the ranks of one node (one all-to-all pair per layer,
    cheapest on NVLink). Ring, unless set, takes the rest. Ranks left over become replicas.
    Degrees that cannot fit are returned as given, for ParallelPlan to refuse with the valid ones.
    """
    fixed = (ulysses or 1) * (ring or 1)
    if cfg_parallel is None:
        cfg_parallel = guidance_batched and world_size % (2 * fixed) == 0
    cfg = 2 if cfg_parallel else 1
    rest = world_size // cfg if world_size % cfg == 0 else world_size
    if not ulysses:
        room = rest // ring if ring and rest % ring == 0 else (1 if ring else rest)
        node = ranks_per_node or world_size
        ulysses = max(d for d in valid_ulysses_degrees(num_heads) if room % d == 0 and node % d == 0)
    if not ring:
        ring = rest // ulysses if rest % ulysses == 0 else 1
    return cfg, ulysses, ring
