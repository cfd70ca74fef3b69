"""Peak GPU memory of one Wan2.2 expert forward, predicted from shapes alone.

    python -m wan22_core.memory          # the 720p table for every offload mode, and the
                                         # small-card table (GGUF files on 8-24 GB cards)
    python -m wan22_core.memory --gpus 2 --weights fp8 --no-batch-cfg   # one rank of a multi-GPU plan
    python -m wan22_core.memory --multigpu-table                         # docs/multigpu.md's table

The prediction is the peak of `torch.cuda.max_memory_allocated` during denoising:

- weights: what the offload mode keeps on the device. "none": both experts (ExpertPair with
  keep_both). "swap_experts": the active expert only. "block_swap": the active expert minus
  its `swap_blocks` streamed blocks, plus the two of those in flight (BlockSwap runs one and
  prefetches the next).
- activations: a replay, tensor by tensor, of what the eager `WanBlock.forward` in
  models/transformer.py allocates and frees under torch.no_grad (see `block_activation_peak`),
  plus what lives for the whole forward (text context, modulation, RoPE tables).

Not included: the CUDA context and allocator slack outside `max_memory_allocated` (budget about
1.5 GiB, `CUDA_OVERHEAD`), the text encoder (released after encoding) and the VAE decode, which
runs after denoising (tile it on small cards).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from .config import FRAMES, HEIGHT, HEIGHT_480P, WIDTH, WIDTH_480P, DiTConfig, is_integer
from .fp8 import COMPUTE_MODES
from .offload import OFFLOAD_MODES, expert_pair_options
from .pipeline import latent_shape, latent_tokens
from .quant import TYPES
from .split import choose_split

FP8_COMPUTE = tuple(mode for mode in COMPUTE_MODES if mode != "auto")  # the modes "auto" picks from
FP32 = 4
GIB = 1024**3
CUDA_OVERHEAD = int(1.5 * GIB)  # CUDA context, cuBLAS workspace, allocator rounding: measured 1-1.5 GiB
LINEARS_PER_BLOCK = 10  # q, k, v, o of both attentions and the two FFN layers
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")

# GGUF files of the Wan experts, by the quant in their names: the type of the block Linears, and
# the layers llama-quantize (ComfyUI-GGUF's lcpp.patch, `img_tensor_get_type`) gives a bigger one.
# Its "first N blocks" rules (Q4_K_S's and Q3_K_M's v) are left out: under 0.2 % of an expert.
# Predicted sizes match the published files within 0.3 % (tests/test_memory.py).
GGUF_FILE_TYPES = {
    "Q8_0": ("Q8_0", {}),
    "Q6_K": ("Q6_K", {}),
    "Q5_K_M": ("Q5_K", {"v": "Q6_K", "ffn.2": "Q6_K"}),
    "Q5_K_S": ("Q5_K", {}),
    "Q5_1": ("Q5_1", {}),
    "Q5_0": ("Q5_0", {"ffn.2": "Q5_1"}),
    "Q4_K_M": ("Q4_K", {"v": "Q6_K", "ffn.2": "Q6_K"}),
    "Q4_K_S": ("Q4_K", {"ffn.2": "Q5_K"}),
    "Q4_1": ("Q4_1", {}),
    "Q4_0": ("Q4_0", {"ffn.2": "Q4_1"}),
    "Q3_K_L": ("Q3_K", {"v": "Q5_K", "ffn.2": "Q5_K"}),
    "Q3_K_M": ("Q3_K", {"v": "Q4_K", "ffn.2": "Q4_K"}),
    "Q3_K_S": ("Q3_K", {}),
    "Q2_K": ("Q2_K", {"v": "Q3_K"}),
}
# Bytes per weight alive at once while `quant.dequantize` turns one weight into the compute dtype
# (2- and 4-byte), its output included: the fp32 values, their compute-dtype copy and the integer
# codes; measured per type by tests/test_memory.py (torch.compile fuses them away).
DEQUANT_PEAK_BYTES = {
    "Q8_0": (6.0, 4.1875), "Q4_0": (6.0, 5.0), "Q4_1": (6.0, 5.0), "Q5_0": (6.0, 5.0), "Q5_1": (6.0, 5.0),
    "Q2_K": (6.0, 5.5), "Q3_K": (7.0, 7.0), "Q4_K": (6.0, 5.328125), "Q5_K": (6.328125, 6.328125),
    "Q6_K": (7.0, 7.0),
}


def gguf_linear_types(file_type: str | Mapping[str, str]) -> dict[str, str]:
    """{block Linear (BLOCK_LINEARS): its GGUF type} in a GGUF expert file of `file_type` ("Q4_K_M"),
    or `file_type` itself when it is such a mapping already (a file's own types, from its headers)."""
    if isinstance(file_type, Mapping):
        if set(file_type) != set(BLOCK_LINEARS) or not set(file_type.values()) <= set(TYPES):
            raise ValueError(f"GGUF types must map each of {', '.join(BLOCK_LINEARS)} to one of {', '.join(TYPES)}; "
                             f"got {dict(file_type)}")
        return dict(file_type)
    if file_type not in GGUF_FILE_TYPES:
        raise ValueError(f"gguf must be one of {', '.join(GGUF_FILE_TYPES)} (the quant in a GGUF file's name); "
                         f"got {file_type!r}")
    base, bigger = GGUF_FILE_TYPES[file_type]
    return {name: bigger.get(name.rpartition(".")[2] if name.startswith(("self", "cross")) else name, base)
            for name in BLOCK_LINEARS}


# ---------------------------------------------------------------------------------------------
# 1. Weights


def param_counts(cfg: DiTConfig) -> dict[str, int]:
    """Parameters of one expert (official `WanModel`), split the way fp8 checkpoints store them.

    block_linear_weights / block_other: per block (Linear weights; biases, norms, modulation);
    non_block: embeddings, time projection and head, once per expert.
    """
    d, f = cfg.dim, cfg.ffn_dim
    patch = math.prod(cfg.patch_size)
    return {
        "block_linear_weights": 8 * d * d + 2 * d * f,  # self/cross q,k,v,o + ffn.0, ffn.2
        "block_other": (8 * d + f + d)  # Linear biases
        + 4 * d + 2 * d  # norm_q, norm_k of both attentions; norm3 weight and bias
        + 6 * d,  # modulation [1, 6, dim]
        "non_block": (cfg.in_dim * patch * d + d)  # patch_embedding
        + (cfg.text_dim * d + d + d * d + d)  # text_embedding MLP
        + (cfg.freq_dim * d + d + d * d + d)  # time_embedding MLP
        + (d * 6 * d + 6 * d)  # time_projection
        + (d * patch * cfg.out_dim + patch * cfg.out_dim + 2 * d),  # head Linear + modulation
    }


def _linear_shapes(cfg: DiTConfig) -> dict[str, int]:
    """Weights of each block Linear (BLOCK_LINEARS)."""
    d, f = cfg.dim, cfg.ffn_dim
    return {name: d * f if name.startswith("ffn") else d * d for name in BLOCK_LINEARS}


def weight_bytes(cfg: DiTConfig, weight_bytes_per_param: int,
                 gguf: str | Mapping[str, str] | None = None) -> tuple[int, int]:
    """(bytes of one block, bytes of one whole expert) on the device.

    2 (bf16) and 4 (fp32) apply to every parameter. 1 means ComfyUI's scaled fp8: block Linear
    weights in fp8 with one fp32 `scale_weight` buffer each, every other parameter in bf16
    (what `wan22_core.fp8.swap_to_fp8` builds). gguf (a file type, e.g. "Q4_K_M"): the block
    Linear weights in their GGUF blocks (`GGUFLinear`), every other parameter in the compute
    dtype of `weight_bytes_per_param` bytes (2 or 4), as `load_dit` holds a GGUF expert; or
    {block Linear: type} (`gguf_linear_types`).
    """
    n = param_counts(cfg)
    if gguf is not None:
        types = gguf_linear_types(gguf)
        linears = sum(TYPES[types[name]].nbytes(numel) for name, numel in _linear_shapes(cfg).items())
        block = linears + weight_bytes_per_param * n["block_other"]
        return block, cfg.num_layers * block + weight_bytes_per_param * n["non_block"]
    if weight_bytes_per_param == 1:
        block = n["block_linear_weights"] + LINEARS_PER_BLOCK * FP32 + 2 * n["block_other"]
        rest = 2 * n["non_block"]
    else:
        block = weight_bytes_per_param * (n["block_linear_weights"] + n["block_other"])
        rest = weight_bytes_per_param * n["non_block"]
    return block, cfg.num_layers * block + rest


# ---------------------------------------------------------------------------------------------
# 2. Activations: a replay of WanBlock.forward's allocations


class _Ledger:
    """Live tensors in program order; remembers the largest total, where, and what was live.

    Names own storages; `alias` is a no-op cast (`.float()` of an fp32 tensor returns itself),
    so a storage is freed only when its last name is.
    """

    def __init__(self):
        self.owner: dict[str, str] = {}  # tensor name -> storage name
        self.size: dict[str, int] = {}  # storage name -> bytes
        self.peak, self.peak_at, self.peak_live = 0, "", {}

    def new(self, name: str, nbytes: int) -> None:
        self.owner[name], self.size[name] = name, nbytes
        total = sum(self.size.values())
        if total > self.peak:
            self.peak, self.peak_at, self.peak_live = total, name, dict(self.size)

    def cast(self, name: str, src: str, copy: bool, nbytes: int) -> None:
        """`src.to(dtype)`: a new tensor, or `src` itself when the dtype already matches."""
        if copy:
            self.new(name, nbytes)
        else:
            self.owner[name] = self.owner[src]

    def free(self, *names: str) -> None:
        for name in names:
            storage = self.owner.pop(name)
            if storage not in self.owner.values():
                del self.size[storage]


def text_slots(cfg: DiTConfig, text_tokens: int | None) -> int:
    """Rows of the embedded text context: the prompt's tokens plus the one slot that stands for
    the zero padding, at most `cfg.text_len` (None: the 512-slot bound)."""
    return cfg.text_len if text_tokens is None or text_tokens >= cfg.text_len else text_tokens + 1


def _layer_norm(led: _Ledger, out: str, elems: int, rows: int) -> None:
    """LayerNorm in fp32 of the (contiguous) residual stream; mean and rstd are one fp32 per token."""
    led.new(out, elems * FP32)
    led.new(out + ".stats", 2 * rows * FP32)
    led.free(out + ".stats")


def _linear(led: _Ledger, out: str, in_elems: int, out_elems: int, weight_elems: int, c: int,
            fp8: str | None) -> None:
    """nn.Linear, FP8Linear in its "dequant" / "scaled_mm" compute modes (wan22_core/fp8.py), or
    GGUFLinear (fp8 is then its GGUF type: the weight dequantised, then the matmul)."""
    if fp8 in DEQUANT_PEAK_BYTES:  # dequantise: codes and fp32 values die inside, the compute-dtype copy lives on
        led.new(out + ".dequant", int(weight_elems * DEQUANT_PEAK_BYTES[fp8][c == FP32]))
        led.free(out + ".dequant")
        led.new(out + ".weight", weight_elems * c)
        led.new(out, out_elems * c)
        led.free(out + ".weight")
        return
    if fp8 == "dequant":  # the layer's weight dequantised to the compute dtype, freed after
        led.new(out + ".weight", weight_elems * c)
        led.new(out, out_elems * c)
        led.free(out + ".weight")
        return
    if fp8 == "scaled_mm":  # per-tensor activation scale: abs().max(), then fp8.to_fp8: (x / s).clamp_().to(fp8)
        led.new(out + ".abs", in_elems * c)
        led.free(out + ".abs")
        led.new(out + ".div", in_elems * c)  # clamp_ works in place on it
        led.new(out + ".fp8", in_elems)
        led.free(out + ".div")
        led.new(out, out_elems * c)
        led.free(out + ".fp8")
        return
    led.new(out, out_elems * c)


def _rms_norm(led: _Ledger, out: str, src: str, elems: int, rows: int, c: int) -> None:
    """RMSNorm: `F.rms_norm(x.float()).type_as(x) * weight` (fused kernel: output + rstd)."""
    led.cast(out + ".f32", src, c != FP32, elems * FP32)
    led.new(out + ".norm", elems * FP32)
    led.new(out + ".rstd", rows * FP32)
    led.free(out + ".rstd", out + ".f32")
    led.cast(out + ".typed", out + ".norm", c != FP32, elems * c)
    led.free(out + ".norm")
    led.new(out, elems * c)
    led.free(out + ".typed")


def _rope(led: _Ledger, out: str, src: str, elems: int, c: int) -> None:
    """apply_rope: an fp32 copy, one complex product (same bytes as fp32), the cast back."""
    led.cast(out + ".f32", src, c != FP32, elems * FP32)
    led.new(out + ".prod", elems * FP32)
    led.free(out + ".f32")
    led.cast(out, out + ".prod", c != FP32, elems * c)
    led.free(out + ".prod")


def _sequence_kernel(led: _Ledger, name: str, q_elems: int, lse: int, c: int, ulysses: bool, ring: bool) -> None:
    """parallel/sequence.py's attention wrapper around the kernel, as it allocates (this rank's q,
    k and v stay alive in the caller). Ulysses (`ulysses.heads_to_sequence`): the send and
    receive buffers of all three (3 x q each; the result is laid out in the spent send buffer,
    alive until the kernel is done). Then the kernel over this rank's heads of the Ulysses
    group's tokens (as many elements as q), or with a ring `_ring_kernel`. Then Ulysses' way
    back: the output's send and receive buffers. Leaves `{name}.sdpa`, the result on this rank's
    tokens, as without it. Buffers a backend keeps a moment after a collective returns are not counted."""
    if ulysses:
        led.new(f"{name}.send", 3 * q_elems * c)
        led.new(f"{name}.recv", 3 * q_elems * c)
        led.free(f"{name}.recv")
    attn = f"{name}.attn" if ulysses else f"{name}.sdpa"
    if ring:
        _ring_kernel(led, name, attn, q_elems, lse, c)
    else:
        led.new(attn, q_elems * c)  # [B, L, H/U, D]
        led.new(f"{name}.lse", lse)
        led.free(f"{name}.lse")
    if ulysses:
        led.free(f"{name}.send")
        led.new(f"{name}.sdpa", q_elems * c)  # sequence_to_heads: its send buffer becomes the result
        led.new(f"{name}.out_recv", q_elems * c)
        led.free(f"{name}.out_recv", attn)


def _ring_kernel(led: _Ledger, name: str, out: str, q_elems: int, lse: int, c: int) -> None:
    """parallel/ring.py's ring_attention: this rank's K and V stacked into one message and a second
    buffer receiving the next one (2 x q each, alive throughout), and per ring step the kernel's
    partial (q and its log-sum-exp) merged into the fp32 running output (`merge_partials`: the
    partial in fp32, the two rescaled terms and their sum alive at once). The first step only
    converts; every later one merges, and all later steps peak alike, so two steps are replayed.
    Leaves `out`, the result in the compute dtype."""
    f32 = q_elems * FP32
    led.new(f"{name}.kv", 2 * q_elems * c)
    led.new(f"{name}.kv_next", 2 * q_elems * c)
    for step in range(2):
        part = f"{name}.part{step}"
        led.new(part, q_elems * c)
        led.new(part + ".lse", lse)
        led.cast(part + ".f32", part, c != FP32, f32)
        if step == 0:  # the running (out, lse) are the first partial's
            led.free(part)
            continue
        led.new(f"{name}.merged_lse", lse)
        led.new(f"{name}.old_term", f32)  # out * exp(lse - merged)
        led.new(f"{name}.new_term", f32)  # part * exp(part_lse - merged)
        led.new(f"{name}.sum", f32)
        led.free(f"{name}.old_term", f"{name}.new_term", part, part + ".f32", part + ".lse",
                 f"{name}.part0.f32", f"{name}.part0.lse")
    led.new(out, q_elems * c)  # out.to(q.dtype)
    led.free(f"{name}.sum", f"{name}.merged_lse", f"{name}.kv", f"{name}.kv_next")


def _attention(led: _Ledger, name: str, q_elems: int, kv_elems: int, rows: int, lse: int, d: int, c: int,
               modes: dict[str, str | None], rope: bool, ulysses: bool = False, ring: bool = False) -> str:
    """SelfAttention / CrossAttention.forward (k, v from the tokens or the text context); modes:
    `_linear`'s mode of each of "q", "k", "v", "o". With `ulysses` / `ring`, the self-attention
    kernel is the sequence-parallel wrapper (`_sequence_kernel`).

    Returns the name of its output; the caller frees its input after the call.
    """
    kv_rows = kv_elems // d
    # q = apply_rope(norm_q(q(x))), then k the same way: q's temporaries are gone before k's exist
    q, k = f"{name}.q", f"{name}.k"
    for t, elems, t_rows in ((q, q_elems, rows), (k, kv_elems, kv_rows)):  # k, v keep their input's size
        _linear(led, f"{t}_lin", q_elems if t == q else kv_elems, elems, d * d, c, modes[t[-1]])
        _rms_norm(led, t, f"{t}_lin", elems, t_rows, c)
        led.free(f"{t}_lin")
        if rope:
            _rope(led, f"{t}_rot", t, elems, c)
            led.free(t)
    if rope:
        q, k = f"{q}_rot", f"{k}_rot"
    _linear(led, f"{name}.v", kv_elems, kv_elems, d * d, c, modes["v"])
    if ulysses or ring:
        _sequence_kernel(led, name, q_elems, lse, c, ulysses, ring)
    else:
        led.new(f"{name}.sdpa", q_elems * c)  # [B, L, H, D]
        led.new(f"{name}.lse", lse)  # flash/cuDNN log-sum-exp, fp32 per (batch, head, token)
        led.free(f"{name}.lse")
    _linear(led, f"{name}.o", q_elems, q_elems, d * d, c, modes["o"])
    led.free(f"{name}.sdpa", q, k, f"{name}.v")
    return f"{name}.o"


def block_activation_peak(cfg: DiTConfig, tokens: int, batch: int, compute_bytes: int = 2,
                          fp8_compute: str | None = None, text_tokens: int | None = None,
                          gguf: str | Mapping[str, str] | None = None, ulysses: bool = False,
                          ring: bool = False) -> tuple[int, str, dict[str, int]]:
    """Most bytes live at once while one eager `WanBlock.forward` runs under torch.no_grad.

    Counts the block's fp32 input (the caller's loop variable holds it until the block returns)
    and every tensor the forward makes, in the order transformer.py makes and drops them; not
    the weights, the text context or the RoPE tables. Returns (bytes, the tensor whose
    allocation reached the peak, bytes by tensor live at the peak).
    compute_bytes: 2 for bf16/fp16 weights, 4 for fp32. fp8_compute: None for 16/32-bit
    Linears, "scaled_mm" or "dequant" for FP8Linear's compute modes. gguf: a GGUF file type
    ("Q4_K_M") or {block Linear: type} for GGUFLinears, each dequantising its own type (eager).
    ulysses / ring: `tokens` is one rank's share and the self-attention goes through Ulysses'
    all-to-alls and / or ring attention.
    """
    modes = gguf_linear_types(gguf) if gguf is not None else dict.fromkeys(BLOCK_LINEARS, fp8_compute)
    b, n, d, c = batch, tokens, cfg.dim, compute_bytes
    s = b * n * d  # elements of one token activation [B, L, dim]
    ctx = b * text_slots(cfg, text_tokens) * d  # [B, Lc + 1, dim] (the 512-slot bound by default)
    hidden = b * n * cfg.ffn_dim  # [B, L, ffn_dim]
    rows = b * n
    lse = b * cfg.num_heads * n * FP32
    led = _Ledger()
    led.new("x_in", s * FP32)  # [B, L, dim] fp32 residual stream
    led.new("modulation", 6 * b * d * FP32)  # modulation + e0: 6 x [B, 1, dim] fp32

    # self-attention: h = norm1(x) * (1 + scale) + shift; x = x + self_attn(h.to(dtype)) * gate
    _layer_norm(led, "norm1", s, rows)
    led.new("h", s * FP32)  # addcmul(shift, norm1, 1 + scale)
    led.free("norm1")
    led.cast("h.c", "h", c != FP32, s * c)
    led.free("h")  # unnamed in the forward: only its compute-dtype copy (or itself, in fp32) lives on
    out = _attention(led, "self_attn", s, s, rows, lse, d, c, {k: modes[f"self_attn.{k}"] for k in "qkvo"},
                     rope=True, ulysses=ulysses, ring=ring)
    led.free("h.c")
    led.new("x1", s * FP32)  # addcmul(x, out, gate): compute dtype * fp32 gate -> fp32
    led.free(out)

    # cross-attention: x = x + cross_attn(norm3(x).to(dtype), context)
    _layer_norm(led, "norm3", s, rows)
    led.cast("norm3.c", "norm3", c != FP32, s * c)
    led.free("norm3")
    out = _attention(led, "cross_attn", s, ctx, rows, lse, d, c, {k: modes[f"cross_attn.{k}"] for k in "qkvo"},
                     rope=False)
    led.free("norm3.c")
    led.new("x2", s * FP32)
    led.free(out, "x1")

    # feed-forward: h = norm2(x) * (1 + scale) + shift; x + ffn(h.to(dtype)) * gate
    _layer_norm(led, "norm2", s, rows)
    led.new("h2", s * FP32)  # addcmul(shift, norm2, 1 + scale)
    led.free("norm2")
    led.cast("h2.c", "h2", c != FP32, s * c)
    led.free("h2")
    _linear(led, "ffn.0", s, hidden, d * cfg.ffn_dim, c, modes["ffn.0"])
    # the GELU runs in place on ffn.0's output (FeedForward): no new tensor
    _linear(led, "ffn.2", hidden, s, d * cfg.ffn_dim, c, modes["ffn.2"])
    led.free("ffn.0", "h2.c")
    led.new("x_out", s * FP32)  # addcmul(x, ffn, gate)
    return led.peak, led.peak_at, led.peak_live


def forward_persistent_bytes(cfg: DiTConfig, tokens: int, batch: int, compute_bytes: int,
                             text_tokens: int | None = None) -> int:
    """Tensors alive through the whole block loop: the embedded context [B, Lc + 1, dim] (Lc text
    tokens plus the one slot that stands for the zero padding; the 512-slot bound by default),
    e [B, dim] and e0 [B, 6, dim] in fp32, and the RoPE table [L, 1, head_dim/2] complex64."""
    return (batch * text_slots(cfg, text_tokens) * cfg.dim * compute_bytes + 7 * batch * cfg.dim * FP32
            + 2 * tokens * (cfg.head_dim // 2) * FP32)


# ---------------------------------------------------------------------------------------------
# 3. The estimate


def video_tokens(cfg: DiTConfig, frames: int, height: int, width: int) -> int:
    """Tokens of a video: latent frames x (height/8)/2 x (width/8)/2 for the A14B patch size."""
    return latent_tokens(latent_shape(frames, height, width), cfg.patch_size)


def _check(weight_bytes_per_param, offload, swap_blocks, batch, fp8_compute, num_layers, gguf) -> None:
    if weight_bytes_per_param not in (1, 2, 4):
        raise ValueError(f"weight_bytes_per_param must be 1 (fp8), 2 (bf16/fp16) or 4 (fp32), "
                         f"got {weight_bytes_per_param!r}")
    if gguf is not None:
        gguf_linear_types(gguf)  # a known file type
        if weight_bytes_per_param == 1:
            raise ValueError("with gguf, weight_bytes_per_param is the compute dtype's (2 or 4), not fp8's 1")
    if offload not in OFFLOAD_MODES:  # no "auto" here: the estimate is for one placement
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}; got {offload!r}")
    expert_pair_options(offload, swap_blocks, False, num_layers)  # the placements the engine accepts
    if not (is_integer(batch) and batch >= 1):
        raise ValueError(f"batch must be an integer >= 1 (2: cond+uncond batched), got {batch!r}")
    if fp8_compute not in FP8_COMPUTE:
        raise ValueError(f"fp8_compute must be one of {', '.join(FP8_COMPUTE)}; got {fp8_compute!r}")


def estimate_peak_bytes(dit_cfg: DiTConfig, frames: int, height: int, width: int, *,
                        weight_bytes_per_param: int = 2, offload: str = "none", swap_blocks: int = 0,
                        batch: int = 2, fp8_compute: str = "scaled_mm", text_tokens: int | None = None,
                        gguf: str | None = None) -> dict:
    """Predicted peak device bytes (allocator view) of denoising a `frames` x `height` x `width` video.

    batch 2 is cond+uncond in one forward (the pipeline's default batch_cfg=True); 1 is
    batch_cfg=False or guidance 1. fp8_compute matters only for weight_bytes_per_param=1
    ("scaled_mm" on sm_89+ GPUs, "dequant" elsewhere). text_tokens: the prompt length (None: the
    512-token bound). gguf: a GGUF expert file's type ("Q8_0", "Q4_K_M", ...; GGUF_FILE_TYPES), its
    other parameters in the compute dtype of weight_bytes_per_param. Returns ints in bytes: weights,
    activations (= block_activations + persistent_activations), total; plus tokens and
    peak_at (the tensor whose allocation reaches the peak).
    """
    _check(weight_bytes_per_param, offload, swap_blocks, batch, fp8_compute, dit_cfg.num_layers, gguf)
    block, expert = weight_bytes(dit_cfg, weight_bytes_per_param, gguf)
    weights = {"none": 2 * expert, "swap_experts": expert,
               "block_swap": expert - swap_blocks * block + min(2, swap_blocks) * block}[offload]
    tokens = video_tokens(dit_cfg, frames, height, width)
    compute = FP32 if weight_bytes_per_param == 4 else 2
    fp8 = fp8_compute if weight_bytes_per_param == 1 else None
    in_block, peak_at, _ = block_activation_peak(dit_cfg, tokens, batch, compute, fp8, text_tokens, gguf)
    persistent = forward_persistent_bytes(dit_cfg, tokens, batch, compute, text_tokens)
    return {"tokens": tokens, "weights": weights, "block_activations": in_block,
            "persistent_activations": persistent, "activations": in_block + persistent,
            "total": weights + in_block + persistent, "peak_at": peak_at}


def min_swap_blocks(dit_cfg: DiTConfig, frames: int, height: int, width: int, card_bytes: int,
                    **kwargs) -> int | None:
    """Fewest swapped blocks whose predicted peak plus CUDA_OVERHEAD fits `card_bytes`.

    0: swap_experts fits (no block swap); None: not even all blocks swapped fit.
    """
    placements = [("swap_experts", 0)] + [("block_swap", n) for n in range(1, dit_cfg.num_layers + 1)]
    for offload, n in placements:
        est = estimate_peak_bytes(dit_cfg, frames, height, width, offload=offload, swap_blocks=n, **kwargs)
        if est["total"] + CUDA_OVERHEAD <= card_bytes:
            return n
    return None


def table_720p(cfg: DiTConfig = DiTConfig(), card_gib: int = 24) -> str:
    """Markdown table of the 720p (81 x 1280 x 720) predictions, with the 24 GB verdict."""
    frames, height, width = FRAMES, HEIGHT, WIDTH
    lines = ["| weights | batch | offload | weights GiB | activations GiB | total GiB | peak at |",
             "|---|---|---|---|---|---|---|"]
    verdicts = []
    for wb, wname in ((2, "bf16"), (1, "fp8")):
        for batch in (2, 1):
            need = min_swap_blocks(cfg, frames, height, width, card_gib * GIB, weight_bytes_per_param=wb, batch=batch)
            rows = [("none", 0), ("swap_experts", 0), ("block_swap", cfg.num_layers)]
            if need not in (None, 0, cfg.num_layers):
                rows.append(("block_swap", need))
            for offload, n in rows:
                e = estimate_peak_bytes(cfg, frames, height, width, weight_bytes_per_param=wb,
                                        offload=offload, swap_blocks=n, batch=batch)
                label = f"block_swap({n})" if offload == "block_swap" else offload
                lines.append(f"| {wname} | {batch} | {label} | {e['weights'] / GIB:.1f} | "
                             f"{e['activations'] / GIB:.1f} | {e['total'] / GIB:.1f} | {e['peak_at']} |")
            verdicts.append(f"- {wname}, batch {batch}: " + (
                f"does not fit a {card_gib} GiB card even with all {cfg.num_layers} blocks swapped" if need is None
                else f"fits a {card_gib} GiB card with swap_experts (no block swap)" if need == 0
                else f"fits a {card_gib} GiB card with block_swap >= {need}"))
    note = (f"\n\n(total = the allocator peak; a card also needs about {CUDA_OVERHEAD / GIB:.1f} GiB for the CUDA "
            f"context and allocator slack, counted in the verdicts below; a \"24 GB\" card has 24 GiB)\n\n")
    return "\n".join(lines) + note + "\n".join(verdicts)


SMALL_CARDS_GIB = (8, 12, 16, 24)
SMALL_CARD_QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")  # the files people download
SMALL_CARD_VIDEOS = {"480p": (FRAMES, HEIGHT_480P, WIDTH_480P), "720p": (FRAMES, HEIGHT, WIDTH)}


def small_card_advice(cfg: DiTConfig, card_gib: int, video: str, batch: int, quant: str) -> str:
    """What one GGUF file type needs to denoise `video` on a card: "swap_experts", "block_swap N" or
    "no" (min_swap_blocks; both experts never stay on such a card)."""
    need = min_swap_blocks(cfg, *SMALL_CARD_VIDEOS[video], card_gib * GIB, gguf=quant, batch=batch)
    return "no" if need is None else "swap_experts" if need == 0 else f"block_swap {need}"


def small_card_table(cfg: DiTConfig = DiTConfig()) -> str:
    """Markdown table: for 8-24 GiB cards, what each GGUF file type needs at 480p and 720p (81
    frames), with batched CFG (the node, the CLI's default) and with --no-batch-cfg (batch 1)."""
    expert_gb = "| ".join(f"{weight_bytes(cfg, 2, q)[1] / 1e9:.1f} GB " for q in SMALL_CARD_QUANTS)
    lines = ["| card | video | CFG | " + " | ".join(SMALL_CARD_QUANTS) + " |",
             "|---|---|---|" + "---|" * len(SMALL_CARD_QUANTS),
             f"| (one expert) | | | {expert_gb}|"]
    for gib in SMALL_CARDS_GIB:
        for video in SMALL_CARD_VIDEOS:
            for batch, label in ((2, "batched"), (1, "--no-batch-cfg")):
                cells = " | ".join(small_card_advice(cfg, gib, video, batch, q) for q in SMALL_CARD_QUANTS)
                lines.append(f"| {gib} GB | {video} | {label} | {cells} |")
    return "\n".join(lines) + (f"\n\n(block_swap N: offload block_swap with swap_blocks N; the other expert and "
                               f"the swapped blocks wait in host memory: both experts' bytes, e.g. "
                               f"{2 * weight_bytes(cfg, 2, 'Q4_K_M')[1] / 1e9:.1f} GB of RAM at Q4_K_M)")



# ---------------------------------------------------------------------------------------------
# 4. One rank of a multi-GPU plan


def embedding_peak(cfg: DiTConfig, tokens: int, local: int, batch: int, compute_bytes: int) -> int:
    """WanModel.forward before the blocks (every rank embeds the whole video). One process: the
    patch embedding [B, dim, L] in the compute dtype, its fp32 copy (none in fp32) and the
    contiguous [B, L, dim] fp32 stream, alive at once. Split over ranks (`local` < `tokens`): the
    patch embedding and this rank's share of it in the compute dtype (its fp32 copy comes after
    the whole is freed)."""
    s = batch * tokens * cfg.dim
    if local < tokens:
        return s * compute_bytes + batch * local * cfg.dim * compute_bytes
    return s * compute_bytes + (s * FP32 if compute_bytes != FP32 else 0) + s * FP32


def rank_peak_bytes(cfg: DiTConfig, frames: int, height: int, width: int, *, world: int, ulysses: int = 1,
                    ring: int = 1, cfg_parallel: int = 1, fsdp: bool = True, reshard_after_forward: bool = True,
                    weight_bytes_per_param: int = 2, batch_cfg: bool = True, fp8_compute: str = "dequant",
                    text_tokens: int | None = None, gguf: str | Mapping[str, str] | None = None) -> dict:
    """Predicted peak device bytes (allocator view) of one rank of a multi-GPU plan, denoising a
    `frames` x `height` x `width` video; a plan's ranks all hold the same (up to one row of padding).

    - weights: with fsdp 1/world of both experts (parallel.fsdp.ShardedExperts); without, one
      whole expert (the rank's ExpertPair keeps both only when both fit, else swaps them).
      Quantised Linears (fp8: weight_bytes_per_param 1; GGUF: `gguf`, a file type or {block
      Linear: type}, with the compute dtype's weight_bytes_per_param) count their held bytes.
    - gathered (fsdp): the root unit (embeddings, time projection) and the head for the whole
      forward, plus two blocks: the one running and the next one, whose all-gather is in
      flight on a GPU (FSDP2's implicit prefetch); reshard_after_forward=False keeps one whole
      expert gathered instead.
    - activations: the larger of the forward's two phases: embedding the whole video and taking
      this rank's share (`embedding_peak`), and one block on ceil(L / (ulysses * ring)) tokens
      (Ulysses' all-to-all buffers when ulysses > 1, ring attention's K/V blocks and merged
      partials when ring > 1: `_sequence_kernel`), each plus what lives through the forward
      (the RoPE tables for the first). The batch is 1 per rank with cfg_parallel 2 or without
      batch_cfg, else 2. Replicas (ranks beyond cfg x ulysses x ring) hold the same as the
      others: they run the same modules on another video.
    Not included: CUDA_OVERHEAD and NCCL_OVERHEAD (see `rank_budget_need`).
    """
    _check(weight_bytes_per_param, "none", 0, 1, fp8_compute, cfg.num_layers, gguf)
    for name, value in (("world", world), ("ulysses", ulysses), ("ring", ring)):
        if not (is_integer(value) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if cfg_parallel not in (1, 2):
        raise ValueError(f"cfg_parallel must be 1 or 2, got {cfg_parallel!r}")
    block, expert = weight_bytes(cfg, weight_bytes_per_param, gguf)
    rest = expert - cfg.num_layers * block  # the root unit and the head
    weights = -(-2 * expert // world) if fsdp else expert
    gathered = (rest + 2 * block if reshard_after_forward else expert) if fsdp else 0
    tokens = video_tokens(cfg, frames, height, width)
    split = ulysses * ring
    local = -(-tokens // split)
    batch = 1 if cfg_parallel == 2 or not batch_cfg else 2
    c = FP32 if weight_bytes_per_param == 4 else 2
    fp8 = fp8_compute if weight_bytes_per_param == 1 else None
    persistent = forward_persistent_bytes(cfg, tokens, batch, c, text_tokens)
    if split > 1:
        persistent += 2 * local * (cfg.head_dim // 2) * FP32  # this rank's RoPE rows (a copy)
    in_block, block_peak_at, _ = block_activation_peak(cfg, local, batch, c, fp8, text_tokens, gguf,
                                                       ulysses=ulysses > 1, ring=ring > 1)
    rope_tables = persistent - forward_persistent_bytes(cfg, 0, batch, c, text_tokens)
    phases = {"embedding": embedding_peak(cfg, tokens, local, batch, c) + rope_tables,
              block_peak_at: in_block + persistent}
    peak_at = max(phases, key=phases.get)
    return {"tokens": tokens, "local_tokens": local, "batch": batch, "weights": weights, "gathered": gathered,
            "activations": phases[peak_at], "total": weights + gathered + phases[peak_at], "peak_at": peak_at}


NCCL_OVERHEAD = int(0.5 * GIB)  # NCCL's buffers and communicators, outside the caching allocator (not measured here)


def rank_budget_need(estimate: dict, world: int) -> int:
    """What a GPU must have for a rank with `estimate` (rank_peak_bytes): its peak, the CUDA
    context and, with more than one rank, NCCL's buffers."""
    return estimate["total"] + CUDA_OVERHEAD + (NCCL_OVERHEAD if world > 1 else 0)


CARDS_GIB = (12, 16, 24, 32)  # consumer cards: 3060/4070, 4060 Ti/4080, 3090/4090, 5090
WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


def cards_that_fit(need: int) -> str:
    """Which of CARDS_GIB hold `need` bytes, e.g. "24, 32 GB" (a "24 GB" card has 24 GiB)."""
    fitting = [str(gib) for gib in CARDS_GIB if need <= gib * GIB]
    return f"{', '.join(fitting)} GB" if fitting else "none"


def multigpu_table(cfg: DiTConfig = DiTConfig(), frames: int = FRAMES) -> str:
    """Markdown table for docs/multigpu.md: per-GPU need of P-way Ulysses + FSDP at 480p and
    720p, bf16 and fp8, batched and unbatched CFG, and the consumer cards each fits."""
    lines = ["| GPUs | weights | CFG | 480p per GPU | fits | 720p per GPU | fits |", "|---|---|---|---|---|---|---|"]
    for world in (2, 4, 8):
        for weights in ("bf16", "fp8"):
            for batch_cfg in (True, False):
                cells = []
                for height, width in ((HEIGHT_480P, WIDTH_480P), (HEIGHT, WIDTH)):
                    est = rank_peak_bytes(cfg, frames, height, width, world=world, ulysses=world,
                                          weight_bytes_per_param=WEIGHT_BYTES[weights], batch_cfg=batch_cfg)
                    need = rank_budget_need(est, world)
                    cells += [f"{need / GIB:.1f} GiB", cards_that_fit(need)]
                cfg_label = "batched" if batch_cfg else "unbatched"
                lines.append(f"| {world} | {weights} | {cfg_label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_rank(cfg: DiTConfig, frames: int, height: int, width: int, world: int, **plan) -> str:
    """One rank's estimate, part by part, and the consumer cards it fits (the CLI's --gpus output)."""
    est = rank_peak_bytes(cfg, frames, height, width, world=world, **plan)
    need = rank_budget_need(est, world)
    return (f"{width}x{height}x{frames} on {world} GPUs ({', '.join(f'{k} {v}' for k, v in plan.items())}): "
            f"{est['tokens']} tokens, {est['local_tokens']} per rank, batch {est['batch']}\n"
            f"  weights {est['weights'] / GIB:.2f} GiB, gathered {est['gathered'] / GIB:.2f} GiB, activations "
            f"{est['activations'] / GIB:.2f} GiB (peak at {est['peak_at']}): total {est['total'] / GIB:.2f} GiB\n"
            f"  a GPU needs {need / GIB:.2f} GiB with CUDA context and NCCL buffers; fits: {cards_that_fit(need)}")


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m wan22_core.memory",
                                description="Predicted GPU memory of Wan2.2 A14B: one process by offload mode "
                                            "(default), one rank of a multi-GPU plan (--gpus), or docs/multigpu.md's "
                                            "table (--multigpu-table).")
    p.add_argument("--gpus", type=int, help="ranks of a multi-GPU plan: print one rank's estimate")
    p.add_argument("--ulysses", type=int, default=0, help="Ulysses degree (0: as the engine chooses)")
    p.add_argument("--ring", type=int, default=0, help="ring degree (0: as the engine chooses)")
    p.add_argument("--cfg-parallel", action="store_true")
    p.add_argument("--no-fsdp", dest="fsdp", action="store_false")
    p.add_argument("--keep-gathered", action="store_true")
    p.add_argument("--weights", choices=WEIGHT_BYTES, default="bf16", help="how the experts' weights are held")
    p.add_argument("--no-batch-cfg", dest="batch_cfg", action="store_false")
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--height", type=int, default=HEIGHT)
    p.add_argument("--frames", type=int, default=FRAMES)
    p.add_argument("--multigpu-table", action="store_true")
    args = p.parse_args(argv)
    cfg = DiTConfig()
    if args.multigpu_table:
        print(multigpu_table(cfg))
    elif args.gpus:
        cfg_parallel, ulysses, ring = choose_split(args.gpus, cfg.num_heads, ulysses=args.ulysses, ring=args.ring,
                                                   cfg_parallel=args.cfg_parallel)
        print(describe_rank(cfg, args.frames, args.height, args.width, args.gpus, ulysses=ulysses, ring=ring,
                            cfg_parallel=cfg_parallel, fsdp=args.fsdp, reshard_after_forward=not args.keep_gathered,
                            weight_bytes_per_param=WEIGHT_BYTES[args.weights], batch_cfg=args.batch_cfg))
    else:
        print(table_720p())
        print("\n## GGUF experts on small cards (81 frames)\n")
        print(small_card_table())


if __name__ == "__main__":
    main()
