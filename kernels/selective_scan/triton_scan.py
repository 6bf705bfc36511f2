"""Fused Triton selective scan (forward and backward) behind one autograd function.

Layout of the work: one program owns ``BLOCK_D`` channels x ``N`` states of one batch row and walks
one chunk of the sequence token by token with the state in registers, loads of ``UNROLL`` tokens
issued together so their latencies overlap. Each thread holds one part of a channel's states (a
channel's states split over ``SPLIT`` threads); docs/kernels.md says how that layout is pinned and why
it decides the speed. Long sequences are split into chunks so that enough
programs exist; a first pass stores each chunk's local end state and delta sum, and each program of
the main pass folds the earlier chunks' summaries into its initial state (a few [BLOCK_D, N] loads).

Everything runs in "scan positions" p = 0..L-1; token t = p, or L-1-p when ``reverse``: the reverse
scan reads the tensors backwards in place, no flipped copies.

Backward without storing per-token states. With a_t = exp(delta_t A), b_t = delta_t u_t B_t and the
adjoint g_t = dL/dh_t = dyp_t C_t + a_{t+1} g_{t+1}, the gradient of the log-decay w_t = delta_t A is
``dw_t = g_t a_t h_{t-1} = RX_t - RY_t`` with reverse cumulative sums of X_t = dyp_t C_t h_t and
Y_t = g_t b_t (the identity used by flash-linear-attention's GLA kernels). X needs only forward
states and Y only adjoints, so one forward walk (dz, dC, dD, X sums) and one reverse walk (du, dB,
ddelta, Y sums) cover every gradient; the walks meet through one float32 (B, L, D) buffer
``F_t = sum_n A_n sum_{p'<p} X_p'`` and per-chunk sums.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .. import interpreter_compat, launch
from ..host_math import cdiv, next_pow2, programs_per_sm, sm_count
from ..launch import cached_launch

# exp(x) = exp2(x * LOG2E): the kernels keep A * LOG2E only; sums of A * x are rescaled by LN2
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Tuning knobs, read at launch; tools/benchmark_kernels.py sweeps them.
# Defaults: the fastest combination measured on an H100 (docs/kernels.md, sweeps of v4-v7; the forward's and the
# walks' knobs re-swept on an H200 in sessions 10 and 11).
# - MAXNREG_REV caps the reverse walk's registers (None: the compiler's choice, 255, which leaves 8 warps per SM);
#   MAXNREG_REV_WAVE is the lower cap taken when it fits the grid in fewer waves, and in at most MAXNREG_WALK_WAVES
#   (``_reverse_walk_maxnreg``; None: never / no limit). Where the grid stays several waves at the lower cap, the cap
#   costs more than the wave it saves: vim_small / vim_base training at 224 px bs 256 (6,144 / 12,288 programs, four
#   waves -> three, eight -> six) took 11.6% / 11.0% less time per step with neither walk capped (session 21).
# - PREFETCH: how many groups of UNROLL tokens ahead the forward (PREFETCH_BWD: the backward walks) issues
#   `prefetch.global.L1` for its inputs (0: off; session 10's ncu reading saw it warm L2, not L1).
#   PREFETCH_CHUNKED: the same for a chunked (long L) forward's two passes whose chunks have at least
#   PREFETCH_CHUNKED_MIN_T tokens. Off from session 5 (slower on the H100 then, docs/kernels.md v7) to session 19; on
#   since session 20 (H200, inference at L = 1025-6085 -5.2 to -5.8%, training -1.2%; 1, 2 and 4 groups ahead
#   within 0.6% of each other). Plans held at MIN_CHUNK (64-token chunks: small batches, grids below a wave) ran
#   4-20% slower with it, 80-token chunks 1.3% faster (docs/kernels.md v28). The one-chunk forward keeps it at
#   every batch: at 224 px without it, bs 48 ran 0.9% faster, bs 64 4.7% and bs 96 10.2% slower (session 21).
#   One group ahead instead of two: in the split one-chunk forward (vim_tiny inference) +11.7% at bs 64, +3.8% at
#   bs 128; in the wide one (bs 256) -0.3 / -0.4% (vim_tiny / vim_small; session 31, docs/kernels.md v40).
#   PREFETCH_WIDE: the wide layout's own distance (None: PREFETCH); 1 since session 32, when the GPU tests passed
#   with it.
# - LOOKAHEAD: which forward launches load the next group's u and delta a group early (see ``_fwd_kernel``): 0 none,
#   1 all, "accumulate" (default) the launch that adds to a prior output (the mixer's second direction) when the
#   sequence is one chunk, the only case where it measured faster (docs/kernels.md, v15).
# - BLOCK_D_BWD / NUM_WARPS_BWD: channels and warps of a walk program (32 / 1: a warp a program, one thread a
#   channel). With several warps (and BC_PARTS at 8 a warp, so that the quads hold) the 4 warps of a 128-channel
#   program read the same B / C rows through one SM's L1, where one-warp programs of a batch row run on different
#   SMs (L1 hits 11-14%, session 28); each warp prefetches its own channels' rows. Session 30, H200, training at
#   224 px bs 256 against one warp: 2 warps +0.2 / +0.3%, 4 warps +0.8 / +0.8% (vim_tiny / vim_small; docs/kernels.md,
#   v40): not adopted.
# - LOOKAHEAD_BWD: the backward walks load each token's inputs one step ahead, before the previous step's arithmetic
#   (see ``_bwd_forward_walk_kernel``). MAXNREG_FWD_WALK caps the forward walk's registers (None: the compiler's
#   choice), as MAXNREG_REV does the reverse walk's: the lookahead's registers took it from 159 to 214, 12 -> 9
#   warps per SM, and it lost (+6.4% on vim_tiny's training step); at 168 both won (-5.2%; session 17, v25).
# - MAXNREG_FWD_WAVE: the forward's register cap where it fits the grid in fewer waves than the compiler's 65-72
#   registers, and in at most MAXNREG_FWD_WAVES waves (``_forward_wave_cap``; None: never). There the launch also
#   goes without LOOKAHEAD, whose loads need 72 registers. The forward's time follows its program count, with a
#   step where the grid outgrows a wave (session 18, v26). Measured where it makes one wave of two (hence
#   MAXNREG_FWD_WAVES=1).
#   Multi-wave grids were measured in session 19 (MAXNREG_FWD_WAVES=8: vim_small / vim_base at bs 256 and vim_base
#   at bs 128 +0.3 to +1.6% slower, the second direction losing its lookahead), so the rule stays at one wave.
#   WAVE_CAP_STATE_PASS: the chunked forward's state pass takes the same cap (its first direction's needs 68
#   registers at L = 6085; session 19: 1248 px bs 8 inference vim_tiny -4.8%, vim_small -4.3%; vim_base unchanged, its
#   grid then being too large for the cap, which v27's chunk count has since changed).
#   MAXNREG_FWD_WALK_WAVE: the forward walk's lower cap where it saves a wave, as MAXNREG_REV_WAVE is the
#   reverse walk's, under the same MAXNREG_WALK_WAVES (session 19: training at L = 1025 bs 16 -1.9%, L = 6085 bs 8
#   with the state pass cap -1.2%).
# - TARGET_PROGRAMS: how many programs a chunked (long L) forward grid may have ("wave": one wave at the wave cap,
#   ``_chunk_target``); MIN_CHUNK: the shortest chunk; SINGLE_CHUNK_UNITS: from this many (batch row, channel block)
#   units on, L stays one chunk.
#   TRAIN_WALK_WAVES: where a backward follows (``train_plan``: the forward and the backward share one chunking,
#   the backward reading the forward's chunk states), a chunked sequence instead gets as many chunks as fill this
#   many waves of the backward walks at MAXNREG_REV registers (``_walk_chunk_target``; None: the forward's plan).
#   The forward then runs more, shorter chunks than its own plan's one wave. Session 23, H200, the training step
#   against the forward's plan: vim_tiny / vim_small / vim_base at 1248 px bs 8 -6.0% / -6.7% / -12.0%, at 512-1024
#   px -4.0% (docs/kernels.md, v31). Chunk counts whose walk grid ends in a partly filled wave ran up to 7% slower.
# - BC_SCATTER: the backward walks sum each token's dB / dC over channels as a reduce-scatter
#   (``_sum_channels_scattered``, where a block has at least as many channels as states per row) instead of one
#   butterfly per state; off: slower in session 8 and, with the relaxed atomics, again in session 12 (-3.5 to +19%
#   per direction at vision shapes; docs/kernels.md, v9 and v17).
#   BC_PARTS: how many partial sums of each token's dB / dC a walk program adds atomically, each over BLOCK_D_BWD /
#   BC_PARTS consecutive channels (1: one sum over the whole block). With 8, the butterflies take 2 shuffle levels
#   per state instead of 5 (-96 shuffles and adds an iteration at 32 channels and 16 states; the loop -19%) and the
#   atomics 8x the adds to the same addresses. Session 26, H200, training step at 224 px bs 256 against 1: 2 / 4 / 8
#   / 16 / 32 parts -4.0 / -7.7 / -11.5 / +3.3 / +51% (vim_tiny), 8 parts -10.1% (vim_small), -8.5% (vim_base),
#   and -8.2% / -8.1% for vim_tiny / vim_small at 1248 px bs 8 (docs/kernels.md, v34). Ignored where BC_SCATTER applies.
# - SHARED_PRODUCTS: the walks form X = (dy h) C and Y = (g du) B from the products dC and dB sum anyway, one multiply
#   per state and token fewer in each walk (-4% of their loop instructions), instead of X = (dy C) h and
#   Y = g (du B), which keep X and Y bit for bit equal where the true dA is 0 (L = 1; with the option, ~1 ulp of
#   the terms there). Session 27, H200, training step against off: vim_tiny / vim_small / vim_base at 224 px bs 256
#   -1.0 / -1.2 / -0.9%, vim_tiny / vim_small at 1248 px bs 8 -1.6 / -1.5% (docs/kernels.md, v36).
# - BC_QUADS: with BC_PARTS parts of 4 channels and 16 states (the model's walks), each token's part sums are
#   reduce-scattered over a part's 4 lanes so that each lane ends with 4 adjacent states, which it adds with one
#   16-byte vector atomic in inline PTX (``_sum_channels_to_quads``, ``_add_token_quads``; ``_bc_quads`` says where). The
#   butterflies instead leave all 16 sums in each of the 4 lanes, and the tile reaches the vector atomics through
#   shared memory. sm_90 SASS, vim_tiny bs 256, triton 3.6 (session 27): the walks' loops 657 / 726 -> 589 / 637
#   instructions, 24 shuffles instead of 64, no shared memory or barrier in the loop. Session 28, H200, training step
#   against off: vim_tiny / vim_small / vim_base at 224 px bs 256 -5.8 / -5.9 / -4.9%, vim_tiny / vim_small at
#   1248 px bs 8 -4.3 / -4.1% (docs/kernels.md, v37).
# - LANE_OFFSETS: the walks address their per-token rows (u, delta, z, dy, F, dz, du, ddelta, the dB / dC quads) as
#   the batch's uniform base plus a 32-bit offset per row (``_walk_rows``) instead of a 64-bit pointer per row moved
#   on by 64-bit arithmetic each token; where every offset fits in int32 (``_lane_offsets_fit``). Session 28, H200,
#   training step against off: vim_tiny / vim_small at 224 px bs 256 -1.4 / -0.8%; the default since session 29, when
#   the GPU tests passed with it (docs/kernels.md, v39).
# - BC_PAIR: where each token's C states follow its B states in one float32 row (the mixer's rows, ``_bc_pair``), the
#   scan kernels address C from B's row (``_bc_bases``): one address a token for both, C's loads at a fixed offset.
#   sm_90, vim_tiny bs 256 (session 29): loops 266 / 320 / 572 / 616 / 584 / 614 -> 259 / 309 / 563 / 608 / 575 / 604
#   (forward, walks), the layer's issue floor -1.8%. The split one-chunk forward's launch with LOOKAHEAD keeps C's own
#   address, where it ran slower (``_forward_bc_pair``). Session 30, H200, with WIDE_BLOCK_D = 128, against 32 and off:
#   inference vim_tiny / vim_small at 224 px bs 256 -1.8 / -1.3%, training -0.4 / -0.5%; vim_tiny at 1248 px bs 8
#   inference -0.9%, training -2.0% (docs/kernels.md, v40). BC_PAIR_SPLIT (False / "first" / True): which launches of
#   the split one-chunk forward take the pair; "first" (since session 31) gives it to those without LOOKAHEAD, whose
#   loads keep their distance to their use. Session 31, H200, vim_tiny inference at 224 px against False: bs 64 / 128 /
#   160 -6.3 / -1.4 / -3.6%, training bs 128 -0.3%; True (both launches at bs 128) +3.4% (``_forward_bc_pair``).
# - WIDE_BLOCK_D / WIDE_MAXNREG: the one-chunk forward's wide layout (``_forward_wide``; WIDE_BLOCK_D None: never): one
#   thread per channel holding all N states, WIDE_BLOCK_D channels per program (a warp per 32), registers capped at
#   WIDE_MAXNREG (no lookahead), instead of BLOCK_D channels with SPLIT threads each. Per channel and token it issues
#   16-19% fewer instructions, but a program walks its tokens longer, so it pays only where its grid runs in fewer waves
#   of resident programs than the split one's. Session 22, H200, vim_tiny inference at 224 px against the split layout:
#   bs 192-256 (one wave against two) -4.8 to -9.4%, bs 512 (two against four) -5.8%, bs 384 (two against three) -0.5%,
#   bs 64 / 128 (one wave either way) +30% / +17%; vim_small bs 128 / 256 -6.3% / -5.6%, vim_base bs 256 -6.9%
#   (docs/kernels.md, v30). Uncapped (86 / 102 registers) it was slower. Measured with half-precision u and an activated
#   delta (the mixer), so only there; chunked (long L) plans keep the split layout (vim_small at 1248 px ran 5.4% slower
#   wide). WIDE_BLOCK_D = 128 (since session 30) makes programs of 4 warps, whose warps share the B / C rows through L1:
#   inference at 224 px bs 256 against 32 -1.1 / -1.0 / -0.6% (vim_tiny / vim_small / vim_base), training -0.3 / -0.2 /
#   -0.1% (docs/kernels.md, v40). WIDE_MAXNREG = 72 (7 such programs an SM instead of 6, more spills): +8.6 / +7.3%
#   (vim_tiny / vim_small inference at bs 256, session 31). The walks' programs of several warps (BLOCK_D_BWD = 32 w,
#   NUM_WARPS_BWD = w, BC_PARTS = 8 w) ran slower: training +0.2% / +0.3% (2 warps), +0.8% / +0.8% (4 warps), vim_tiny /
#   vim_small at 224 px bs 256.
CONFIG = dict(BLOCK_D=16, SPLIT=2, UNROLL=2, NUM_WARPS=1, PREFETCH=2, LOOKAHEAD="accumulate", BLOCK_D_BWD=32,
              SPLIT_BWD=1, UNROLL_BWD=2, NUM_WARPS_BWD=1, MAXNREG_REV=168, MAXNREG_REV_WAVE=128, PREFETCH_BWD=1,
              BC_SCATTER=False, BC_PARTS=8, LOOKAHEAD_BWD=True, MAXNREG_FWD_WALK=168, MAXNREG_FWD_WAVE=64,
              MAXNREG_FWD_WAVES=1, WAVE_CAP_STATE_PASS=True,
              MAXNREG_FWD_WALK_WAVE=128, MAXNREG_WALK_WAVES=1,
              TARGET_PROGRAMS="wave", MIN_CHUNK=64, SINGLE_CHUNK_UNITS=1024,
              PREFETCH_CHUNKED=2, PREFETCH_CHUNKED_MIN_T=80,
              WIDE_BLOCK_D=128, WIDE_MAXNREG=80, PREFETCH_WIDE=1, TRAIN_WALK_WAVES=2, SHARED_PRODUCTS=True,
              BC_QUADS=True, LANE_OFFSETS=True, BC_PAIR=True, BC_PAIR_SPLIT="first")
# Tests set these: a fixed chunk length (to exercise the chunk combine at tiny L) and NaN-filled
# output buffers (to catch elements the kernels never write).
CHUNK_OVERRIDE: Optional[int] = None
POISON_OUTPUTS = False


def _empty(shape, dtype, device):
    """A new buffer (NaN-filled under ``POISON_OUTPUTS``), reported to a running recording (``replay``)."""
    # all ones is a NaN in every float dtype; a byte buffer (a replay's group of buffers) gets it too
    t = torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device) \
        if POISON_OUTPUTS else torch.empty(shape, dtype=dtype, device=device)
    recorder = launch.recording()
    if recorder is not None:
        recorder.allocated(t)
    return t


ZERO_BLOCK = 1024


@cached_launch
@triton.jit
def _zero_kernel(ptrs, starts, sizes, BLOCK: tl.constexpr):
    """Program p zeroes block p - starts[k] of tensor k, for the k with starts[k] <= p < starts[k + 1]."""
    pid = tl.program_id(0)
    for k in tl.static_range(len(ptrs)):
        if (pid >= starts[k]) & (pid < starts[k + 1]):
            offs = (pid - starts[k]) * BLOCK + tl.arange(0, BLOCK)
            tl.store(ptrs[k] + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs < sizes[k])


def _zeros(shapes, device):
    """Zeroed float32 tensors of the given shapes from one launch (each of the backward's atomic sums needs its
    own zeroed buffer, a torch fill each; they are distinct allocations, so they may be distinct outputs of a
    custom op)."""
    outs = [_empty(shape, torch.float32, device) for shape in shapes]   # poisoned in tests: all must be written
    live = [t for t in outs if t.numel()]
    if live:
        starts = [0]
        for t in live:
            starts.append(starts[-1] + cdiv(t.numel(), ZERO_BLOCK))
        _zero_kernel[(starts[-1],)](tuple(live), tuple(starts), tuple(t.numel() for t in live), BLOCK=ZERO_BLOCK)
    return outs


def _absent(like: torch.Tensor) -> torch.Tensor:
    """A fresh empty float32 tensor standing for an absent output of a custom op (the ops' outputs must all
    be tensors and must not alias each other)."""
    return like.new_empty(0, dtype=torch.float32)


def _none_if_absent(t):
    return None if t is None or t.numel() == 0 else t


def _needs_grad(*tensors) -> bool:
    """Whether autograd records a call on these tensors (None entries allowed): the custom ops' callers plan their
    chunks for a backward then (``train_plan``)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------
@triton.jit
def _rcp(x, ASM: tl.constexpr):
    """1 / x. On the GPU one MUFU.RCP (``rcp.approx.ftz``, 1 ulp): Triton's division adds a range fix-up
    of three instructions to every use on the walks' per-token path. The interpreter divides."""
    if ASM:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _softplus(x, ASM: tl.constexpr):
    """softplus(x) and its slope sigmoid(x), from one exp2 and one reciprocal.

    softplus(x) = max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1]; log1p(e) = 2 atanh(s), s = e / (2 + e)
    <= 1/3, summed as an odd series in s to relative 1e-8. A precise ``log`` costs ~25 instructions per
    channel and token on the walks' critical path; this is ~14 and as accurate in float32."""
    e = tl.exp2(-tl.abs(x) * LOG2E)
    s = e * _rcp(2.0 + e, ASM)
    w = s * s
    p = 1.0 / 13.0
    p = p * w + 1.0 / 11.0
    p = p * w + 1.0 / 9.0
    p = p * w + 1.0 / 7.0
    p = p * w + 1.0 / 5.0
    p = p * w + 1.0 / 3.0
    p = p * w + 1.0
    sp = tl.maximum(x, 0.0) + 2.0 * s * p
    r = _rcp(1.0 + e, ASM)
    slope = tl.where(x >= 0.0, r, e * r)
    return sp, slope


@triton.jit
def _softplus_slope_of_output(sp):
    """sigmoid(x) given sp = softplus(x) >= 0: 1 - exp(-sp), as a series where that difference would cancel
    (relative error about 1e-6). The walks' slope when delta arrives through softplus already."""
    d = -sp * LOG2E
    series = sp * (1.0 - sp * 0.5 * (1.0 - sp * (1.0 / 3.0) * (1.0 - sp * 0.25 * (1.0 - sp * 0.2))))
    return tl.where(sp < 0.0625, series, 1.0 - tl.exp2(d))


@triton.jit
def _sigmoid(x, ASM: tl.constexpr):
    return _rcp(1.0 + tl.exp2(-x * LOG2E), ASM)


@triton.jit
def _bc_base(M_ptr, pid_b, group, s_b, s_g):
    """Scalar pointer to state 0 of token 0 of the program's B or C rows (float32, see ``_bc_rows``)."""
    return M_ptr + pid_b * s_b + group * s_g


@triton.jit
def _bc_bases(B_ptr, C_ptr, pid_b, group, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, BLOCK_N: tl.constexpr,
              BC_PAIR: tl.constexpr):
    """``_bc_base`` of B and of C, and the C strides the kernel then uses. BC_PAIR (``_bc_pair``): each token's C
    states follow its B states in one row, so C is B's row BLOCK_N on, with B's strides: one address a token serves
    both, C's loads at a fixed offset from it."""
    B_base = _bc_base(B_ptr, pid_b, group, sB_b, sB_g)
    if BC_PAIR:
        return B_base, B_base + BLOCK_N, sB_n, sB_l
    return B_base, _bc_base(C_ptr, pid_b, group, sC_b, sC_g), sC_n, sC_l


@triton.jit
def _load_state_part(row, s_n, N, k, NS: tl.constexpr, EVEN_N: tl.constexpr):
    """States [k * NS, (k + 1) * NS) of one B or C row, float32 [NS], the same for every thread."""
    n = k * NS + tl.arange(0, NS)
    if EVEN_N:
        return tl.load(row + n * s_n)
    else:
        return tl.load(row + n * s_n, mask=n < N, other=0.0)


@triton.jit
def _load_own_part(prow, NS: tl.constexpr):
    """[R, NS]: row r's NS states at prow[r] (16-byte aligned, contiguous) by vector loads in PTX. Triton's
    own 2-D load of this tile would be laid out along the states and converted to A's layout through
    shuffles on every token; the joins below only name registers. NS is 4 or 8."""
    a0, a1, a2, a3 = tl.inline_asm_elementwise("ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l",
                                               [prow], (tl.float32, tl.float32, tl.float32, tl.float32), True, 1)
    if NS == 4:
        x = tl.join(tl.join(a0, a2), tl.join(a1, a3))
    else:
        b0, b1, b2, b3 = tl.inline_asm_elementwise("ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4+16];",
                                                   "=r,=r,=r,=r,l", [prow],
                                                   (tl.float32, tl.float32, tl.float32, tl.float32), True, 1)
        x = tl.join(tl.join(tl.join(a0, b0), tl.join(a2, b2)), tl.join(tl.join(a1, b1), tl.join(a3, b3)))
    return tl.reshape(x, [prow.shape[0], NS])


@triton.jit
def _load_state_rows(base, t, s_l, s_n, N, part, NS: tl.constexpr, SPLIT: tl.constexpr, EVEN_N: tl.constexpr,
                     ROW_ASM: tl.constexpr):
    """B or C at token t for every row: [R, NS] (row r gets the states of its part part[r]), or [1, NS]
    without a split. With ROW_ASM each thread loads its own part (``_load_own_part``); otherwise every
    thread loads every part as uniform vectors and selects, not a 2-D load, so that the tile keeps the
    layout A gave it (a 2-D load would be coalesced along the states)."""
    row = base + t * s_l
    if ROW_ASM:
        v = _load_own_part(row + part * NS, NS)
    else:
        v = _load_state_part(row, s_n, N, 0, NS, EVEN_N)[None, :]
        for k in tl.static_range(1, SPLIT):
            v = tl.where(part[:, None] == k, _load_state_part(row, s_n, N, k, NS, EVEN_N)[None, :], v)
    return v


@triton.jit
def _load_step(u_ptrs, dl_ptrs, z_ptrs, B_base, C_base, t, ok, mask_d, part, N,
               su_l, sd_l, sz_l, sB_l, sB_n, sC_l, sC_n, bias, NS: tl.constexpr, SPLIT: tl.constexpr,
               HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, EVEN_D: tl.constexpr,
               EVEN_N: tl.constexpr, ROW_ASM: tl.constexpr, ASM: tl.constexpr, u_raw=None, d_raw=None,
               z_raw=None, B_pre=None, C_pre=None):
    """Inputs of one token for every row. ``t`` is always a valid token (the callers clamp the tail of a
    chunk to its last token, so no load needs a per-token predicate); ``ok`` says whether the step is
    real. Returns u, delta (processed; 0 where not ok or masked, so the step is a no-op), d delta / d raw
    delta (the softplus slope, 1 without softplus), z ([R] each), B, C ([R, NS] or [1, NS]; float32).
    EVEN_D (the channels fill every block) drops the channel masks. SOFTPLUS: 0 none, 1 softplus(delta + bias)
    here, 2 delta is that already (its slope from the value, the bias not added again). ``u_raw`` / ``d_raw``:
    u and raw delta loaded already (the forward's LOOKAHEAD); ``z_raw``, ``B_pre``, ``C_pre``: z and the B / C rows
    loaded already (``_step_raw``, the walks' LOOKAHEAD_BWD)."""
    if u_raw is not None:
        u = u_raw.to(tl.float32)
        raw = d_raw.to(tl.float32)
    elif EVEN_D:
        u = tl.load(u_ptrs + t * su_l).to(tl.float32)
        raw = tl.load(dl_ptrs + t * sd_l).to(tl.float32)
    else:
        u = tl.load(u_ptrs + t * su_l, mask=mask_d, other=0.0).to(tl.float32)
        raw = tl.load(dl_ptrs + t * sd_l, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS == 2:   # delta is softplus(raw + bias) already (``delta_activated``); the slope comes from it
        dl = raw
        slope = _softplus_slope_of_output(raw)
    else:
        if HAS_BIAS:
            raw = raw + bias
        if SOFTPLUS:
            dl, slope = _softplus(raw, ASM)
        else:
            dl = raw
            slope = 1.0
    if EVEN_D:
        dl = tl.where(ok, dl, 0.0)
    else:
        dl = tl.where(mask_d & ok, dl, 0.0)
    if not HAS_Z:
        z = u
    elif z_raw is not None:
        z = z_raw.to(tl.float32)
    elif EVEN_D:
        z = tl.load(z_ptrs + t * sz_l).to(tl.float32)
    else:
        z = tl.load(z_ptrs + t * sz_l, mask=mask_d, other=0.0).to(tl.float32)
    if B_pre is not None:
        Bv = B_pre
        Cv = C_pre
    else:
        Bv = _load_state_rows(B_base, t, sB_l, sB_n, N, part, NS, SPLIT, EVEN_N, ROW_ASM)
        Cv = _load_state_rows(C_base, t, sC_l, sC_n, N, part, NS, SPLIT, EVEN_N, ROW_ASM)
    return u, dl, slope, z, Bv, Cv


@triton.jit
def _step_raw(u_ptrs, dl_ptrs, z_ptrs, g_ptrs, B_base, C_base, t, mask_d, part, N, su_l, sd_l, sz_l, sg_l, sB_l, sB_n,
              sC_l, sC_n, NS: tl.constexpr, SPLIT: tl.constexpr, HAS_Z: tl.constexpr, EVEN_D: tl.constexpr,
              EVEN_N: tl.constexpr, ROW_ASM: tl.constexpr, u_off=0, d_off=0, z_off=0, g_off=0):
    """A backward walk's loads for token t, unconverted (u, raw delta, z and dy in their storage dtypes; z is u
    without HAS_Z), for ``_load_step`` to take a step later (LOOKAHEAD_BWD). ``u_off`` ... ``g_off``: the rows'
    int32 channel offsets where the four pointers are the batch's scalar bases (``_walk_rows``), else 0."""
    u_at = u_ptrs + (u_off + t * su_l)
    d_at = dl_ptrs + (d_off + t * sd_l)
    z_at = z_ptrs + (z_off + t * sz_l)
    g_at = g_ptrs + (g_off + t * sg_l)
    if EVEN_D:
        u = tl.load(u_at)
        raw = tl.load(d_at)
        g = tl.load(g_at)
    else:
        u = tl.load(u_at, mask=mask_d, other=0.0)
        raw = tl.load(d_at, mask=mask_d, other=0.0)
        g = tl.load(g_at, mask=mask_d, other=0.0)
    z = u
    if HAS_Z:
        if EVEN_D:
            z = tl.load(z_at)
        else:
            z = tl.load(z_at, mask=mask_d, other=0.0)
    Bv = _load_state_rows(B_base, t, sB_l, sB_n, N, part, NS, SPLIT, EVEN_N, ROW_ASM)
    Cv = _load_state_rows(C_base, t, sC_l, sC_n, N, part, NS, SPLIT, EVEN_N, ROW_ASM)
    return u, raw, z, g, Bv, Cv


@triton.jit
def _load_group_raw(u_ptrs, dl_ptrs, p0, p_end, L, cols, su_l, sd_l, mask_d, REVERSE: tl.constexpr,
                    EVEN_D: tl.constexpr):
    """u and raw delta of the group starting at scan position p0, as stored: [R, UNROLL] each (positions
    clamped to the chunk, as ``_scan_token`` does)."""
    t = _scan_token(p0 + cols, p_end, L, REVERSE)
    if EVEN_D:
        return tl.load(u_ptrs[:, None] + t[None, :] * su_l), tl.load(dl_ptrs[:, None] + t[None, :] * sd_l)
    else:
        return (tl.load(u_ptrs[:, None] + t[None, :] * su_l, mask=mask_d[:, None], other=0.0),
                tl.load(dl_ptrs[:, None] + t[None, :] * sd_l, mask=mask_d[:, None], other=0.0))


@triton.jit
def _column(tile, cols, j):
    """Column j of a [R, UNROLL] tile whose rows sit in one thread each: a select, no data movement."""
    return tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def _token(p, L, REVERSE: tl.constexpr):
    """Token at scan position p: p itself, or L - 1 - p when the scan runs backwards."""
    if REVERSE:
        return L - 1 - p
    else:
        return p


@triton.jit
def _scan_token(p, p_end, L, REVERSE: tl.constexpr):
    """Token at scan position p of a chunk ending at p_end, clamped to the chunk's last position."""
    return _token(tl.minimum(p, p_end - 1), L, REVERSE)


@triton.jit
def _byte_addr(ptr, s_l):
    """ptr as a 64-bit address, and the byte step of s_l elements."""
    return ptr.to(tl.int64), (ptr + s_l).to(tl.int64) - ptr.to(tl.int64)


@triton.jit
def _lane_pick(kind, k, ptr, s_l, a0, st0):
    addr, step = _byte_addr(ptr, s_l)
    return tl.where(kind == k, addr, a0), tl.where(kind == k, step, st0)


@triton.jit
def _prefetch_lanes(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, e1_ptr, e2_ptr, su_l, sd_l, sz_l, sB_l, sC_l, s1_l, s2_l,
                    R: tl.constexpr, UNROLL: tl.constexpr, BLOCK_N: tl.constexpr, HAS_Z: tl.constexpr,
                    HAS_E1: tl.constexpr, HAS_E2: tl.constexpr,
                    su_d=0, sd_d=0, sz_d=0, s1_d=0, s2_d=0, n_ch=1):
    """Per lane of a warp, one line to prefetch for each token of a group: lane r asks for row kind
    r // UNROLL (u, delta, z, the 32-byte sectors of the B and C rows, then up to two more per-token rows
    e1, e2 such as the output or dy) of token r % UNROLL. The pointers are the program's first channel
    (first state for B, C) at token 0. Returns the lanes' addresses at token 0, their byte steps per token
    and their token in the group (loop-invariant; lanes beyond the list repeat u, kinds beyond min(R, 32) lanes
    are not prefetched). Where R spans several warps (``NUM_WARPS_BWD``, ``WIDE_BLOCK_D``), each warp asks for the
    channel rows at its own first channel (su_d ... s2_d: the rows' channel strides; n_ch: the block's channels in
    range; rows past them, such as a split layout's second part, ask for the first warp's)."""
    NSEC: tl.constexpr = (BLOCK_N * 4 + 31) // 32   # sectors of a float32 B / C row
    lane = tl.arange(0, R)
    if R > 32:
        kind = (lane % 32) // UNROLL
        ch = (lane // 32) * 32
        ch = tl.where(ch < n_ch, ch, 0)
        u_ptr += ch * su_d
        dl_ptr += ch * sd_d
        z_ptr += ch * sz_d
        e1_ptr += ch * s1_d
        e2_ptr += ch * s2_d
    else:
        kind = lane // UNROLL
    addr, step = _byte_addr(u_ptr, su_l)
    a0 = tl.zeros([R], dtype=tl.int64) + addr
    st0 = tl.zeros([R], dtype=tl.int64) + step
    a0, st0 = _lane_pick(kind, 1, dl_ptr, sd_l, a0, st0)
    k: tl.constexpr = 3 if HAS_Z else 2
    if HAS_Z:
        a0, st0 = _lane_pick(kind, 2, z_ptr, sz_l, a0, st0)
    for sec in tl.static_range(NSEC):
        a0, st0 = _lane_pick(kind, k + sec, B_ptr + sec * 8, sB_l, a0, st0)
        a0, st0 = _lane_pick(kind, k + NSEC + sec, C_ptr + sec * 8, sC_l, a0, st0)
    if HAS_E1:
        a0, st0 = _lane_pick(kind, k + 2 * NSEC, e1_ptr, s1_l, a0, st0)
    if HAS_E2:
        a0, st0 = _lane_pick(kind, k + 2 * NSEC + 1, e2_ptr, s2_l, a0, st0)
    return a0, st0, lane % UNROLL


@triton.jit
def _prefetch_group(lane_addr, lane_step, t):
    """Prefetch into L1 the rows the lanes of ``_prefetch_lanes`` stand for, at tokens t (per lane): one
    ``prefetch.global.L1`` per warp covers a group. Nothing waits on it and it holds no register. The walks'
    own loads cannot be issued this early: ptxas sinks loads that are issued ahead of their use to the
    end of the loop body, to keep registers free, where they hide nothing. GPU only (inline PTX)."""
    addr = lane_addr + t.to(tl.int64) * lane_step
    tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [addr], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _walk_back_token(q, n_steps, p_end, L, REVERSE: tl.constexpr):
    """Token at step q of a walk from a chunk's last position back to its first (clamped to the first)."""
    return _token(p_end - 1 - tl.minimum(q, n_steps - 1), L, REVERSE)


@triton.jit
def _program_setup(A_ptr, bias_ptr, Dm, N, CPG, sA_d, sA_n, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """What every scan kernel starts with: its (channel block, chunk, batch) indices, the program's rows
    and their masks, A as an [R, NS] tile (also pre-scaled by log2(e) for exp2), the B/C group and the
    delta bias (per row).

    A program owns BLOCK_D channels as R = SPLIT * BLOCK_D rows: row r = s * BLOCK_D + c holds states
    [s * NS, (s + 1) * NS) of channel c (NS = BLOCK_N / SPLIT). Triton lays out every [row, state] tile
    of a kernel the way this load of A is coalesced. The host hands A over channel-contiguous, so each
    thread owns whole rows with their states in registers: sums over a row's states need no shuffles and
    no tile changes layout inside the token loop. Splitting a channel's states over SPLIT threads puts
    SPLIT times more recurrences in flight (the walks are latency-bound: one thread per channel leaves
    most of the GPU idle at vision batch sizes) for a few shuffles per token (``_sum_parts``)."""
    NS: tl.constexpr = BLOCK_N // SPLIT
    R: tl.constexpr = SPLIT * BLOCK_D
    pid_d = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = tl.arange(0, R)
    # Divisibility 1 on purpose: vectorised channel loads would give each thread several channels and
    # spread a channel's states over threads (shuffles and layout changes in the token loop).
    offs_d = tl.multiple_of(pid_d * BLOCK_D + rows % BLOCK_D, 1)
    part = rows // BLOCK_D
    n_idx = part[:, None] * NS + tl.arange(0, NS)[None, :]
    mask_d = offs_d < Dm
    mask2 = mask_d[:, None] & (n_idx < N)
    A = tl.load(A_ptr + offs_d[:, None] * sA_d + n_idx * sA_n, mask=mask2, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    group = (pid_d * BLOCK_D) // CPG
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = 0.0
    # per-channel outputs ([BLOCK_D] after _sum_parts), laid out as offs_d
    offs_o = tl.multiple_of(pid_d * BLOCK_D + tl.arange(0, BLOCK_D), 1)
    return pid_d, pid_c, pid_b, offs_d, part, n_idx, mask_d, mask2, A, A2, group, bias, offs_o, offs_o < Dm


@triton.jit
def _sum_parts(x, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    """[R] row values -> [BLOCK_D]: per channel, the sum over its SPLIT state parts."""
    if SPLIT > 1:
        return tl.sum(tl.reshape(x, [SPLIT, BLOCK_D]), axis=0)
    else:
        return x


@triton.jit
def _sum_channels(x, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr, NS: tl.constexpr, PARTS: tl.constexpr = 1):
    """[R, NS] -> [PARTS * SPLIT * NS]: per state, the sum over the program's channels (dB, dC), in state order;
    with PARTS > 1 one such sum per run of BLOCK_D // PARTS consecutive channels, part-major."""
    if PARTS > 1:
        part_sums = tl.sum(tl.reshape(x, [SPLIT, PARTS, BLOCK_D // PARTS, NS]), axis=2)   # [SPLIT, PARTS, NS]
        return tl.reshape(tl.permute(part_sums, (1, 0, 2)), [PARTS * SPLIT * NS])
    elif SPLIT > 1:
        return tl.reshape(tl.sum(tl.reshape(x, [SPLIT, BLOCK_D, NS]), axis=1), [SPLIT * NS])
    else:
        return tl.sum(x, axis=0)


@triton.jit
def _row_partner(x, k: tl.constexpr):
    """``x[r ^ (1 << k), :]`` of an [R, W] tile: one shuffle per element where bit k of the row is a lane bit."""
    R: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    return tl.reshape(tl.flip(tl.reshape(x, [R >> (k + 1), 2, 1 << k, W]), 1), [R, W])


@triton.jit
def _sum_channels_scattered(x, BLOCK_D: tl.constexpr):
    """[R, NS] -> [R], NS <= BLOCK_D: row r ends with the sum over its part's channels of state
    ``(r % BLOCK_D) % NS`` of that part (``_bc_grad_rows`` addresses it), the same sums as ``_sum_channels``.

    A reduce-scatter: at butterfly level k < log2(NS) a row keeps the half of its states that bit k of its
    index selects and adds its partner row's copy of that half, so the shuffles per token are NS/2 + NS/4
    + ... + 1 plus one per remaining channel bit (16 at NS 16, 32 channels) instead of log2(BLOCK_D) per
    state (80); one sum per row comes out instead of all NS in every row."""
    R: tl.constexpr = x.shape[0]
    NS: tl.constexpr = x.shape[1]
    tl.static_assert(BLOCK_D <= 256 and NS <= BLOCK_D, "the levels below cover 8 channel bits")
    rows = tl.arange(0, R)
    for k in tl.static_range(8):
        if (1 << k) < NS:
            even, odd = tl.split(tl.reshape(x, [R, NS >> (k + 1), 2]))
            bit = ((rows >> k) & 1)[:, None] == 1
            x = tl.where(bit, odd, even) + _row_partner(tl.where(bit, even, odd), k)
        elif (1 << k) < BLOCK_D:
            x = x + _row_partner(x, k)
    return tl.reshape(x, [R])


@triton.jit
def _halves(x):
    """[R, W] -> its first and its second W // 2 columns (a thread holds whole rows: no data moves)."""
    R: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    return tl.split(tl.permute(tl.reshape(x, [R, 2, W // 2]), (0, 2, 1)))


@triton.jit
def _sum_channels_to_quads(x, BLOCK_D: tl.constexpr, PARTS: tl.constexpr):
    """[R, NS] -> four [R]: row r's part sums (over its run of CPP = BLOCK_D // PARTS channels, NS = 4 * CPP) of the 4
    adjacent states from the one ``_bc_quad_rows`` addresses on. A reduce-scatter over the part's lane bits in which each level keeps
    the half of the row's states (upper or lower: they stay adjacent) that the row's bit selects and adds its
    partner's copy of that half: at CPP = 4, NS = 16, 8 + 4 shuffles and adds and 24 selects a token, where the
    butterflies take 32 and 32 and then a shared-memory pass to give each lane 4 adjacent states for its vector
    atomic (``CONFIG["BC_QUADS"]``)."""
    R: tl.constexpr = x.shape[0]
    CPP: tl.constexpr = BLOCK_D // PARTS
    rows = tl.arange(0, R)
    for k in tl.static_range(8):
        if (1 << k) < CPP:
            lo, hi = _halves(x)
            bit = ((rows >> k) & 1)[:, None] == 1
            x = tl.where(bit, hi, lo) + _row_partner(tl.where(bit, lo, hi), k)
    even, odd = tl.split(tl.reshape(x, [R, 2, 2]))   # states 0, 2 and 1, 3 of the quad
    q0, q2 = tl.split(even)
    q1, q3 = tl.split(odd)
    return q0, q1, q2, q3


@triton.jit
def _lane_rows(base, off, LANE_OFFSETS: tl.constexpr):
    """A walk's rows at token 0 of one per-token tensor, from the batch's scalar ``base`` and the rows' int32 offsets
    ``off``, as a pointer and an offset to add per access: the per-row pointers and zeros, or with LANE_OFFSETS
    (``CONFIG["LANE_OFFSETS"]``) the scalar base and the offsets, so that an address is a 32-bit add and one widening
    add to a uniform base rather than 64-bit arithmetic on a per-row pointer."""
    if LANE_OFFSETS:
        return base, off
    else:
        return base + off, off * 0


@triton.jit
def _lane_tile(ptrs, off, tt, s_l, LANE_OFFSETS: tl.constexpr):
    """Addresses of a [rows, UNROLL] tile at tokens tt from ``_lane_rows``'s pointer and offset."""
    if LANE_OFFSETS:
        return ptrs + (off[:, None] + tt[None, :] * s_l)
    else:
        return ptrs[:, None] + tt[None, :] * s_l


@triton.jit
def _walk_rows(u_ptr, dl_ptr, z_ptr, dy_ptr, pid_b, offs_d, su_b, su_d, sd_b, sd_d, sz_b, sz_d, sg_b, sg_d,
               LANE_OFFSETS: tl.constexpr):
    """The walks' per-token rows of u, delta, z and dy (``_step_raw``): four pointers, then their four offsets
    (``_lane_rows``)."""
    u, u_off = _lane_rows(u_ptr + pid_b * su_b, offs_d * su_d, LANE_OFFSETS)
    d, d_off = _lane_rows(dl_ptr + pid_b * sd_b, offs_d * sd_d, LANE_OFFSETS)
    z, z_off = _lane_rows(z_ptr + pid_b * sz_b, offs_d * sz_d, LANE_OFFSETS)
    g, g_off = _lane_rows(dy_ptr + pid_b * sg_b, offs_d * sg_d, LANE_OFFSETS)
    return u, d, z, g, u_off, d_off, z_off, g_off


@triton.jit
def _bc_quad_rows(dX_ptr, pid_b, group, s_b, s_g, s_n, R: tl.constexpr, NS: tl.constexpr, CPP: tl.constexpr,
                  LANE_OFFSETS: tl.constexpr = False):
    """Per row, the address at token 0 of the first of the 4 states ``_sum_channels_to_quads`` leaves it (each level
    that kept the upper half moves it on by that half), as a pointer and an int32 offset to add (``_lane_rows``)."""
    rows = tl.arange(0, R)
    n = rows * 0
    for k in tl.static_range(8):
        if (1 << k) < CPP:
            n += ((rows >> k) & 1) * (NS >> (k + 1))
    return _lane_rows(_bc_base(dX_ptr, pid_b, group, s_b, s_g), n * s_n, LANE_OFFSETS)


@triton.jit
def _add_token_quads(x, ptrs, valid, BLOCK_D: tl.constexpr, PARTS: tl.constexpr, ASM: tl.constexpr):
    """One token's dB / dC: x [R, NS] summed over each part's channels as quads (``_sum_channels_to_quads``) and
    added at ptrs (``_bc_quad_rows`` moved to the token) if the token is in the chunk (``valid``). On the GPU one
    16-byte vector reduction a row (``red.relaxed.gpu.global.add.v4.f32``, sm_90; ptrs 16-byte aligned), relaxed as
    the walks' other atomics."""
    q0, q1, q2, q3 = _sum_channels_to_quads(x, BLOCK_D, PARTS)
    pred = tl.zeros([x.shape[0]], dtype=tl.int32) + valid.to(tl.int32)
    if ASM:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $6, 0; "
            "@p red.relaxed.gpu.global.add.v4.f32 [$1], {$2, $3, $4, $5}; mov.u32 $0, 0; }",
            "=r,l,f,f,f,f,r", [ptrs.to(tl.int64), q0, q1, q2, q3, pred], dtype=tl.int32, is_pure=False, pack=1)
    else:   # (+ 0.0: the interpreter's atomics read a split's strided values as if they were contiguous)
        tl.atomic_add(ptrs, q0 + 0.0, mask=pred != 0, sem="relaxed")
        tl.atomic_add(ptrs + 1, q1 + 0.0, mask=pred != 0, sem="relaxed")
        tl.atomic_add(ptrs + 2, q2 + 0.0, mask=pred != 0, sem="relaxed")
        tl.atomic_add(ptrs + 3, q3 + 0.0, mask=pred != 0, sem="relaxed")


@triton.jit
def _bc_grad_rows(dX_ptr, pid_b, group, N, s_b, s_g, s_n, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  NS: tl.constexpr, R: tl.constexpr, SCATTER: tl.constexpr, PARTS: tl.constexpr = 1):
    """Per row of a dB / dC tile, the address of its state's gradient at token 0 of the (B, G, N, L) float32
    buffer (strides s_b, s_g, s_n), and whether the row stores it: the [R] rows ``_sum_channels_scattered``
    leaves (one state per row, rows past NS repeating), or the [PARTS * BLOCK_N] part-major states
    ``_sum_channels`` leaves (the parts of a state share its address)."""
    if SCATTER:
        rows = tl.arange(0, R)
        n = (rows // BLOCK_D) * NS + (rows % BLOCK_D) % NS
        own = ((rows % BLOCK_D) < NS) & (n < N)
    else:
        n = tl.arange(0, PARTS * BLOCK_N) % BLOCK_N
        own = n < N
    return dX_ptr + pid_b * s_b + group * s_g + n * s_n, own


@triton.jit
def _sum_channels_for_rows(x, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr, NS: tl.constexpr, SCATTER: tl.constexpr,
                           PARTS: tl.constexpr = 1):
    """Per-token dB / dC in the layout ``_bc_grad_rows`` addresses."""
    if SCATTER:
        return _sum_channels_scattered(x, BLOCK_D)
    else:
        return _sum_channels(x, SPLIT, BLOCK_D, NS, PARTS)


@triton.jit
def _state_offsets(pid_b, chunk, NC, Dm, N, offs_d, n_idx):
    """Element offsets of one chunk's tile in a (B, NC, N, D) float32 summary buffer: row r of the tile
    is channel offs_d[r] and holds states n_idx[r, :]. Channel-contiguous like A, so loads and stores
    keep the tiles' layout."""
    base = (pid_b * NC + chunk).to(tl.int64) * N
    return (base + n_idx) * Dm + offs_d[:, None]


@triton.jit
def _row_offsets(pid_b, chunk, NC, Dm, part, offs_d, SPLIT: tl.constexpr):
    """Element offsets of one chunk's per-row scalars ([R]: row r is part part[r] of channel offs_d[r]) in the
    walks' (B, NC, 2, SPLIT, D) float32 row-sum buffer: the forward walk's sum_t sum_n A2_n X_t,n over the row's
    states here, the chunk's delta sum SPLIT * D further."""
    base = (pid_b * NC + chunk).to(tl.int64) * 2 * SPLIT
    return (base + part) * Dm + offs_d


@triton.jit
def _initial_state(hloc_ptr, S_ptr, A2, pid_b, pid_c, offs_d, n_idx, mask2, mask_d, Dm, NC, N,
                   ROWS: tl.constexpr, COLS: tl.constexpr):
    """State entering chunk pid_c, a [ROWS, COLS] tile laid out as in ``_state_offsets``: fold the
    local end states of chunks 0..pid_c-1.
    hloc: (B, NC, N, D) float32; S: (B, NC, D) float32 sum of delta over each chunk."""
    h = tl.zeros([ROWS, COLS], dtype=tl.float32)
    for jc in range(0, pid_c):
        # float32 always: with one chunk the pointers are placeholders of the inputs' dtype (float64 would
        # change the loop-carried state's type and fail to compile, though the loop never runs)
        st = _state_offsets(pid_b, jc, NC, Dm, N, offs_d, n_idx)
        hl = tl.load(hloc_ptr + st, mask=mask2, other=0.0).to(tl.float32)
        s = tl.load(S_ptr + (pid_b * NC + jc).to(tl.int64) * Dm + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        h = tl.exp2(A2 * s[:, None]) * h + hl
    return h


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _store_tile(o_ptrs, y, p0, p_start, p_end, L, cols, so_l, mask_o, REVERSE: tl.constexpr):
    """Store a [BLOCK_D, UNROLL] output tile of the group at scan position p0 (positions outside the chunk,
    e.g. the group before its first, are masked off)."""
    pp = p0 + cols
    in_chunk = (pp >= p_start) & (pp < p_end)
    tl.store(o_ptrs[:, None] + _token(pp, L, REVERSE)[None, :] * so_l, y, mask=mask_o[:, None] & in_chunk[None, :])


@cached_launch
@triton.jit
def _fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, hloc_ptr, S_ptr, last_ptr,
    Dm, L, N, T, NC, CPG, out_scale,
    su_b, su_d, su_l, sd_b, sd_d, sd_l, sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, ROW_ASM: tl.constexpr, ASM: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, STATE_PASS: tl.constexpr, ACCUM: tl.constexpr, STORE_LAST: tl.constexpr,
    PREFETCH: tl.constexpr, LOOKAHEAD: tl.constexpr, BC_PAIR: tl.constexpr = False,
):
    """Forward walk (the state pass of long sequences stores each chunk's local end state and delta sum
    instead of outputs).

    LOOKAHEAD: each group loads the next group's u and delta into registers before its own arithmetic, and
    stores its output tile one group late, after those loads. ptxas sinks loads towards their first use (to
    keep registers free; v11's SASS in docs/kernels.md), which leaves little time to cover them; a store it
    cannot tell apart from the load's address keeps the load above it, so the loads stay a group ahead."""
    NS: tl.constexpr = BLOCK_N // SPLIT
    R: tl.constexpr = SPLIT * BLOCK_D
    pid_d, pid_c, pid_b, offs_d, part, n_idx, mask_d, mask2, A, A2, group, bias, offs_o, mask_o = _program_setup(
        A_ptr, bias_ptr, Dm, N, CPG, sA_d, sA_n, BLOCK_D, BLOCK_N, SPLIT, HAS_BIAS)
    if HAS_D:   # D * u enters once per channel: on the rows of the first state part
        Dv = tl.load(D_ptr + offs_d, mask=mask_d & (part == 0), other=0.0).to(tl.float32)
    u_ptrs = u_ptr + pid_b * su_b + offs_d * su_d
    dl_ptrs = dl_ptr + pid_b * sd_b + offs_d * sd_d
    B_base, C_base, sC_n, sC_l = _bc_bases(B_ptr, C_ptr, pid_b, group, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                                           BLOCK_N, BC_PAIR)   # one part's states
    o_ptrs = out_ptr + pid_b * so_b + offs_o * so_d
    zo_ptrs = z_ptr + pid_b * sz_b + offs_o * sz_d   # z is loaded per output tile, for the gate

    if STATE_PASS:
        h = tl.zeros([R, NS], dtype=tl.float32)
    else:
        h = _initial_state(hloc_ptr, S_ptr, A2, pid_b, pid_c, offs_d, n_idx, mask2, mask_d, Dm, NC, N, R, NS)
    ssum = tl.zeros([R], dtype=tl.float32)
    p_start = pid_c * T
    p_end = tl.minimum(p_start + T, L)
    cols = tl.arange(0, UNROLL)
    HZ: tl.constexpr = HAS_Z and not STATE_PASS
    if PREFETCH > 0:
        d0 = pid_d * BLOCK_D
        pf_addr, pf_step, pf_j = _prefetch_lanes(
            u_ptr + pid_b * su_b + d0 * su_d, dl_ptr + pid_b * sd_b + d0 * sd_d, z_ptr + pid_b * sz_b + d0 * sz_d,
            B_base, C_base, out_ptr + pid_b * so_b + d0 * so_d, out_ptr, su_l, sd_l, sz_l, sB_l, sC_l, so_l, so_l,
            R, UNROLL, BLOCK_N, HZ, ACCUM, False, su_d, sd_d, sz_d, so_d, 0, tl.minimum(Dm - d0, BLOCK_D))
    if LOOKAHEAD:
        u_next, d_next = _load_group_raw(u_ptrs, dl_ptrs, p_start, p_end, L, cols, su_l, sd_l, mask_d, REVERSE,
                                         EVEN_D)
        y_prev = tl.zeros([BLOCK_D, UNROLL], dtype=out_ptr.dtype.element_ty)
    for p0 in range(p_start, p_end, UNROLL):
        if PREFETCH > 0:
            _prefetch_group(pf_addr, pf_step, _scan_token(p0 + PREFETCH * UNROLL + pf_j, p_end, L, REVERSE))
        if LOOKAHEAD:
            u_cur = u_next
            d_cur = d_next
            u_next, d_next = _load_group_raw(u_ptrs, dl_ptrs, p0 + UNROLL, p_end, L, cols, su_l, sd_l, mask_d,
                                             REVERSE, EVEN_D)
            if not STATE_PASS:   # the previous group's output, after the loads above
                _store_tile(o_ptrs, y_prev, p0 - UNROLL, p_start, p_end, L, cols, so_l, mask_o, REVERSE)
        pp = p0 + cols
        tt = _token(pp, L, REVERSE)
        m = mask_o[:, None] & (pp < p_end)[None, :]
        optr = o_ptrs[:, None] + tt[None, :] * so_l
        # The output tile's own inputs, loaded before the group's arithmetic, which then covers their latency.
        # The gate applies to the [BLOCK_D, UNROLL] tile, once per channel and token: per row it would be
        # computed on every state part, and the prior value has to be added before it.
        if ACCUM:
            y_old = tl.load(optr, mask=m, other=0.0).to(tl.float32)
        if HZ:
            z_tile = tl.load(zo_ptrs[:, None] + tt[None, :] * sz_l, mask=m, other=0.0).to(tl.float32)
        # Outputs of the group are collected and written after it: a store between two tokens' loads
        # would keep the compiler from issuing the group's loads together (it cannot rule out aliasing).
        y_tile = tl.zeros([BLOCK_D, UNROLL], dtype=tl.float32)
        for j in tl.static_range(UNROLL):
            t = _scan_token(p0 + j, p_end, L, REVERSE)
            if LOOKAHEAD:
                u_raw = _column(u_cur, cols, j)
                d_raw = _column(d_cur, cols, j)
            else:
                u_raw = None
                d_raw = None
            # HAS_Z off: the gate is applied to the output tile (z_tile), so no per-row z pointer is passed
            u, dl, slope, _, Bv, Cv = _load_step(u_ptrs, dl_ptrs, u_ptrs, B_base, C_base, t, p0 + j < p_end, mask_d,
                                                part, N, su_l, sd_l, sz_l, sB_l, sB_n, sC_l, sC_n, bias, NS, SPLIT,
                                                False, HAS_BIAS, SOFTPLUS, EVEN_D, EVEN_N, ROW_ASM, ASM, u_raw, d_raw)
            h = tl.exp2(dl[:, None] * A2) * h + (dl * u)[:, None] * Bv
            if STATE_PASS:
                ssum += dl
            else:
                y = tl.sum(h * Cv, axis=1)
                if HAS_D:
                    y += Dv * u
                y = _sum_parts(y, SPLIT, BLOCK_D)
                y_tile = tl.where(cols[None, :] == j, y[:, None], y_tile)
        if not STATE_PASS:
            if ACCUM:
                y_tile += y_old
            if HZ:
                y_tile = y_tile * z_tile * _sigmoid(z_tile, ASM)
            y_tile = y_tile * out_scale
            if LOOKAHEAD:
                y_prev = y_tile.to(out_ptr.dtype.element_ty)
            else:
                tl.store(optr, y_tile.to(out_ptr.dtype.element_ty), mask=m)
    if LOOKAHEAD and not STATE_PASS:   # the last group's output
        _store_tile(o_ptrs, y_prev, p_start + ((p_end - p_start - 1) // UNROLL) * UNROLL, p_start, p_end, L, cols,
                    so_l, mask_o, REVERSE)
    if STATE_PASS:
        tl.store(hloc_ptr + _state_offsets(pid_b, pid_c, NC, Dm, N, offs_d, n_idx), h, mask=mask2)
        tl.store(S_ptr + (pid_b * NC + pid_c).to(tl.int64) * Dm + offs_d, ssum, mask=mask_d & (part == 0))
    if STORE_LAST:
        if pid_c == NC - 1:
            tl.store(last_ptr + (pid_b * Dm + offs_d[:, None]) * N + n_idx, h, mask=mask2)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
# The walks split states over threads as the forward does. Per-channel quantities (du, ddelta, dz, F)
# are sums over a channel's states, so each row adds up its own states and terms that exist once per
# channel (D, F, the softplus slope applies to the sum) enter on the part-0 row only, before one
# _sum_parts per output. Their atomic adds are sem="relaxed": plain sums nothing here reads back, and Triton's
# default (acq_rel) fences every add and invalidates the SM's L1 after it (~21% of a walk; docs/kernels.md, v16).
@cached_launch
@triton.jit
def _bwd_adjoint_state_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, gout_ptr,
    Dm, L, N, T, NC, CPG,
    su_b, su_d, su_l, sd_b, sd_d, sd_l, sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sz_b, sz_d, sz_l, sg_b, sg_d, sg_l,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, ROW_ASM: tl.constexpr, ASM: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    PREFETCH: tl.constexpr, DY_SCALE: tl.constexpr, BC_PAIR: tl.constexpr = False,
):
    """Per chunk, the adjoint walked from zero at the chunk's end: stores a_s*g_s at the chunk's first
    position (Gout), (B, NC, N, D) float32."""
    NS: tl.constexpr = BLOCK_N // SPLIT
    R: tl.constexpr = SPLIT * BLOCK_D
    pid_d, pid_c, pid_b, offs_d, part, n_idx, mask_d, mask2, A, A2, group, bias, offs_o, mask_o = _program_setup(
        A_ptr, bias_ptr, Dm, N, CPG, sA_d, sA_n, BLOCK_D, BLOCK_N, SPLIT, HAS_BIAS)
    u_ptrs = u_ptr + pid_b * su_b + offs_d * su_d
    dl_ptrs = dl_ptr + pid_b * sd_b + offs_d * sd_d
    z_ptrs = z_ptr + pid_b * sz_b + offs_d * sz_d
    g_ptrs = dy_ptr + pid_b * sg_b + offs_d * sg_d
    B_base, C_base, sC_n, sC_l = _bc_bases(B_ptr, C_ptr, pid_b, group, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                                           BLOCK_N, BC_PAIR)
    gnext = tl.zeros([R, NS], dtype=tl.float32)
    p_start = pid_c * T
    p_end = tl.minimum(p_start + T, L)
    n_steps = p_end - p_start
    if PREFETCH > 0:
        d0 = pid_d * BLOCK_D
        # this pass reads neither u nor B (their loads in _load_step are dead code): their lanes ask for the
        # delta and C rows again, which costs no memory traffic, instead of rows nobody reads
        dl_row = dl_ptr + pid_b * sd_b + d0 * sd_d
        pf_addr, pf_step, pf_j = _prefetch_lanes(
            dl_row, dl_row, z_ptr + pid_b * sz_b + d0 * sz_d,
            C_base, C_base, dy_ptr + pid_b * sg_b + d0 * sg_d, dy_ptr, sd_l, sd_l, sz_l, sC_l, sC_l, sg_l, sg_l,
            R, UNROLL, BLOCK_N, HAS_Z, True, False)
    for q0 in range(0, n_steps, UNROLL):
        if PREFETCH > 0:
            _prefetch_group(pf_addr, pf_step, _walk_back_token(q0 + PREFETCH * UNROLL + pf_j, n_steps, p_end, L,
                                                               REVERSE))
        for j in tl.static_range(UNROLL):
            q = q0 + j
            ok = q < n_steps
            t = _walk_back_token(q, n_steps, p_end, L, REVERSE)
            u, dl, slope, z, Bv, Cv = _load_step(u_ptrs, dl_ptrs, z_ptrs, B_base, C_base, t, ok, mask_d, part, N,
                                                su_l, sd_l, sz_l, sB_l, sB_n, sC_l, sC_n, bias, NS, SPLIT,
                                                HAS_Z, HAS_BIAS, SOFTPLUS, EVEN_D, EVEN_N, ROW_ASM, ASM)
            dy = tl.load(g_ptrs + t * sg_l, mask=mask_d & ok, other=0.0).to(tl.float32) * DY_SCALE
            if HAS_Z:
                dy = dy * z * _sigmoid(z, ASM)
            gnext = tl.exp2(dl[:, None] * A2) * (gnext + dy[:, None] * Cv)
    st = _state_offsets(pid_b, pid_c, NC, Dm, N, offs_d, n_idx)
    tl.store(gout_ptr + st, gnext, mask=mask2)


@cached_launch
@triton.jit
def _bwd_forward_walk_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, hloc_ptr, S_ptr,
    dz_ptr, dC_ptr, dD_ptr, F_ptr, tx_ptr, qx_ptr,
    Dm, L, N, T, NC, CPG,
    su_b, su_d, su_l, sd_b, sd_d, sd_l, sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sz_b, sz_d, sz_l, sg_b, sg_d, sg_l,
    sdz_b, sdz_d, sdz_l, sdC_b, sdC_g, sdC_n, sdC_l,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, ROW_ASM: tl.constexpr, ASM: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, DZ_ACCUM: tl.constexpr, PREFETCH: tl.constexpr, SCATTER: tl.constexpr,
    DY_SCALE: tl.constexpr, LOOKAHEAD: tl.constexpr, BC_PARTS: tl.constexpr = 1, SHARED: tl.constexpr = False,
    QUADS: tl.constexpr = False, LANE_OFFSETS: tl.constexpr = False, BC_PAIR: tl.constexpr = False,
):
    """Forward-order walk with the true states: dz, dC (atomic), dD (atomic), F_t into a (B, L, D)
    float32 buffer, and per chunk QX = sum X_t * (delta summed from the chunk start) and, per row (``_row_offsets``),
    the two scalars the reverse walk starts from: sum_t sum_n A2_n X_t,n and the chunk's delta sum. F_t and the
    first are running sums of per-token scalars: only their sums over the states are ever read, so no per-state
    sum of X is kept (16 registers and an add per state and token fewer).

    LOOKAHEAD: each step loads the next step's inputs (``_step_raw``) before its own arithmetic. The per-token
    channel sums pass through shared memory behind a barrier, and the group's stores end it; ptxas keeps later
    loads behind both, so without this every step's loads wait where the step starts."""
    NS: tl.constexpr = BLOCK_N // SPLIT
    R: tl.constexpr = SPLIT * BLOCK_D
    pid_d, pid_c, pid_b, offs_d, part, n_idx, mask_d, mask2, A, A2, group, bias, offs_o, mask_o = _program_setup(
        A_ptr, bias_ptr, Dm, N, CPG, sA_d, sA_n, BLOCK_D, BLOCK_N, SPLIT, HAS_BIAS)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d & (part == 0), other=0.0).to(tl.float32)
    u_ptrs, dl_ptrs, z_ptrs, g_ptrs, u_off, d_off, z_off, g_off = _walk_rows(
        u_ptr, dl_ptr, z_ptr, dy_ptr, pid_b, offs_d, su_b, su_d, sd_b, sd_d, sz_b, sz_d, sg_b, sg_d, LANE_OFFSETS)
    dz_ptrs, dz_off = _lane_rows(dz_ptr + pid_b * sdz_b, offs_o * sdz_d, LANE_OFFSETS)
    F_ptrs, F_off = _lane_rows(F_ptr + pid_b * L * Dm, offs_o, LANE_OFFSETS)
    B_base, C_base, sC_n, sC_l = _bc_bases(B_ptr, C_ptr, pid_b, group, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                                           BLOCK_N, BC_PAIR)
    dC_ptrs, mask_n = _bc_grad_rows(dC_ptr, pid_b, group, N, sdC_b, sdC_g, sdC_n, BLOCK_D, BLOCK_N, NS, R, SCATTER,
                                    BC_PARTS)
    if QUADS:   # each row's 4 adjacent states of dC, added per token (``_add_token_quads``)
        dC_quad, dC_qoff = _bc_quad_rows(dC_ptr, pid_b, group, sdC_b, sdC_g, sdC_n, R, NS, BLOCK_D // BC_PARTS,
                                         LANE_OFFSETS)
    TILE_N: tl.constexpr = R if SCATTER else BC_PARTS * BLOCK_N

    h = _initial_state(hloc_ptr, S_ptr, A2, pid_b, pid_c, offs_d, n_idx, mask2, mask_d, Dm, NC, N, R, NS)
    ax = tl.zeros([R], dtype=tl.float32)   # sum over the tokens so far of sum_n A2_n X_t,n (this row's states)
    qx = tl.zeros([R, NS], dtype=tl.float32)
    dcum = tl.zeros([R], dtype=tl.float32)
    dD_acc = tl.zeros([R], dtype=tl.float32)
    p_start = pid_c * T
    p_end = tl.minimum(p_start + T, L)
    cols = tl.arange(0, UNROLL)
    if PREFETCH > 0:
        d0 = pid_d * BLOCK_D
        pf_addr, pf_step, pf_j = _prefetch_lanes(
            u_ptr + pid_b * su_b + d0 * su_d, dl_ptr + pid_b * sd_b + d0 * sd_d, z_ptr + pid_b * sz_b + d0 * sz_d,
            B_base, C_base, dy_ptr + pid_b * sg_b + d0 * sg_d, dz_ptr + pid_b * sdz_b + d0 * sdz_d,
            su_l, sd_l, sz_l, sB_l, sC_l, sg_l, sdz_l, R, UNROLL, BLOCK_N, HAS_Z, True, HAS_Z and DZ_ACCUM,
            su_d, sd_d, sz_d, sg_d, sdz_d, tl.minimum(Dm - d0, BLOCK_D))
    if LOOKAHEAD:
        nu, nd, nz, ng, nB, nC = _step_raw(u_ptrs, dl_ptrs, z_ptrs, g_ptrs, B_base, C_base,
                                           _scan_token(p_start, p_end, L, REVERSE), mask_d, part, N, su_l, sd_l,
                                           sz_l, sg_l, sB_l, sB_n, sC_l, sC_n, NS, SPLIT, HAS_Z, EVEN_D, EVEN_N,
                                           ROW_ASM, u_off, d_off, z_off, g_off)
    for p0 in range(p_start, p_end, UNROLL):
        if PREFETCH > 0:
            _prefetch_group(pf_addr, pf_step, _scan_token(p0 + PREFETCH * UNROLL + pf_j, p_end, L, REVERSE))
        dz_tile = tl.zeros([BLOCK_D, UNROLL], dtype=tl.float32)
        F_tile = tl.zeros([BLOCK_D, UNROLL], dtype=tl.float32)
        dC_tile = tl.zeros([TILE_N, UNROLL], dtype=tl.float32)
        for j in tl.static_range(UNROLL):
            p = p0 + j
            ok = p < p_end
            t = _scan_token(p, p_end, L, REVERSE)
            if LOOKAHEAD:
                cu, cd, cz, cg, cB, cC = nu, nd, nz, ng, nB, nC
                nu, nd, nz, ng, nB, nC = _step_raw(u_ptrs, dl_ptrs, z_ptrs, g_ptrs, B_base, C_base,
                                                   _scan_token(p + 1, p_end, L, REVERSE), mask_d, part, N, su_l, sd_l,
                                                   sz_l, sg_l, sB_l, sB_n, sC_l, sC_n, NS, SPLIT, HAS_Z, EVEN_D,
                                                   EVEN_N, ROW_ASM, u_off, d_off, z_off, g_off)
            else:
                cu, cd, cz, cg, cB, cC = _step_raw(u_ptrs, dl_ptrs, z_ptrs, g_ptrs, B_base, C_base, t, mask_d, part,
                                                   N, su_l, sd_l, sz_l, sg_l, sB_l, sB_n, sC_l, sC_n, NS, SPLIT,
                                                   HAS_Z, EVEN_D, EVEN_N, ROW_ASM, u_off, d_off, z_off, g_off)
            u, dl, slope, z, Bv, Cv = _load_step(u_ptrs, dl_ptrs, z_ptrs, B_base, C_base, t, ok, mask_d, part, N,
                                                su_l, sd_l, sz_l, sB_l, sB_n, sC_l, sC_n, bias, NS, SPLIT,
                                                HAS_Z, HAS_BIAS, SOFTPLUS, EVEN_D, EVEN_N, ROW_ASM, ASM,
                                                cu, cd, cz, cB, cC)
            dy = tl.where(ok, cg.to(tl.float32), 0.0) * DY_SCALE
            h = tl.exp2(dl[:, None] * A2) * h + (dl * u)[:, None] * Bv
            if HAS_Z:
                ypre = tl.sum(h * Cv, axis=1)
                if HAS_D:
                    ypre += Dv * u
                sig = _sigmoid(z, ASM)
                dz = _sum_parts(dy * ypre * sig * (1.0 + z * (1.0 - sig)), SPLIT, BLOCK_D)
                dz_tile = tl.where(cols[None, :] == j, dz[:, None], dz_tile)
                dy = dy * z * sig
            if HAS_D:
                dD_acc += dy * u
            F = _sum_parts(ax * LN2, SPLIT, BLOCK_D)
            F_tile = tl.where(cols[None, :] == j, F[:, None], F_tile)
            dyh = dy[:, None] * h
            if SHARED:   # dC's product reused: one multiply per state and token fewer (``CONFIG["SHARED_PRODUCTS"]``)
                X = dyh * Cv
            else:
                X = (dy[:, None] * Cv) * h
            ax += tl.sum(A2 * X, axis=1)
            dcum += dl
            qx += X * dcum[:, None]
            if QUADS:
                _add_token_quads(dyh, dC_quad + (dC_qoff + t * sdC_l), ok, BLOCK_D, BC_PARTS, ASM)
            else:
                dC = _sum_channels_for_rows(dyh, SPLIT, BLOCK_D, NS, SCATTER, BC_PARTS)
                dC_tile = tl.where(cols[None, :] == j, dC[:, None], dC_tile)
        pp = p0 + cols
        tt = _token(pp, L, REVERSE)
        okv = pp < p_end
        m = mask_o[:, None] & okv[None, :]
        if HAS_Z:
            dz_addr = _lane_tile(dz_ptrs, dz_off, tt, sdz_l, LANE_OFFSETS)
            if DZ_ACCUM:   # the second scan over the same z adds its dz in place of a separate add pass
                dz_tile += tl.load(dz_addr, mask=m, other=0.0).to(tl.float32)
            tl.store(dz_addr, dz_tile.to(dz_ptr.dtype.element_ty), mask=m)
        tl.store(_lane_tile(F_ptrs, F_off, tt, Dm, LANE_OFFSETS), F_tile, mask=m)
        if not QUADS:
            tl.atomic_add(dC_ptrs[:, None] + tt[None, :] * sdC_l, dC_tile, mask=mask_n[:, None] & okv[None, :],
                          sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, dD_acc, mask=mask_d & (part == 0), sem="relaxed")
    st = _state_offsets(pid_b, pid_c, NC, Dm, N, offs_d, n_idx)
    tl.store(qx_ptr + st, qx, mask=mask2)
    rs = _row_offsets(pid_b, pid_c, NC, Dm, part, offs_d, SPLIT)
    tl.store(tx_ptr + rs, ax, mask=mask_d)
    tl.store(tx_ptr + rs + SPLIT * Dm, dcum, mask=mask_d)


@cached_launch
@triton.jit
def _bwd_reverse_walk_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, F_ptr,
    hloc_ptr, S_ptr, gout_ptr, tx_ptr, qx_ptr,
    du_ptr, ddl_ptr, dB_ptr, dA_ptr, dbias_ptr,
    Dm, L, N, T, NC, CPG,
    su_b, su_d, su_l, sd_b, sd_d, sd_l, sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sz_b, sz_d, sz_l, sg_b, sg_d, sg_l,
    sdu_b, sdu_d, sdu_l, sdd_b, sdd_d, sdd_l, sdB_b, sdB_g, sdB_n, sdB_l,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, ROW_ASM: tl.constexpr, ASM: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, PREFETCH: tl.constexpr, SCATTER: tl.constexpr, DY_SCALE: tl.constexpr,
    DA_LOG: tl.constexpr, LOOKAHEAD: tl.constexpr, BC_PARTS: tl.constexpr = 1, SHARED: tl.constexpr = False,
    QUADS: tl.constexpr = False, LANE_OFFSETS: tl.constexpr = False, BC_PAIR: tl.constexpr = False,
):
    """Reverse-order walk with the true adjoint: du, ddelta (through softplus/bias), dB (atomic),
    dA (or with DA_LOG, A_log's gradient dA * A) and ddelta_bias (atomic). LOOKAHEAD: as in the forward walk
    (F_t too)."""
    NS: tl.constexpr = BLOCK_N // SPLIT
    R: tl.constexpr = SPLIT * BLOCK_D
    pid_d, pid_c, pid_b, offs_d, part, n_idx, mask_d, mask2, A, A2, group, bias, offs_o, mask_o = _program_setup(
        A_ptr, bias_ptr, Dm, N, CPG, sA_d, sA_n, BLOCK_D, BLOCK_N, SPLIT, HAS_BIAS)
    first = mask_d & (part == 0)   # the rows that carry a channel's once-per-channel terms
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=first, other=0.0).to(tl.float32)
    u_ptrs, dl_ptrs, z_ptrs, g_ptrs, u_off, d_off, z_off, g_off = _walk_rows(
        u_ptr, dl_ptr, z_ptr, dy_ptr, pid_b, offs_d, su_b, su_d, sd_b, sd_d, sz_b, sz_d, sg_b, sg_d, LANE_OFFSETS)
    du_ptrs, du_off = _lane_rows(du_ptr + pid_b * sdu_b, offs_o * sdu_d, LANE_OFFSETS)
    ddl_ptrs, dd_off = _lane_rows(ddl_ptr + pid_b * sdd_b, offs_o * sdd_d, LANE_OFFSETS)
    F_ptrs, F_off = _lane_rows(F_ptr + pid_b * L * Dm, offs_d, LANE_OFFSETS)
    B_base, C_base, sC_n, sC_l = _bc_bases(B_ptr, C_ptr, pid_b, group, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                                           BLOCK_N, BC_PAIR)
    dB_ptrs, mask_n = _bc_grad_rows(dB_ptr, pid_b, group, N, sdB_b, sdB_g, sdB_n, BLOCK_D, BLOCK_N, NS, R, SCATTER,
                                    BC_PARTS)
    if QUADS:
        dB_quad, dB_qoff = _bc_quad_rows(dB_ptr, pid_b, group, sdB_b, sdB_g, sdB_n, R, NS, BLOCK_D // BC_PARTS,
                                         LANE_OFFSETS)
    TILE_N: tl.constexpr = R if SCATTER else BC_PARTS * BLOCK_N

    # Fold the later chunks into the adjoint entering this chunk from the right, gin. What the later chunks
    # add to every dw_t here is RX_after - RY_after, sums over the whole rest of the sequence whose
    # difference cancels badly in float32 at long L; it telescopes to dw at the next chunk's first token,
    # gin * (the true state at this chunk's end), a product of two quantities with no cancellation. (For the
    # last chunk gin is 0; folding one chunk less there keeps a single-chunk launch off the placeholders.)
    gin = tl.zeros([R, NS], dtype=tl.float32)
    for jj in range(0, NC - 1 - pid_c):
        c = NC - 1 - jj
        st_c = _state_offsets(pid_b, c, NC, Dm, N, offs_d, n_idx)
        s = tl.load(S_ptr + (pid_b * NC + c).to(tl.int64) * Dm + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        gin = tl.load(gout_ptr + st_c, mask=mask2, other=0.0).to(tl.float32) + tl.exp2(A2 * s[:, None]) * gin
    h_end = _initial_state(hloc_ptr, S_ptr, A2, pid_b, tl.minimum(pid_c + 1, NC - 1), offs_d, n_idx, mask2, mask_d,
                           Dm, NC, N, R, NS)
    after = gin * h_end
    st = _state_offsets(pid_b, pid_c, NC, Dm, N, offs_d, n_idx)
    rs = _row_offsets(pid_b, pid_c, NC, Dm, part, offs_d, SPLIT)
    K = (tl.load(tx_ptr + rs, mask=mask_d, other=0.0) + tl.sum(A2 * after, axis=1)) * LN2   # this row's share
    # the chunk's delta sum, as the forward walk summed it: at a one-token chunk rem * Y below is then the forward
    # walk's dcum * X bit for bit where X and Y are (SHARED off), and dA's difference cancels to exactly 0
    dsum = tl.load(tx_ptr + rs + SPLIT * Dm, mask=mask_d, other=0.0)

    gnext = gin
    ay = tl.zeros([R], dtype=tl.float32)        # sum over the tokens so far of sum_n A2_n Y_t,n
    qy = tl.zeros([R, NS], dtype=tl.float32)    # sum_t Y_t * (delta summed from the chunk start to t)
    rem = dsum                                   # that delta sum at the current token
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    p_start = pid_c * T
    p_end = tl.minimum(p_start + T, L)
    n_steps = p_end - p_start
    cols = tl.arange(0, UNROLL)
    if PREFETCH > 0:
        d0 = pid_d * BLOCK_D
        pf_addr, pf_step, pf_j = _prefetch_lanes(
            u_ptr + pid_b * su_b + d0 * su_d, dl_ptr + pid_b * sd_b + d0 * sd_d, z_ptr + pid_b * sz_b + d0 * sz_d,
            B_base, C_base, dy_ptr + pid_b * sg_b + d0 * sg_d, F_ptr + pid_b * L * Dm + d0,
            su_l, sd_l, sz_l, sB_l, sC_l, sg_l, Dm, R, UNROLL, BLOCK_N, HAS_Z, True, True,
            su_d, sd_d, sz_d, sg_d, 1, tl.minimum(Dm - d0, BLOCK_D))
    if LOOKAHEAD:
        t0 = _walk_back_token(0, n_steps, p_end, L, REVERSE)
        nu, nd, nz, ng, nB, nC = _step_raw(u_ptrs, dl_ptrs, z_ptrs, g_ptrs, B_base, C_base, t0, mask_d, part, N,
                                           su_l, sd_l, sz_l, sg_l, sB_l, sB_n, sC_l, sC_n, NS, SPLIT, HAS_Z, EVEN_D,
                                           EVEN_N, ROW_ASM, u_off, d_off, z_off, g_off)
        nF = tl.load(F_ptrs + (F_off + t0 * Dm), mask=mask_d & (part == 0), other=0.0)
    for q0 in range(0, n_steps, UNROLL):
        if PREFETCH > 0:
            _prefetch_group(pf_addr, pf_step, _walk_back_token(q0 + PREFETCH * UNROLL + pf_j, n_steps, p_end, L,
                                                               REVERSE))
        du_tile = tl.zeros([BLOCK_D, UNROLL], dtype=tl.float32)
        ddl_tile = tl.zeros([BLOCK_D, UNROLL], dtype=tl.float32)
        dB_tile = tl.zeros([TILE_N, UNROLL], dtype=tl.float32)
        for j in tl.static_range(UNROLL):
            q = q0 + j
            ok = q < n_steps
            t = _walk_back_token(q, n_steps, p_end, L, REVERSE)
            md = mask_d & ok
            if LOOKAHEAD:
                cu, cd, cz, cg, cB, cC, cF = nu, nd, nz, ng, nB, nC, nF
                tn = _walk_back_token(q + 1, n_steps, p_end, L, REVERSE)
                nu, nd, nz, ng, nB, nC = _step_raw(u_ptrs, dl_ptrs, z_ptrs, g_ptrs, B_base, C_base, tn, mask_d, part,
                                                   N, su_l, sd_l, sz_l, sg_l, sB_l, sB_n, sC_l, sC_n, NS, SPLIT,
                                                   HAS_Z, EVEN_D, EVEN_N, ROW_ASM, u_off, d_off, z_off, g_off)
                nF = tl.load(F_ptrs + (F_off + tn * Dm), mask=mask_d & (part == 0), other=0.0)
            else:
                cu, cd, cz, cg, cB, cC = _step_raw(u_ptrs, dl_ptrs, z_ptrs, g_ptrs, B_base, C_base, t, mask_d, part,
                                                   N, su_l, sd_l, sz_l, sg_l, sB_l, sB_n, sC_l, sC_n, NS, SPLIT,
                                                   HAS_Z, EVEN_D, EVEN_N, ROW_ASM, u_off, d_off, z_off, g_off)
                cF = tl.load(F_ptrs + (F_off + t * Dm), mask=mask_d & (part == 0), other=0.0)
            u, dl, slope, z, Bv, Cv = _load_step(u_ptrs, dl_ptrs, z_ptrs, B_base, C_base, t, ok, mask_d, part, N,
                                                su_l, sd_l, sz_l, sB_l, sB_n, sC_l, sC_n, bias, NS, SPLIT,
                                                HAS_Z, HAS_BIAS, SOFTPLUS, EVEN_D, EVEN_N, ROW_ASM, ASM,
                                                cu, cd, cz, cB, cC)
            dy = tl.where(ok, cg.to(tl.float32), 0.0) * DY_SCALE
            Ft = tl.where(ok, cF, 0.0)
            if HAS_Z:
                dy = dy * z * _sigmoid(z, ASM)
            g = gnext + dy[:, None] * Cv
            du_ = dl * u
            gdu = g * du_[:, None]
            if SHARED:   # dB's product reused, as the forward walk reuses dC's: X and Y then round differently
                Y = gdu * Bv
            else:        # b rounded as the forward walk's h update rounds it: at L = 1, where X and Y are equal,
                Y = g * (du_[:, None] * Bv)   # they are bit for bit and dA's X - Y cancels to exactly 0
            ay += tl.sum(A2 * Y, axis=1)
            qy += Y * rem[:, None]
            rem -= dl
            gB = tl.sum(g * Bv, axis=1)
            du = dl * gB
            if HAS_D:
                du += dy * Dv
            du = _sum_parts(du, SPLIT, BLOCK_D)
            ddl = u * gB + K - Ft - ay * LN2
            if SOFTPLUS:
                ddl = ddl * slope
            ddl = _sum_parts(tl.where(md, ddl, 0.0), SPLIT, BLOCK_D)
            dbias_acc += ddl
            du_tile = tl.where(cols[None, :] == j, du[:, None], du_tile)
            ddl_tile = tl.where(cols[None, :] == j, ddl[:, None], ddl_tile)
            if QUADS:
                _add_token_quads(gdu, dB_quad + (dB_qoff + t * sdB_l), ok, BLOCK_D, BC_PARTS, ASM)
            else:
                dB = _sum_channels_for_rows(gdu, SPLIT, BLOCK_D, NS, SCATTER, BC_PARTS)
                dB_tile = tl.where(cols[None, :] == j, dB[:, None], dB_tile)
            gnext = tl.exp2(dl[:, None] * A2) * g
        qq = q0 + cols
        pp = p_end - 1 - qq
        tt = _token(pp, L, REVERSE)
        okv = qq < n_steps
        m = mask_o[:, None] & okv[None, :]
        tl.store(_lane_tile(du_ptrs, du_off, tt, sdu_l, LANE_OFFSETS), du_tile.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(_lane_tile(ddl_ptrs, dd_off, tt, sdd_l, LANE_OFFSETS), ddl_tile.to(ddl_ptr.dtype.element_ty), mask=m)
        if not QUADS:
            tl.atomic_add(dB_ptrs[:, None] + tt[None, :] * sdB_l, dB_tile, mask=mask_n[:, None] & okv[None, :],
                          sem="relaxed")
    qx_c = tl.load(qx_ptr + st, mask=mask2, other=0.0)
    # sum_t delta_t * dw_t over this chunk: sum_t (X_t - Y_t) * (delta summed up to t), and the later chunks' share
    dA = qx_c - qy + dsum[:, None] * after
    if DA_LOG:   # from A2, live anyway: keeping A too through the token loop costs this register-capped kernel
        dA = dA * (A2 * (1.0 / LOG2E))
    tl.atomic_add(dA_ptr + offs_d[:, None] * N + n_idx, dA, mask=mask2, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_o, dbias_acc, mask=mask_o, sem="relaxed")


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
def _bc_parts(block_d: int, grad: torch.Tensor) -> int:
    """The walks' partial dB / dC sums per program (``CONFIG["BC_PARTS"]``), at most one per channel of the block,
    for the (B, G, N, L) buffer ``grad`` they are added into. Only where its states are adjacent, as in the mixer's
    token-major buffers where v34 was measured: there a lane's adds go out as 16-byte vectors. Into a (B, N, L)
    buffer, states L apart, the one-direction op's forward+backward took 1.8x session 23's time at 8 parts
    (docs/kernels.md, v34), so there the block's channels are summed in one part."""
    parts = int(CONFIG["BC_PARTS"] or 1)
    if parts < 1 or parts & (parts - 1):
        raise ValueError(f"CONFIG['BC_PARTS'] must be a power of two, got {CONFIG['BC_PARTS']}")
    if grad.shape[2] > 1 and grad.stride(2) != 1:
        return 1
    return min(parts, block_d)


def _bc_quads(block_d: int, split: int, N: int, parts: int, grad: torch.Tensor, num_warps: int) -> bool:
    """Whether a walk adds its dB / dC per token as 4 adjacent states a row (``CONFIG["BC_QUADS"]``,
    ``_sum_channels_to_quads``): one thread a channel, 4 states per channel of a part (N = 4 * block_d / parts),
    and a buffer whose states are adjacent and whose rows are 16-byte aligned, as the vector atomic needs. The
    block's channels must also fill its threads: with fewer rows than threads Triton gives each row to several
    threads, and each of them would issue the row's atomic in the inline PTX, which Triton does not mask as it
    does its own atomics (session 32: an 8-channel block of one warp, N = 4, added dB / dC four times over)."""
    if not CONFIG["BC_QUADS"] or split != 1 or parts < 2 or N != 4 * (block_d // parts):
        return False
    if block_d < 32 * num_warps:
        return False
    s_b, s_g, s_n, s_l = grad.stride()
    return s_n == 1 and grad.data_ptr() % 16 == 0 and s_b % 4 == 0 and s_g % 4 == 0 and s_l % 4 == 0


def _lane_offsets_fit(*rows) -> bool:
    """Whether every (tensor, channel dim, token dim) given has its offsets within a batch (channel * stride + token *
    stride, the walks' LANE_OFFSETS arithmetic) below 2**31."""
    for t, dc, dl in rows:
        if (t.shape[dc] - 1) * abs(t.stride(dc)) + (t.shape[dl] - 1) * abs(t.stride(dl)) >= 2 ** 31:
            return False
    return True


def _bc_grad_out(grad: torch.Tensor, like: torch.Tensor, own: bool) -> torch.Tensor:
    """dB / dC as returned: in ``like``'s dtype and shape; a buffer of our own (token-major) made contiguous, as
    the op's fake declares; the caller's ``dB_acc`` / ``dC_acc`` as it is (in place where the dtype matches)."""
    # (to() returns a float32 buffer itself whatever memory_format asks; hence contiguous())
    grad = grad.to(like.dtype, memory_format=torch.contiguous_format).contiguous() if own else grad.to(like.dtype)
    return grad.reshape(like.shape) if like.dim() == 3 else grad


def _block_d(Dm: int, G: int, cap: int) -> int:
    cpg = Dm // G
    if G == 1:
        return min(cap, next_pow2(Dm))
    # a block must sit inside one group of B/C: the largest power of two dividing the group size
    return min(cap, cpg & -cpg)


def _plan(batch: int, Dm: int, L: int, G: int, backward: bool = False, device: Optional[torch.device] = None,
          train: bool = False):
    """Block of channels, chunk length and chunk count. The chunking depends on the forward block only (and
    ``train``), so the backward reads the forward's chunk states whatever its own block is. A long sequence is cut
    into as many chunks as keep the forward's grid within ``_chunk_target`` programs, or with ``train`` (a backward
    will share the chunking) the backward walks' grid within ``_walk_chunk_target``."""
    cpg = Dm // G
    block_f = _block_d(Dm, G, CONFIG["BLOCK_D"])
    block_b = _block_d(Dm, G, CONFIG["BLOCK_D_BWD"])
    if CHUNK_OVERRIDE is not None:
        T = CHUNK_OVERRIDE
    else:
        units = batch * cdiv(Dm, block_f)
        dev = device or torch.device("cpu")
        walk_target = _walk_chunk_target(dev) if train else None
        if units >= CONFIG["SINGLE_CHUNK_UNITS"] or units == 0:
            want = 1
        elif walk_target:
            want = max(1, walk_target // (batch * cdiv(Dm, block_b)))
        else:
            want = max(1, _chunk_target(dev) // units)
        T = max(CONFIG["MIN_CHUNK"], cdiv(L, want))
        T = cdiv(T, 16) * 16
    T = max(1, min(T, L))
    nc = cdiv(L, T)
    block_d = block_b if backward else block_f
    return block_d, cdiv(Dm, block_d), T, nc, cpg


def _walk_chunk_target(device: torch.device) -> Optional[int]:
    """How many programs a chunked backward walk's grid may have where the chunking is planned for training:
    ``TRAIN_WALK_WAVES`` waves of resident walk programs at ``MAXNREG_REV`` registers (3,168 one-warp programs at
    168 registers on 132 SMs: vim_tiny at 1248 px bs 8 gets 32 chunks of 192 tokens where the forward's plan gives
    22 of 288). Two waves at 168 registers are two at 128 as well, so the walks keep 168 (``_walk_maxnreg``); the
    one-wave grids at 128 registers that the forward's plan gave these shapes were the slow ones (session 23,
    docs/kernels.md v31). Off CUDA, as on 132 SMs."""
    waves = CONFIG["TRAIN_WALK_WAVES"]
    if not waves:
        return None
    return waves * programs_per_sm(CONFIG["MAXNREG_REV"] or 255, CONFIG["NUM_WARPS_BWD"]) * _planning_sms(device)


def _planning_sms(device: torch.device) -> int:
    """The SMs a chunk plan is made for: the device's, or off CUDA an H100's / H200's 132, so that the interpreter
    plans as those GPUs do."""
    return sm_count(device) if device.type == "cuda" else 132


def _chunk_target(device: torch.device) -> int:
    """How many programs a chunked forward's grid may have: ``TARGET_PROGRAMS`` when it is a number; "wave": one
    wave of resident forward programs at the forward's wave cap (4,224 one-warp programs at 64 registers on 132
    SMs). Off CUDA, as on a 132-SM GPU, so the interpreter plans as an H100 / H200 does. The forward's time
    follows waves x chunk length: 768 (batch row, channel block) units (vim_tiny bs 32, vim_small bs 16, vim_base
    bs 8) used to get 6 chunks, 4,608 programs, two waves at 68 registers; now 5, 3,840, one wave under the
    wave cap. Session 19, H200: inference -20.6% (vim_base 1248 px bs 8), -22.5% (vim_tiny 1024 px bs 32),
    -17.5% (vim_small 512 px bs 16); training -3.1%, -2.4%, -6.0%."""
    target = CONFIG["TARGET_PROGRAMS"]
    if target != "wave":
        return target
    return programs_per_sm(CONFIG["MAXNREG_FWD_WAVE"] or _FWD_REGS, CONFIG["NUM_WARPS"]) * _planning_sms(device)


def _bc_strides(M: torch.Tensor):
    """(b, g, n, l) strides of B or C given as (B, N, L) or (B, G, N, L)."""
    if M.dim() == 3:
        return M.stride(0), 0, M.stride(1), M.stride(2)
    return M.stride(0), M.stride(1), M.stride(2), M.stride(3)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, L), got shape {tuple(u.shape)}")
    batch, Dm, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if A.dim() != 2 or A.shape[0] != Dm:
        raise ValueError(f"A must be (channels={Dm}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() not in (3, 4) or M.shape[0] != batch or M.shape[-2] != N or M.shape[-1] != L:
            raise ValueError(f"{name} must be (batch, N, L) or (batch, groups, N, L) = ({batch}, [G,] {N}, {L}); "
                             f"got {tuple(M.shape)}")
        if M.dim() == 4 and Dm % M.shape[1]:
            raise ValueError(f"{Dm} channels cannot be split into {M.shape[1]} groups of {name}")
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError("B and C must have the same number of groups")
    if B.dim() != C.dim():
        raise ValueError("B and C must both be 3-D (variable) or both 4-D (grouped)")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (Dm,):
            raise ValueError(f"{name} must be ({Dm},), got {tuple(v.shape)}")


def channel_major(A: torch.Tensor) -> torch.Tensor:
    """A (D, N) stored channel-contiguous, the layout the kernels want it in (see ``_program_setup``)."""
    return A if A.stride(0) == 1 else A.t().contiguous().t()


def _bc_rows(M: torch.Tensor) -> torch.Tensor:
    """B or C as float32 with each token's states contiguous (a view of (B, [G,] L, N) storage), the layout
    the kernels read as whole vectors; a copy unless it is one already (B and C are N / channels the size
    of u, so the copy is small next to the scan)."""
    if M.dtype == torch.float32 and M.stride(-2) == 1:
        return M
    rows = torch.empty((*M.shape[:-2], M.shape[-1], M.shape[-2]), dtype=torch.float32, device=M.device)
    rows.copy_(M.transpose(-1, -2))
    return rows.transpose(-1, -2)


def _interpreted() -> bool:
    """Whether Triton runs these kernels in its interpreter (``TRITON_INTERPRET=1``, the CPU tests). Asked of a
    kernel, not of the environment: Triton chooses when a kernel is defined, so setting the variable after this
    module's import (a tool imported into a running process) changes nothing here."""
    return not isinstance(_zero_kernel.jit_fn, triton.runtime.JITFunction)


if _interpreted():
    interpreter_compat.install()


def _use_asm(t: torch.Tensor) -> bool:
    """Inline PTX runs on the GPU only; the interpreter takes the plain Triton paths (the tests can emulate the PTX
    there instead: ``tests/ptx_emulation.py``)."""
    return t.is_cuda and not _interpreted()


def _row_asm_ok(B: torch.Tensor, C: torch.Tensor, N: int, split: int, asm: bool) -> bool:
    """Whether each thread can load its own part of the B / C rows with 16-byte vector loads."""
    ns = N // split
    if not asm or split == 1 or next_pow2(N) != N or ns not in (4, 8):
        return False
    for M in (B, C):
        strides = _bc_strides(M)
        if M.dtype != torch.float32 or strides[2] != 1 or M.data_ptr() % 16:
            return False
        if any(st % 4 for st in (strides[0], strides[1], strides[3])):
            return False
    return True


def _softplus_mode(delta_softplus, delta_activated: bool) -> int:
    """The kernels' SOFTPLUS switch (``_load_step``)."""
    if delta_activated:
        if not delta_softplus:
            raise ValueError("delta_activated=True means delta = softplus(raw + delta_bias) was applied already; "
                             "it needs delta_softplus=True")
        return 2
    return int(bool(delta_softplus))


def _flags(u, B, C, N, block_d, split, unroll, num_warps, z, delta_bias, softplus: int, reverse, prefetch):
    """Compile-time switches shared by the forward and backward launches."""
    BLOCK_N = next_pow2(N)
    asm = _use_asm(u)
    prefetch = int(prefetch) if asm else 0   # inline PTX: GPU only
    return dict(BLOCK_D=block_d, BLOCK_N=BLOCK_N, UNROLL=unroll, SPLIT=split,
                EVEN_D=u.shape[1] % block_d == 0, EVEN_N=N == BLOCK_N, ROW_ASM=_row_asm_ok(B, C, N, split, asm),
                ASM=asm, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus,
                REVERSE=bool(reverse), PREFETCH=prefetch, BC_PAIR=bool(CONFIG["BC_PAIR"]) and _bc_pair(B, C, N),
                num_warps=num_warps)


def _bc_pair(B: torch.Tensor, C: torch.Tensor, N: int) -> bool:
    """Whether each token's C states follow its B states in one float32 row (the mixer's rows: one (B, L, 2N) copy,
    ``_scan_rows``), N a power of two: the kernels then address C from B's row (``_bc_bases``)."""
    if B.dtype != torch.float32 or C.dtype != torch.float32 or N != next_pow2(N) or B.shape != C.shape:
        return False
    if _bc_strides(B) != _bc_strides(C) or _bc_strides(B)[2] != 1:
        return False
    return C.data_ptr() == B.data_ptr() + 4 * N


def _common_args(u, delta, A, B, C, z):
    sBb, sBg, sBn, sBl = _bc_strides(B)
    sCb, sCg, sCn, sCl = _bc_strides(C)
    zz = z if z is not None else u
    return [*u.stride(), *delta.stride(), *A.stride(), sBb, sBg, sBn, sBl, sCb, sCg, sCn, sCl, *zz.stride()]


def _forward_prefetch(T: int, nc: int, wide: bool = False) -> int:
    """The forward's prefetch distance in groups: ``PREFETCH`` for one chunk, ``PREFETCH_WIDE`` in the wide layout
    (None: ``PREFETCH``); a chunked forward (long L, two passes) ``PREFETCH_CHUNKED``, and none for chunks shorter
    than ``PREFETCH_CHUNKED_MIN_T`` tokens (docs/kernels.md, v28). ``_flags`` turns it off where the inline PTX does
    not run."""
    if nc == 1:
        if wide and CONFIG["PREFETCH_WIDE"] is not None:
            return CONFIG["PREFETCH_WIDE"]
        return CONFIG["PREFETCH"]
    return CONFIG["PREFETCH_CHUNKED"] if T >= CONFIG["PREFETCH_CHUNKED_MIN_T"] else 0


def _lookahead(knob, accumulate: bool, nc: int) -> bool:
    """Whether a forward launch loads a group ahead, from ``CONFIG["LOOKAHEAD"]`` (0, 1 or "accumulate")."""
    if knob == "accumulate":
        return bool(accumulate) and nc == 1
    if knob in (0, 1, False, True):
        return bool(knob)
    raise ValueError(f'CONFIG["LOOKAHEAD"] must be 0, 1 or "accumulate", got {knob!r}')


# Launch plans by call signature: what scan_forward and scan_backward work out on the host from their inputs'
# shapes, strides, dtypes, 16-byte alignment, flags, device and the knobs (grids, chunking, compile-time switches,
# register caps, integer arguments), worked out once per signature. A vim_tiny scan call cost the host 134-251 us, of which its one
# launch ~51 us, and the eager model waits for its host below batch ~256 (docs/benchmarks.md, sessions 37-38). A plan
# depends on nothing else: the key holds every input it reads, ``_settings()`` the module's knobs and its planning
# functions (which tests replace). PLAN_CACHE = False plans every call.
PLAN_CACHE = True
MAX_PLANS = 256
_PLANS: dict = {}


def clear_plans() -> None:
    """Forget the cached launch plans (changed knobs and replaced planning functions need not call it)."""
    _PLANS.clear()


# The module's functions a plan is made with, by name: replacing one (tests monkeypatch them, tools/kernel_sass.py
# rebinds the rules to another GPU) makes new plans.
_PLANNERS = ("_plan", "_block_d", "_walk_chunk_target", "_planning_sms", "_chunk_target", "programs_per_sm",
             "sm_count", "_forward_wave_cap", "_lower_cap_pays", "_waves", "_resident_programs", "_forward_wide",
             "_walk_maxnreg", "_forward_walk_maxnreg", "_reverse_walk_maxnreg", "_flags", "_use_asm", "_interpreted",
             "_row_asm_ok", "_bc_pair", "_bc_strides", "_softplus_mode", "_forward_prefetch", "_lookahead",
             "_forward_bc_pair", "_common_args", "_bc_parts", "_bc_quads", "_lane_offsets_fit", "_forward_plan",
             "_backward_layout", "_backward_plan")


def _settings() -> tuple:
    """The module-level knobs and planning functions a plan depends on."""
    return tuple(CONFIG.items()), CHUNK_OVERRIDE, _FWD_REGS, *map(globals().get, _PLANNERS)


def _tensor_key(t):
    """What a plan may read of a tensor (None stays None)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16)


def _rows_paired(B, C, A) -> bool:
    """What a plan reads of B's and C's addresses beyond their alignment: whether C's states follow B's in one row
    (``_bc_pair``)."""
    return C.data_ptr() == B.data_ptr() + 4 * A.shape[1]


def _cached_plan(key: tuple, make):
    """The plan of ``key``, made by ``make()`` the first time."""
    plan = _PLANS.get(key) if PLAN_CACHE else None
    return plan if plan is not None else _remember(key, make())


def _remember(key: tuple, plan):
    """``plan``, kept for ``key`` (with ``PLAN_CACHE``; past ``MAX_PLANS`` plans the cache starts over)."""
    if PLAN_CACHE:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


class _ForwardPlan(NamedTuple):
    grid: tuple
    nc: int
    N: int
    use_bias: bool       # whether the kernel gets delta_bias (not when delta comes activated)
    scalars: tuple       # the integer and float arguments after the pointers
    state_meta: dict     # the chunk-state pass's keywords (nc > 1)
    main_meta: dict      # the main pass's keywords


def _forward_plan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out, out_scale, accumulate, want_last,
                  delta_activated, train_plan) -> _ForwardPlan:
    batch, Dm, L = u.shape
    N = A.shape[1]
    G = 1 if B.dim() == 3 else B.shape[1]
    block_d, n_d, T, nc, cpg = _plan(batch, Dm, L, G, device=u.device, train=train_plan)
    dev = u.device
    BLOCK_N = next_pow2(N)
    split, num_warps = min(CONFIG["SPLIT"], BLOCK_N), CONFIG["NUM_WARPS"]
    softplus = _softplus_mode(delta_softplus, delta_activated)
    if softplus == 2:   # nothing left to apply to delta
        delta_bias, softplus = None, 0
    wave_cap = _forward_wave_cap(n_d * nc * batch, num_warps, dev)
    wide_d = CONFIG["WIDE_BLOCK_D"]
    wide = (nc == 1 and softplus == 0 and u.dtype in (torch.bfloat16, torch.float16) and bool(wide_d)
            and _block_d(Dm, G, wide_d) == wide_d
            and _forward_wide(batch * n_d, wave_cap, batch * cdiv(Dm, wide_d), dev))
    if wide:
        block_d, n_d, split, num_warps = wide_d, cdiv(Dm, wide_d), 1, wide_d // 32
        wave_cap = CONFIG["WIDE_MAXNREG"]
    flags = _flags(u, B, C, N, block_d, split, CONFIG["UNROLL"], num_warps, z, delta_bias,
                   softplus, reverse, _forward_prefetch(T, nc, wide))
    flags["HAS_D"] = D is not None
    flags["LOOKAHEAD"] = _lookahead(CONFIG["LOOKAHEAD"], accumulate, nc) and not wave_cap
    flags["BC_PAIR"] = flags["BC_PAIR"] and _forward_bc_pair(wide, nc, flags["LOOKAHEAD"])
    # a fresh output is (B, L, D) storage viewed as (B, D, L)
    out_strides = out.stride() if out is not None else (L * Dm, 1, Dm)
    scalars = (Dm, L, N, T, nc, cpg, out_scale, *_common_args(u, delta, A, B, C, z), *out_strides)
    state_meta = dict(STATE_PASS=True, ACCUM=False, STORE_LAST=False, **flags,
                      **({"maxnreg": wave_cap} if wave_cap and CONFIG["WAVE_CAP_STATE_PASS"] else {}))
    main_meta = dict(STATE_PASS=False, ACCUM=bool(accumulate), STORE_LAST=want_last, **flags,
                     **({"maxnreg": wave_cap} if wave_cap else {}))
    return _ForwardPlan((n_d, nc, batch), nc, N, delta_bias is not None, scalars, state_meta, main_meta)


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, *, out=None,
                 out_scale=1.0, accumulate=False, want_last=False, delta_activated=False, train_plan=False):
    """Launch the forward. Returns (out, last_state or None, hloc, S). ``out`` may be given
    (any strides, e.g. a token-major view). Per token and channel out = out_scale * (y + prior) * silu(z),
    y = C h + D u; with ``accumulate``, prior is what ``out`` holds on entry (else 0). The bidirectional
    mixer writes one direction's ungated y and gates the two directions' sum once, in the second launch.
    ``delta_activated``: delta is softplus(raw + delta_bias) already (see ``scan_backward``), used as given.
    ``train_plan``: a backward will follow (``scan_backward`` with the same flag): chunk as suits the backward."""
    A = channel_major(A)
    B, C = _bc_rows(B), _bc_rows(C)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, out, out_scale, accumulate, want_last,
            delta_activated, train_plan)
    key = ("forward", u.device, _settings(), _rows_paired(B, C, A), *map(_tensor_key, args[:8]),
           _tensor_key(out), *args[8:10], *args[11:])
    plan = _cached_plan(key, lambda: _forward_plan(*args))
    batch, Dm, L = u.shape
    dev = u.device
    if out is None:
        out = _empty((batch, L, Dm), u.dtype, dev).transpose(1, 2)
    nc, N = plan.nc, plan.N
    hloc = S = None
    if nc > 1:
        hloc = _empty((batch, nc, N, Dm), torch.float32, dev)
        S = _empty((batch, nc, Dm), torch.float32, dev)
    last = None
    if want_last:   # an empty sequence has no chunk to store it: the initial state, zero
        last = torch.zeros((batch, Dm, N), dtype=torch.float32, device=dev) if nc == 0 else \
            _empty((batch, Dm, N), torch.float32, dev)
    dummy = u
    inputs = (u, delta, A, B, C, D if D is not None else dummy, z if z is not None else u,
              delta_bias if plan.use_bias else dummy, out)
    if nc > 1:
        _fwd_kernel[plan.grid](*inputs, hloc, S, dummy, *plan.scalars, **plan.state_meta)
    _fwd_kernel[plan.grid](*inputs, hloc if hloc is not None else dummy, S if S is not None else dummy,
                           last if last is not None else dummy, *plan.scalars, **plan.main_meta)
    return out, last, hloc, S


def _forward_bc_pair(wide: bool, nc: int, lookahead: bool) -> bool:
    """Whether a forward launch on paired B / C rows addresses C from B's row (``BC_PAIR``): the wide and the
    chunked forwards do, and the split one-chunk forward's launches without ``LOOKAHEAD`` (``BC_PAIR_SPLIT =
    "first"``; True: every launch, False: none). With the look-ahead and the pair, ptxas issues the accumulating
    launch's C loads next to their use (docs/kernels.md, v40). Against C on its own address, H200: the wide forward
    (32-channel programs; vim_tiny / vim_small / vim_base inference at 224 px bs 256) -1.1 / -0.8 / -0.4%, the
    chunked one (vim_tiny inference at 1248 px bs 8) -0.9% (session 30); the split one's launches without the
    look-ahead (vim_tiny inference at 224 px bs 64 / 128 / 160) -6.3 / -1.4 / -3.6%, and with the look-ahead too
    (bs 128) +3.4% (session 31)."""
    split = CONFIG["BC_PAIR_SPLIT"]
    if split != "first":
        if split not in (False, True):   # 0 and 1 as well, as --variant / --set give them
            raise ValueError(f'CONFIG["BC_PAIR_SPLIT"] must be False, True or "first", got {split!r}')
        split = bool(split)
    return wide or nc > 1 or split is True or (split == "first" and not lookahead)


def _resident_programs(regs: int, num_warps: int, device: torch.device) -> int:
    """Programs of num_warps warps that fit on the device at once with regs registers per thread."""
    return programs_per_sm(regs, num_warps) * sm_count(device)


def _waves(programs: int, regs: int, num_warps: int, device: torch.device) -> int:
    """Waves of resident programs the grid runs in at regs registers per thread."""
    return cdiv(programs, _resident_programs(regs, num_warps, device))


def _reverse_walk_maxnreg(programs: int, num_warps: int, device: torch.device) -> dict:
    """The reverse walk's register cap: ``MAXNREG_REV``, or ``MAXNREG_REV_WAVE`` when the grid then runs in fewer
    waves of resident programs, at most ``MAXNREG_WALK_WAVES`` (a chunked sequence whose grid just misses one wave at
    168 registers). Measured in session 12 (docs/kernels.md, v17); the wave limit in session 21 (v29)."""
    return _walk_maxnreg(CONFIG["MAXNREG_REV"], CONFIG["MAXNREG_REV_WAVE"], programs, num_warps, device)


def _forward_walk_maxnreg(programs: int, num_warps: int, device: torch.device) -> dict:
    """The forward walk's register cap, by the reverse walk's rule: ``MAXNREG_FWD_WALK``, or
    ``MAXNREG_FWD_WALK_WAVE`` where that runs the grid in fewer waves, at most ``MAXNREG_WALK_WAVES``."""
    return _walk_maxnreg(CONFIG["MAXNREG_FWD_WALK"], CONFIG["MAXNREG_FWD_WALK_WAVE"], programs, num_warps, device)


def _lower_cap_pays(programs: int, low, high: int, limit, num_warps: int, device: torch.device) -> bool:
    """The wave rule of the register caps: ``low`` registers per thread run the grid in fewer waves of resident
    programs than ``high``, and in at most ``limit`` (None: any number). CUDA only; a falsy ``low`` never pays."""
    if not low or device.type != "cuda" or programs <= 0:
        return False
    waves = _waves(programs, low, num_warps, device)
    return waves < _waves(programs, high, num_warps, device) and (limit is None or waves <= limit)


def _walk_maxnreg(cap, low, programs: int, num_warps: int, device: torch.device) -> dict:
    if not cap:
        return {}
    pays = _lower_cap_pays(programs, low, cap, CONFIG["MAXNREG_WALK_WAVES"], num_warps, device)
    return {"maxnreg": low if pays else cap}


def _forward_wide(split_programs: int, split_cap: Optional[int], wide_programs: int, device: torch.device) -> bool:
    """Whether a one-chunk forward runs in the wide layout (``CONFIG["WIDE_*"]``): where its wide grid, at
    ``WIDE_MAXNREG`` registers, runs in fewer waves of resident programs than the split layout's grid does at its
    own registers (``split_cap``, what ``_forward_wave_cap`` gave it, else the compiler's). On 132 SMs: 792 wide
    programs of 128 channels and 4 warps per wave (3,300 of 32 channels and one warp) against 3,696 split ones
    (4,224 under the wave cap) of 16 channels; at 224 px vim_tiny takes it at bs 177-264 and from 309, vim_small
    at 89-132 and from 155, vim_base at 45-66 and from 78 (with 32-channel programs: to 275, 137, 68; in between
    both layouts need the same number of waves). A wide program walks its tokens longer than a split
    one, so at equal waves the split layout is faster (session 22: vim_tiny bs 128 +17% wide); with fewer waves its
    fewer instructions win. CUDA only."""
    wide_d = CONFIG["WIDE_BLOCK_D"]
    if not wide_d or device.type != "cuda" or wide_programs <= 0:
        return False
    return (_waves(wide_programs, CONFIG["WIDE_MAXNREG"], wide_d // 32, device)
            < _waves(split_programs, split_cap or _FWD_REGS, CONFIG["NUM_WARPS"], device))


# What ptxas gives the forward's plain loop uncapped: 68 registers under triton 3.6, 64 under 3.8, 72 with
# LOOKAHEAD (tools/kernel_sass.py). 68 and 72 leave the same 28 one-warp programs per SM; the rule assumes them.
_FWD_REGS = 72


def _forward_wave_cap(programs: int, num_warps: int, device: torch.device) -> Optional[int]:
    """The forward main pass's register cap, ``MAXNREG_FWD_WAVE``, where the grid then runs in fewer waves of
    resident programs, at most ``MAXNREG_FWD_WAVES`` (3,697-4,224 one-warp programs on 132 SMs: one wave at 64
    registers, two at 72; vim_tiny at bs 160-176, vim_small at 80-88, vim_base at 40-44, L = 6085 at bs 8), else
    None. Where it applies the launch goes without LOOKAHEAD, which spills under 64. Measured in session 18
    (docs/kernels.md, v26)."""
    low = CONFIG["MAXNREG_FWD_WAVE"]
    return low if _lower_cap_pays(programs, low, _FWD_REGS, CONFIG["MAXNREG_FWD_WAVES"], num_warps, device) else None


def _check_acc(acc, shape, name):
    if acc is not None and (tuple(acc.shape) != shape or acc.dtype != torch.float32):
        raise ValueError(f"{name} must be float32 {shape}, got {acc.dtype} {tuple(acc.shape)}")


class _BackwardPlan(NamedTuple):
    layout: tuple        # _plan's block_d, n_d, T, nc, cpg
    grid: tuple
    adjoint: tuple       # per kernel: (the integer and float arguments after the pointers, its keywords)
    forward_walk: tuple
    reverse_walk: tuple


def _backward_layout(u, A, B, hloc, S, dB_acc, dC_acc, delta_softplus, delta_activated, train_plan) -> tuple:
    """The backward's blocks and chunks (``_plan``), checked against the forward's chunk summaries and the given
    accumulators (and the softplus flags checked first)."""
    _softplus_mode(delta_softplus, delta_activated)
    batch, Dm, L = u.shape
    N = A.shape[1]
    G = 1 if B.dim() == 3 else B.shape[1]
    layout = _plan(batch, Dm, L, G, backward=True, device=u.device, train=train_plan)
    nc = layout[3]
    got = 1 if hloc is None else hloc.shape[1]
    if got != max(nc, 1) or (nc > 1 and (S is None or S.shape[1] != nc)):   # an empty sequence: no chunk
        raise ValueError(f"the forward's chunk summaries hold {got} chunks where this backward plans {nc}: give "
                         "scan_backward the train_plan its scan_forward had (and that forward's hloc and S)")
    _check_acc(dB_acc, (batch, G, N, L), "dB_acc")
    _check_acc(dC_acc, (batch, G, N, L), "dC_acc")
    return layout


def _backward_plan(layout, split, dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                   delta_activated, dout_scale, grad_A_log, dz, dz_accumulate, dzz, dB, dC, F, du,
                   ddelta) -> _BackwardPlan:
    """The launches, given the buffers they write (whose layouts the plan's key determines)."""
    batch, Dm, L = u.shape
    N = A.shape[1]
    block_d, n_d, T, nc, cpg = layout
    dev = u.device
    flags = _flags(u, B, C, N, block_d, split, CONFIG["UNROLL_BWD"], CONFIG["NUM_WARPS_BWD"], z, delta_bias,
                   _softplus_mode(delta_softplus, delta_activated), reverse, CONFIG["PREFETCH_BWD"])
    flags["DY_SCALE"] = float(dout_scale)
    scatter = CONFIG["BC_SCATTER"] and next_pow2(N) // split <= block_d
    scalars = (Dm, L, N, T, nc, cpg, *_common_args(u, delta, A, B, C, z), *dout.stride())
    parts_dC, parts_dB = (1, 1) if scatter else (_bc_parts(block_d, dC), _bc_parts(block_d, dB))
    quads_dC, quads_dB = (not scatter and _bc_quads(block_d, split, N, parts, grad, flags["num_warps"])
                          for parts, grad in ((parts_dC, dC), (parts_dB, dB)))
    zz = z if z is not None else u
    lanes = bool(CONFIG["LANE_OFFSETS"]) and _lane_offsets_fit(
        (u, 1, 2), (delta, 1, 2), (zz, 1, 2), (dout, 1, 2), (dzz, 1, 2), (F, 2, 1), (dB, 2, 3), (dC, 2, 3))
    programs = n_d * nc * batch
    walks = dict(HAS_D=D is not None, SHARED=bool(CONFIG["SHARED_PRODUCTS"]), LANE_OFFSETS=lanes,
                 LOOKAHEAD=bool(CONFIG["LOOKAHEAD_BWD"]), **flags)
    forward_walk = ((*scalars, *dzz.stride(), *dC.stride()),
                    dict(DZ_ACCUM=dz is not None and bool(dz_accumulate), SCATTER=scatter, BC_PARTS=parts_dC,
                         QUADS=quads_dC, **walks, **_forward_walk_maxnreg(programs, flags["num_warps"], dev)))
    reverse_walk = ((*scalars, *du.stride(), *ddelta.stride(), *dB.stride()),
                    dict(SCATTER=scatter, BC_PARTS=parts_dB, DA_LOG=bool(grad_A_log), QUADS=quads_dB, **walks,
                         **_reverse_walk_maxnreg(programs, flags["num_warps"], dev)))
    return _BackwardPlan(layout, (n_d, nc, batch), (scalars, flags), forward_walk, reverse_walk)


def scan_backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hloc, S,
                  dz_out=None, dz_accumulate=False, delta_activated=False, ddelta_dtype=None, dout_scale=1.0,
                  dB_acc=None, dC_acc=None, grad_A_log=False, train_plan=False):
    """All gradients. ``dout`` is the gradient of the (scaled) output, taken times ``dout_scale`` as it is loaded
    (the mixer's directions each carry half of its output: 0.5, exact, with no pass over dout). Returns
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias (None where the input is None). ``dz_out``: where dz is
    written (any strides); with ``dz_accumulate`` it is added to what is there.

    ``delta_activated`` (with ``delta_softplus``): delta is softplus(raw + delta_bias) already, computed by the
    caller (the mixer's dt_proj kernel); ddelta and ddelta_bias are still the gradients of raw and of the bias,
    through softplus's slope recovered from delta. ddelta is written in ``ddelta_dtype`` (default delta's).

    ``dB_acc`` / ``dC_acc``: float32 (batch, G, N, L) tensors, any strides (the mixer passes views of one token-major
    buffer, the layout its x_proj gradient wants), that the B / C gradients are added into instead of fresh zeroed
    buffers; returned as dB / dC (reshaped to B's and C's shapes). ``grad_A_log``: the third gradient is that of
    A_log where A = -exp(A_log), i.e. dA * A, each program's part multiplied before the atomic sum (no pass of
    its own).

    ``hloc`` / ``S``: the forward's chunk summaries, None for one chunk; ``train_plan`` as the forward had it, so
    that both plan the same chunks."""
    batch, Dm, L = u.shape
    N = A.shape[1]
    G = 1 if B.dim() == 3 else B.shape[1]
    A = channel_major(A)
    B_in, C_in = B, C
    B, C = _bc_rows(B), _bc_rows(C)
    dev = u.device
    f32 = torch.float32
    dummy = u
    key = ("backward", dev, _settings(), _rows_paired(B, C, A),
           *map(_tensor_key, (dout, u, delta, A, B, C, D, z, delta_bias, hloc, S, dz_out, dB_acc, dC_acc)),
           bool(delta_softplus), bool(reverse), bool(dz_accumulate), bool(delta_activated), ddelta_dtype,
           float(dout_scale), bool(grad_A_log), bool(train_plan))
    plan = _PLANS.get(key) if PLAN_CACHE else None
    layout = plan.layout if plan is not None else _backward_layout(u, A, B, hloc, S, dB_acc, dC_acc, delta_softplus,
                                                                           delta_activated, train_plan)
    nc = layout[3]
    split = min(CONFIG["SPLIT_BWD"], next_pow2(N))
    zz = z if z is not None else u
    bias = delta_bias if delta_bias is not None else dummy
    Dp = D if D is not None else dummy
    # token-major gradients: the layout the inputs come in from the model
    dz = None
    if z is not None:
        dz = dz_out if dz_out is not None else _empty((batch, L, Dm), z.dtype, dev).transpose(1, 2)
    # the atomic sums' buffers, zeroed by one launch: dD, dA, dbias and the dB / dC the caller did not give, those
    # token-major (viewed as (B, G, N, L)) as the mixer's are, the layout where partial sums pay (``_bc_parts``)
    own = [(batch, G, L, N)] * ((dB_acc is None) + (dC_acc is None))
    dD, dA, dbias, *fresh = _zeros([(Dm,), (Dm, N), (Dm,), *own], dev)
    dB = dB_acc if dB_acc is not None else fresh.pop(0).transpose(2, 3)
    dC = dC_acc if dC_acc is not None else fresh.pop(0).transpose(2, 3)
    F = _empty((batch, L, Dm), f32, dev)
    tx = _empty((batch, nc, 2, split, Dm), f32, dev)   # per-row chunk scalars (``_row_offsets``)
    qx = _empty((batch, nc, N, Dm), f32, dev)
    dzz = dz if dz is not None else F
    du = _empty((batch, L, Dm), u.dtype, dev).transpose(1, 2)
    ddelta = _empty((batch, L, Dm), ddelta_dtype or delta.dtype, dev).transpose(1, 2)
    if plan is None:   # made once the buffers it reads the layouts of exist
        plan = _remember(key, _backward_plan(layout, split, dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                             reverse, delta_activated, dout_scale, grad_A_log, dz, dz_accumulate, dzz,
                                             dB, dC, F, du, ddelta))
    grid = plan.grid
    if nc > 1:
        gout = _empty((batch, nc, N, Dm), f32, dev)
        scalars, meta = plan.adjoint
        _bwd_adjoint_state_kernel[grid](u, delta, A, B, C, zz, bias, dout, gout, *scalars, **meta)
    else:
        gout = hloc = S = dummy
    scalars, meta = plan.forward_walk
    _bwd_forward_walk_kernel[grid](u, delta, A, B, C, Dp, zz, bias, dout, hloc, S, dzz, dC, dD, F, tx, qx, *scalars,
                                   **meta)
    scalars, meta = plan.reverse_walk
    _bwd_reverse_walk_kernel[grid](u, delta, A, B, C, Dp, zz, bias, dout, F, hloc, S, gout, tx, qx,
                                   du, ddelta, dB, dA, dbias, *scalars, **meta)
    dB = _bc_grad_out(dB, B_in, own=dB_acc is None)
    dC = _bc_grad_out(dC, C_in, own=dC_acc is None)
    return (du, ddelta, dA.to(A.dtype), dB, dC, dD.to(D.dtype) if D is not None else None, dz,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None)
