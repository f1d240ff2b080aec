"""Triton kernels for cross-entropy over the rows of (N, V) logits.

Every kernel runs a persistent grid: program ``p`` handles rows ``p, p + P, p + 2P, ...``
(P programs), so the grid size, not N, sets how many rows are in flight at once. That
matters for the forward kernel that also writes the gradient: it reads each row twice
(max/sum, then gradient), and the second read stays on the chip only as far as the SM's
L1 (about 248 KB beside the kernel's shared memory on an H200) still holds the row: 86%
of a bf16 row at V = 128256, 45% at 262144. L2 serves next to none of it: between the
two reads the whole grid reads and writes more than L2 holds (ncu counters on an H200,
bench/NOTES-ce.md v34).

Logits are transformed in the kernel: ``x = logit_scale * z`` then
``x = softcap * tanh(x / softcap)``; the gradient is taken with respect to ``z``.
All arithmetic is float32; the softmax runs in base 2 (one exp2 per element).

Loads and stores go 16 bytes at a time only where Triton can prove the addresses
16-byte aligned: from row strides that are multiples of 16 elements. Other rows (V =
50257, 32001, 73448, ...) are realigned (ALIGN_ROWS, see :func:`_row_span`); without
that, every element is its own 2-byte access, and the gradient-writing kernel spills.

A target equal to ``ignore_index`` gives loss 0 and gradient 0. A target outside [0, V)
that is not ``ignore_index`` gives a NaN loss and reads nothing outside its row;
``check_targets_kernel`` finds such targets first so that the host can raise.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _transform(z, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr):
    """Model logits ``z`` (float32) -> the logits the loss sees."""
    x = z
    if HAS_LOGIT_SCALE:
        x = x * logit_scale
    if HAS_SOFTCAP:
        # tanh(y) = 1 - 2 / (exp(2y) + 1): saturates to +-1 (exp2 -> inf or 0) with no NaN.
        y = x / softcap
        x = softcap * (1.0 - 2.0 / (tl.exp2(y * (2.0 * LOG2E)) + 1.0))
    return x


@triton.jit
def _chain(g, x, softcap, logit_scale, HAS_SOFTCAP: tl.constexpr, HAS_LOGIT_SCALE: tl.constexpr):
    """d loss / d x  ->  d loss / d z, given the transformed logits ``x``."""
    if HAS_SOFTCAP:
        t = x / softcap
        g = g * (1.0 - t * t)
    if HAS_LOGIT_SCALE:
        g = g * logit_scale
    return g


@triton.jit
def _row_span(row, N_COLS: tl.constexpr, ALIGN_ROWS: tl.constexpr):
    """Where the blocks of a row start (``row`` points at its first column), and what
    bounds their loads and stores, in columns from that start:
    (start, lead, read_end, store_start, store_end).

    Without ALIGN_ROWS, the row itself: (row, 0, N_COLS, 0, N_COLS).

    With ALIGN_ROWS (contiguous columns; rows that Triton cannot prove 16-byte aligned),
    blocks start at the 128-byte line at or before the row, ``lead`` columns early, so that
    every load and store is a whole 16-byte vector and a warp's accesses cover whole lines
    (16-byte alignment alone measured 2-10% slower; bench/NOTES-ce.md, v28). The row is then
    columns [lead, lead + N_COLS). Loads read only the 16-byte chunks that hold some of the
    row, up to ``read_end`` (and from the chunk of ``lead``: _readable): a chunk never
    crosses a page, so the part of it outside the row cannot fault, and those values are
    masked after the load (_in_row). Block stores cover the whole chunks in the row,
    [store_start, store_end); the partial chunks at the row's two ends are stored element
    by element (_edge_chunks), so that no neighbour is overwritten.
    """
    if ALIGN_ROWS:
        ELEMENT_BYTES: tl.constexpr = row.dtype.element_ty.primitive_bitwidth // 8
        CHUNK: tl.constexpr = 16 // ELEMENT_BYTES
        lead = ((row.to(tl.int64, bitcast=True) & 127) // ELEMENT_BYTES).to(tl.int32)
        start = tl.multiple_of(row - lead, 128)
        read_end = (lead + N_COLS + CHUNK - 1) // CHUNK * CHUNK
        store_start = (lead + CHUNK - 1) // CHUNK * CHUNK
        store_end = (lead + N_COLS) // CHUNK * CHUNK
    else:
        start, lead, read_end, store_start, store_end = row, 0, N_COLS, 0, N_COLS
    return start, lead, read_end, store_start, store_end


@triton.jit
def _assert_blocks_cover_the_lead(ptr, N_COLS: tl.constexpr, ALIGN_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """A realigned row starts up to one 128-byte line early: its first whole block must
    cover that (a row shorter than a block has masked blocks only)."""
    tl.static_assert(
        not ALIGN_ROWS or BLOCK >= N_COLS or BLOCK * ptr.dtype.element_ty.primitive_bitwidth >= 1024,
        "ALIGN_ROWS needs blocks of at least 128 bytes",
    )


@triton.jit
def _aligned_as(row, lead, ALIGN_ROWS: tl.constexpr):
    """The span start of a row that sits ``lead`` columns past a 128-byte line, as the row
    of another tensor does (see _row_span)."""
    if ALIGN_ROWS:
        row = tl.multiple_of(row - lead, 128)
    return row


@triton.jit
def _in_row(pos, lead, N_COLS: tl.constexpr, ALIGN_ROWS: tl.constexpr):
    """Which of the block positions ``pos`` (columns from the row's start, see _row_span)
    hold the row's logits."""
    if ALIGN_ROWS:
        return (pos >= lead) & (pos < lead + N_COLS)
    return pos < N_COLS


@triton.jit
def _readable(pos, lead, read_end, CHUNK: tl.constexpr):
    """Which of the block positions ``pos`` of a realigned row's first block may be loaded:
    the 16-byte chunks from the one of ``lead`` to ``read_end`` (see _row_span)."""
    return (pos >= lead // CHUNK * CHUNK) & (pos < read_end)


@triton.jit
def _stored(pos, store_start, store_end, ALIGN_ROWS: tl.constexpr):
    """Which of the block positions ``pos`` a block's store writes (see _row_span)."""
    if ALIGN_ROWS:
        return (pos >= store_start) & (pos < store_end)
    return pos < store_end


@triton.jit
def _edge_chunks(lead, store_start, store_end, N_COLS: tl.constexpr, CHUNK: tl.constexpr):
    """Positions of the two partial 16-byte chunks at a realigned row's ends (the chunk of
    ``lead``, and the chunk at ``store_end``), and which of them are the row's and are not
    written by block stores."""
    i = tl.arange(0, 2 * CHUNK)
    head = i < CHUNK
    pos = tl.where(head, lead // CHUNK * CHUNK + i, store_end + i - CHUNK)
    in_row = (pos >= lead) & (pos < lead + N_COLS)
    mask = in_row & tl.where(head, pos < store_start, (pos >= store_end) & (pos >= store_start))
    return pos, mask


@triton.jit
def _load_raw(start, stride_col, pos, read_end, MASKED: tl.constexpr, POLICY: tl.constexpr):
    """One block of a row as stored (0 from ``read_end`` on). MASKED only for a block that
    reaches ``read_end``, or for the first block of a realigned row."""
    if MASKED:
        return tl.load(start + pos * stride_col, mask=pos < read_end, other=0.0, eviction_policy=POLICY)
    return tl.load(start + pos * stride_col, eviction_policy=POLICY)


@triton.jit
def _load_first(start, stride_col, cols, lead, read_end, ALIGN_ROWS: tl.constexpr, POLICY: tl.constexpr):
    """A row's first block, masked to the chunks that hold the row where it is realigned."""
    if ALIGN_ROWS:
        CHUNK: tl.constexpr = 16 // (start.dtype.element_ty.primitive_bitwidth // 8)
        mask = _readable(cols, lead, read_end, CHUNK)
        return tl.load(start + cols * stride_col, mask=mask, other=0.0, eviction_policy=POLICY)
    return tl.load(start + cols * stride_col, eviction_policy=POLICY)


@triton.jit
def _prefetch_to_l2(row, first, count, row_end):
    """Have the TMA unit bring columns [first, first + count) of a contiguous row (clipped
    to ``row_end``, cut to whole 16-byte units inside it) into L2: one instruction of one
    thread (Hopper's ``cp.async.bulk.prefetch.L2``), no registers held, no value changed.
    Nothing is fetched where the range is empty."""
    end = tl.minimum(first + count, row_end)
    start_address = ((row + first).to(tl.int64, bitcast=True) + 15) & -16
    end_address = (row + end).to(tl.int64, bitcast=True) & -16
    nbytes = (end_address - start_address).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "setp.gt.and.s32 p, $2, 0, p; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r",
        [start_address, nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _gradient_block(
    z,
    out_ptrs,
    store_mask,
    lse2,
    scale,
    uniform,
    softcap,
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
):
    """``scale * (softmax - uniform)`` chained to d/dz, for one loaded block ``z`` of a row
    (the target column is fixed afterwards), stored where ``store_mask`` (None: all)."""
    x = _transform(z.to(tl.float32), softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE)
    g = _chain(tl.exp2(x * LOG2E - lse2) * scale - uniform, x, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE)
    tl.store(out_ptrs, g.to(out_ptrs.dtype.element_ty), mask=store_mask, cache_modifier=".cs")


@triton.jit
def _first_gradient_block(
    in_start,
    stride_in_col,
    out_start,
    stride_out_col,
    lead,
    read_end,
    store_start,
    store_end,
    cols,
    lse2,
    scale,
    uniform,
    softcap,
    logit_scale,
    z_first,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    PREFETCH: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
):
    """_row_gradient's block 0 where it is done apart: loaded ahead (``z_first``), or
    masked (a realigned row)."""
    if PREFETCH:
        z = z_first
    else:
        z = _load_first(in_start, stride_in_col, cols, lead, read_end, ALIGN_ROWS, "evict_first")
    _gradient_block(
        z, out_start + cols * stride_out_col, _stored(cols, store_start, store_end, ALIGN_ROWS) if ALIGN_ROWS else None,
        lse2, scale, uniform, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE,
    )  # fmt: skip


@triton.jit
def _tail_gradient_blocks(
    in_start,
    stride_in_col,
    out_start,
    stride_out_col,
    read_end,
    store_start,
    store_end,
    cols,
    lse2,
    scale,
    uniform,
    softcap,
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
    TAIL: tl.constexpr,
    END: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """_row_gradient's masked blocks from TAIL to END."""
    for tail_start in tl.static_range(TAIL, END, BLOCK):
        z = _load_raw(in_start, stride_in_col, tail_start + cols, read_end, True, "evict_first")
        _gradient_block(
            z, out_start + (tail_start + cols) * stride_out_col,
            _stored(tail_start + cols, store_start, store_end, ALIGN_ROWS),
            lse2, scale, uniform, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE,
        )  # fmt: skip


@triton.jit
def _row_gradient(
    in_start,
    stride_in_col,
    out_start,
    stride_out_col,
    lead,
    read_end,
    store_start,
    store_end,
    cols,
    N_COLS: tl.constexpr,
    target,
    x_target,
    lse2,
    scale,
    label_smoothing,
    softcap,
    logit_scale,
    z_first,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    REVERSE: tl.constexpr,
    PREFETCH: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Write ``scale * d loss / d z`` for one row, BLOCK columns at a time (the row's span
    from _row_span; ``out_start`` is aligned as ``in_start`` is).

    The blocks write the gradient without the target's ``-(1 - label_smoothing)`` term;
    the target's column is then written once more, from ``x_target`` (the target's
    transformed logit, read before the row was overwritten when the output is the
    input): one store per row instead of a comparison per element. Only the blocks that
    reach ``read_end``, and the first block of a realigned row, are masked. REVERSE walks
    the row from its end: the blocks read last by the max/sum pass are the likeliest to
    still be in L1. PREFETCH: the row's first block is ``z_first``, loaded already.
    """
    full_end: tl.constexpr = N_COLS // BLOCK * BLOCK
    # Block 0 apart where it is loaded ahead or masked; full blocks up to full_end; masked
    # blocks from TAIL up to END, the last read_end of any row (a realigned row's lead is at
    # most a 128-byte line, 8 chunks, less one column).
    FIRST: tl.constexpr = BLOCK if (PREFETCH or ALIGN_ROWS) else 0
    TAIL: tl.constexpr = full_end if full_end > FIRST else FIRST
    CHUNK: tl.constexpr = 16 // (in_start.dtype.element_ty.primitive_bitwidth // 8)
    END: tl.constexpr = (N_COLS + 9 * CHUNK - 2) // CHUNK * CHUNK if ALIGN_ROWS else N_COLS
    uniform = label_smoothing / N_COLS * scale
    if REVERSE:
        _tail_gradient_blocks(
            in_start, stride_in_col, out_start, stride_out_col, read_end, store_start, store_end, cols,
            lse2, scale, uniform, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE, ALIGN_ROWS, TAIL, END, BLOCK,
        )  # fmt: skip
    if FIRST > 0 and not REVERSE:
        _first_gradient_block(
            in_start, stride_in_col, out_start, stride_out_col, lead, read_end, store_start, store_end, cols,
            lse2, scale, uniform, softcap, logit_scale, z_first, HAS_SOFTCAP, HAS_LOGIT_SCALE, PREFETCH, ALIGN_ROWS,
        )  # fmt: skip
    for i in range(FIRST, full_end, BLOCK):
        if REVERSE:
            block_start = full_end - BLOCK - (i - FIRST)
        else:
            block_start = i
        z = _load_raw(in_start, stride_in_col, block_start + cols, read_end, False, "evict_first")
        _gradient_block(
            z, out_start + (block_start + cols) * stride_out_col, None,
            lse2, scale, uniform, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE,
        )  # fmt: skip
    if FIRST > 0 and REVERSE:
        _first_gradient_block(
            in_start, stride_in_col, out_start, stride_out_col, lead, read_end, store_start, store_end, cols,
            lse2, scale, uniform, softcap, logit_scale, z_first, HAS_SOFTCAP, HAS_LOGIT_SCALE, PREFETCH, ALIGN_ROWS,
        )  # fmt: skip
    if not REVERSE:
        _tail_gradient_blocks(
            in_start, stride_in_col, out_start, stride_out_col, read_end, store_start, store_end, cols,
            lse2, scale, uniform, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE, ALIGN_ROWS, TAIL, END, BLOCK,
        )  # fmt: skip
    if ALIGN_ROWS:
        pos, mask = _edge_chunks(lead, store_start, store_end, N_COLS, CHUNK)
        z = tl.load(in_start + pos, mask=mask, other=0.0)
        _gradient_block(
            z, out_start + pos, mask, lse2, scale, uniform, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE
        )  # fmt: skip
    if (target >= 0) & (target < N_COLS):
        # The blocks' stores to the target's column come before this one (CTA barrier).
        tl.debug_barrier()
        g_target = tl.exp2(x_target * LOG2E - lse2) * scale - uniform - (1.0 - label_smoothing) * scale
        g_target = _chain(g_target, x_target, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE)
        tl.store(out_start + (lead + target) * stride_out_col, g_target.to(out_start.dtype.element_ty))


@triton.jit
def _transformed(
    z,
    pos,
    lead,
    N_COLS: tl.constexpr,
    softcap,
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    MASKED: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
):
    """One loaded block ``z`` of a row for the max/sum pass: the transformed logits in
    base 2 (``x * log2(e)``, -inf outside the row) and the transformed logits (0 outside
    the row)."""
    x = _transform(z.to(tl.float32), softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE)
    if MASKED:
        mask = _in_row(pos, lead, N_COLS, ALIGN_ROWS)
        return tl.where(mask, x * LOG2E, -float("inf")), tl.where(mask, x, 0.0)
    return x * LOG2E, x


@triton.jit
def _row_max_sum_online(
    logits_row,
    stride_logits_col,
    cols,
    N_COLS: tl.constexpr,
    softcap,
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(max of x * log2(e), sum of exp2(x * log2(e) - max), sum of x) over one row, with
    the running max and sum rescaled block by block (two block-wide reductions per block)."""
    m2 = -float("inf")
    s = 0.0
    sum_x = 0.0
    for start in range(0, N_COLS, BLOCK):
        offs = start + cols
        z = _load_raw(logits_row, stride_logits_col, offs, N_COLS, True, "evict_last")
        x2, x = _transformed(z, offs, 0, N_COLS, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE, True, False)
        m2_new = tl.maximum(m2, tl.max(x2, axis=0))
        # All -inf so far: keep the sum 0 instead of exp2(-inf - -inf) = NaN.
        shift = tl.where(m2_new == -float("inf"), 0.0, m2_new)
        s = s * tl.exp2(m2 - shift) + tl.sum(tl.exp2(x2 - shift), axis=0)
        m2 = m2_new
        if HAS_SMOOTHING:
            sum_x += tl.sum(x, axis=0)
    return m2, s, sum_x


@triton.jit
def _add_block(
    lane_sum,
    lane_max,
    lane_sum_x,
    shift,
    z,
    pos,
    lead,
    N_COLS: tl.constexpr,
    softcap,
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    MASKED: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
):
    """One more loaded block ``z`` into the lanes of _row_lanes."""
    x2, x = _transformed(z, pos, lead, N_COLS, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE, MASKED, ALIGN_ROWS)
    lane_sum += tl.exp2(x2 - shift)
    lane_max = tl.maximum(lane_max, x2)
    if HAS_SMOOTHING:
        lane_sum_x += x
    return lane_sum, lane_max, lane_sum_x


@triton.jit
def _row_lanes(
    start,
    stride_logits_col,
    lead,
    read_end,
    cols,
    N_COLS: tl.constexpr,
    shift,
    z_first,
    softcap,
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    PREFETCH: tl.constexpr,
    L2_PREFETCH: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The max/sum pass over one row (its span from _row_span), per lane: sums of
    exp2(x2 - shift), maxima of x2 and (with label smoothing) sums of x, reduced by
    _row_max_sum. With no barrier in the loop, a program keeps loads in flight back to
    back. Loads stay in L1 for the gradient pass that reads the row again. PREFETCH: the
    row's first block is ``z_first``, loaded already. L2_PREFETCH: each block asks for the
    next one in L2 before it is loaded. Only the blocks that reach ``read_end``, and the
    first block of a realigned row, are masked."""
    full_end: tl.constexpr = N_COLS // BLOCK * BLOCK
    # The blocks as in _row_gradient (END: the last read_end of any row).
    FIRST: tl.constexpr = BLOCK if (PREFETCH or ALIGN_ROWS) else 0
    TAIL: tl.constexpr = full_end if full_end > FIRST else FIRST
    CHUNK: tl.constexpr = 16 // (start.dtype.element_ty.primitive_bitwidth // 8)
    END: tl.constexpr = (N_COLS + 9 * CHUNK - 2) // CHUNK * CHUNK if ALIGN_ROWS else N_COLS
    lane_sum = tl.zeros([BLOCK], dtype=tl.float32)
    lane_max = tl.full([BLOCK], -float("inf"), dtype=tl.float32)
    lane_sum_x = tl.zeros([BLOCK], dtype=tl.float32)
    if FIRST > 0:
        if PREFETCH:
            z = z_first
        else:
            if L2_PREFETCH:
                _prefetch_to_l2(start, BLOCK, BLOCK, read_end)
            z = _load_first(start, stride_logits_col, cols, lead, read_end, ALIGN_ROWS, "evict_last")
        lane_sum, lane_max, lane_sum_x = _add_block(
            lane_sum, lane_max, lane_sum_x, shift, z, cols, lead, N_COLS,
            softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE, HAS_SMOOTHING, ALIGN_ROWS, ALIGN_ROWS,
        )  # fmt: skip
    for block_start in range(FIRST, full_end, BLOCK):
        if L2_PREFETCH:
            _prefetch_to_l2(start, block_start + BLOCK, BLOCK, read_end)
        z = _load_raw(start, stride_logits_col, block_start + cols, read_end, False, "evict_last")
        lane_sum, lane_max, lane_sum_x = _add_block(
            lane_sum, lane_max, lane_sum_x, shift, z, block_start + cols, lead, N_COLS,
            softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE, HAS_SMOOTHING, False, ALIGN_ROWS,
        )  # fmt: skip
    for tail_start in tl.static_range(TAIL, END, BLOCK):
        z = _load_raw(start, stride_logits_col, tail_start + cols, read_end, True, "evict_last")
        lane_sum, lane_max, lane_sum_x = _add_block(
            lane_sum, lane_max, lane_sum_x, shift, z, tail_start + cols, lead, N_COLS,
            softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE, HAS_SMOOTHING, True, ALIGN_ROWS,
        )  # fmt: skip
    return lane_sum, lane_max, lane_sum_x


@triton.jit
def _row_max_sum(
    lane_sum,
    lane_max,
    lane_sum_x,
    shift,
    logits_row,
    stride_logits_col,
    cols,
    N_COLS: tl.constexpr,
    softcap,
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """What _row_max_sum_online computes, from the lanes of _row_lanes: reduced once per
    row instead of twice per block.

    The lanes sum against one shift, the target's logit (transformed, in base 2; 0 if
    not finite; see :func:`_shift`). The fixed shift is exact scaling: the target's own
    term makes the sum at least 1. It fails only when the row max exceeds the shift by
    more than 64 (the sum could overflow: a loss above 44 nats) or the sum came out below
    1 (a target logit that is not finite): such rows take the online loop instead.
    """
    m2 = tl.max(lane_max, axis=0)
    s = tl.sum(lane_sum, axis=0) * tl.exp2(shift - tl.where(m2 == -float("inf"), 0.0, m2))
    sum_x = tl.sum(lane_sum_x, axis=0)
    if (m2 - shift > 64.0) | ~(s >= 0.5):
        m2, s, sum_x = _row_max_sum_online(
            logits_row, stride_logits_col, cols, N_COLS, softcap, logit_scale,
            HAS_SOFTCAP, HAS_LOGIT_SCALE, HAS_SMOOTHING, BLOCK,
        )  # fmt: skip
    return m2, s, sum_x


@triton.jit
def _shift(x_target):
    """The lanes' shift: the target's transformed logit in base 2, 0 if not finite."""
    shift = x_target * LOG2E
    return tl.where(tl.abs(shift) < float("inf"), shift, 0.0)


@triton.jit
def _zero_row(
    out_start,
    stride_out_col,
    lead,
    store_start,
    store_end,
    cols,
    N_COLS: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Zeros into one row (its span from _row_span)."""
    CHUNK: tl.constexpr = 16 // (out_start.dtype.element_ty.primitive_bitwidth // 8)
    END: tl.constexpr = (N_COLS + 9 * CHUNK - 2) // CHUNK * CHUNK if ALIGN_ROWS else N_COLS
    zeros = tl.zeros([BLOCK], dtype=out_start.dtype.element_ty)
    for start in range(0, END, BLOCK):
        pos = start + cols
        tl.store(
            out_start + pos * stride_out_col, zeros, mask=_stored(pos, store_start, store_end, ALIGN_ROWS), cache_modifier=".cs"
        )
    if ALIGN_ROWS:
        pos, mask = _edge_chunks(lead, store_start, store_end, N_COLS, CHUNK)
        tl.store(out_start + pos, tl.zeros([2 * CHUNK], dtype=out_start.dtype.element_ty), mask=mask)


@triton.jit
def check_targets_kernel(
    target_ptr,
    stride_target,
    status_ptr,
    site_ptr,
    prediction_ptr,
    n_rows,
    n_cols,
    ignore_index,
    HAS_SITE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program, run before the loss kernel so that one host read gives all it needs.

    status (int64) = [the target of the first row whose target is bad (else ignore_index),
    1 if the call site's last two grad_outputs differed, count of non-ignored targets, 0:
    the ticket of the loss kernel's programs (_sum_over_programs)].
    With a site, ``prediction`` (float32) = the site's last grad_output (1 if none, 0 or
    not finite): the factor the gradient-in-forward path bakes in.
    """
    n_valid = tl.zeros([], dtype=tl.int64)
    first_bad = n_rows + tl.zeros([], dtype=tl.int64)
    start = 0
    while start < n_rows:
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_rows
        target = tl.load(target_ptr + offs * stride_target, mask=mask, other=ignore_index).to(tl.int64)
        counted = mask & (target != ignore_index)
        n_valid += tl.sum(counted.to(tl.int32), axis=0)
        out_of_range = counted & ((target < 0) | (target >= n_cols))
        first_bad = tl.minimum(first_bad, tl.min(tl.where(out_of_range, offs, n_rows), axis=0))
        start += BLOCK
    bad = ignore_index + tl.zeros([], dtype=tl.int64)
    if first_bad < n_rows:
        bad = tl.load(target_ptr + first_bad * stride_target).to(tl.int64)
    tl.store(status_ptr, bad)
    tl.store(status_ptr + 2, n_valid)
    tl.store(status_ptr + 3, tl.zeros([], dtype=tl.int64))
    if HAS_SITE:
        last = tl.load(site_ptr)
        usable = (last != 0.0) & (tl.abs(last) < float("inf"))
        tl.store(prediction_ptr, tl.where(usable, last, 1.0))
        tl.store(status_ptr + 1, (tl.load(site_ptr + 1) != 0.0).to(tl.int64))
    else:
        tl.store(status_ptr + 1, tl.zeros([], dtype=tl.int64))


@triton.jit
def _record_grad_output(site_ptr, grad_output):
    """Site state = [this grad_output, whether it differed from the previous one]."""
    tl.store(site_ptr + 1, (grad_output != tl.load(site_ptr)).to(tl.float32))
    tl.store(site_ptr, grad_output)


@triton.jit
def _row_target(target_ptr, stride_target, row, n_rows, ignore_index):
    """Row ``row``'s target; ignore_index past the last row."""
    return tl.load(target_ptr + row * stride_target, mask=row < n_rows, other=ignore_index).to(tl.int64)


@triton.jit
def _target_logit(logits_ptr, stride_logits_row, stride_logits_col, row, n_rows, target, N_COLS: tl.constexpr):
    """The logit of row ``row`` at its target, as stored (the first column's where the
    target is out of range), in float32."""
    safe_target = tl.where((target >= 0) & (target < N_COLS), target, 0)
    ptr = logits_ptr + row * stride_logits_row + safe_target * stride_logits_col
    return tl.load(ptr, mask=row < n_rows, other=0.0).to(tl.float32)


@triton.jit
def _first_block(
    logits_ptr,
    stride_logits_row,
    stride_logits_col,
    row,
    needed,
    cols,
    N_COLS: tl.constexpr,
    PREFETCH: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
):
    """With PREFETCH, the first block of row ``row`` (from its span's start, see _row_span)
    where ``needed`` (a row that is not ignored and not past the last row); without, a
    placeholder that is never read."""
    if PREFETCH:
        start, lead, read_end, _, _ = _row_span(logits_ptr + row * stride_logits_row, N_COLS, ALIGN_ROWS)
        # Every column of the block, or none: a comparison of the block, not ``needed``
        # broadcast to it (Triton 3.9's interpreter broadcasts a scalar comparison to int64
        # data, which its masked load rejects as a mask).
        mask = cols < tl.where(needed, cols.shape[0], 0)
        if ALIGN_ROWS:
            CHUNK: tl.constexpr = 16 // (logits_ptr.dtype.element_ty.primitive_bitwidth // 8)
            mask = mask & _readable(cols, lead, read_end, CHUNK)
        block = tl.load(start + cols * stride_logits_col, mask=mask, other=0.0, eviction_policy="evict_last")
    else:
        block = tl.zeros([1], dtype=tl.int8)
    return block


@triton.jit
def _start_next_row(
    z_first,
    logits_ptr,
    stride_logits_row,
    stride_logits_col,
    next_row,
    next_needed,
    cols,
    N_COLS: tl.constexpr,
    PREFETCH: tl.constexpr,
    L2_PREFETCH: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Start reading the program's next row where ``next_needed``: with PREFETCH its first
    block into registers (returned; without, ``z_first`` is returned as it is), with
    L2_PREFETCH its first block into L2."""
    z_next = z_first
    if PREFETCH:
        z_next = _first_block(
            logits_ptr, stride_logits_row, stride_logits_col, next_row, next_needed, cols, N_COLS, PREFETCH, ALIGN_ROWS
        )
    if L2_PREFETCH:
        start, _, read_end, _, _ = _row_span(logits_ptr + next_row * stride_logits_row, N_COLS, ALIGN_ROWS)
        _prefetch_to_l2(start, 0, tl.where(next_needed, BLOCK, 0), read_end)
    return z_next


@triton.jit
def _forward_row(
    row,
    target,
    z_t,
    z_first,
    next_row,
    next_target,
    n_rows,
    logits_ptr,
    stride_logits_row,
    stride_logits_col,
    loss_ptr,
    lse_ptr,
    grad_ptr,
    stride_grad_row,
    stride_grad_col,
    scale,
    cols,
    N_COLS: tl.constexpr,
    ignore_index,
    label_smoothing,
    softcap,
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    STORE_ROWS: tl.constexpr,
    STORE_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    REVERSE: tl.constexpr,
    PREFETCH: tl.constexpr,
    L2_PREFETCH: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Loss (and lse, gradient) of one row. Returns the row's loss and what
    _start_next_row gives: the next row is started before this row's gradient pass, so
    that its first block arrives while the pass runs."""
    logits_row = logits_ptr + row * stride_logits_row
    start, lead, read_end, store_start, store_end = _row_span(logits_row, N_COLS, ALIGN_ROWS)
    # The host realigns rows only where the gradient's rows are aligned as the logits' are.
    grad_start = _aligned_as(grad_ptr + row * stride_grad_row, lead, ALIGN_ROWS)
    # Nothing is read ahead for an ignored row or past the last row.
    next_needed = (next_row < n_rows) & (next_target != ignore_index)
    if target == ignore_index:
        z_next = _start_next_row(
            z_first, logits_ptr, stride_logits_row, stride_logits_col, next_row, next_needed, cols,
            N_COLS, PREFETCH, L2_PREFETCH, ALIGN_ROWS, BLOCK,
        )  # fmt: skip
        loss = 0.0
        if STORE_ROWS:
            tl.store(loss_ptr + row, loss)
        if STORE_LSE:
            tl.store(lse_ptr + row, 0.0)
        if WRITE_GRAD:
            _zero_row(grad_start, stride_grad_col, lead, store_start, store_end, cols, N_COLS, ALIGN_ROWS, BLOCK)
    else:
        in_range = (target >= 0) & (target < N_COLS)
        x_t = _transform(z_t, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE)
        shift = _shift(x_t)
        lane_sum, lane_max, lane_sum_x = _row_lanes(
            start, stride_logits_col, lead, read_end, cols, N_COLS, shift, z_first, softcap, logit_scale,
            HAS_SOFTCAP, HAS_LOGIT_SCALE, HAS_SMOOTHING, PREFETCH, L2_PREFETCH, ALIGN_ROWS, BLOCK,
        )  # fmt: skip
        z_grad_first = z_first
        if PREFETCH:
            # The gradient pass's first block, loaded before the lanes are reduced so that
            # the reductions hide its latency.
            z_grad_first = _load_first(start, stride_logits_col, cols, lead, read_end, ALIGN_ROWS, "evict_first")
        m2, s, sum_x = _row_max_sum(
            lane_sum, lane_max, lane_sum_x, shift, logits_row, stride_logits_col, cols, N_COLS,
            softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE, HAS_SMOOTHING, BLOCK,
        )  # fmt: skip
        lse2 = tl.where(m2 == -float("inf"), 0.0, m2) + tl.log2(s)
        loss = lse2 * LN2 - (1.0 - label_smoothing) * x_t
        if HAS_SMOOTHING:
            loss -= label_smoothing / N_COLS * sum_x
        loss = tl.where(in_range, loss, float("nan"))
        if STORE_ROWS:
            tl.store(loss_ptr + row, loss)
        if STORE_LSE:
            tl.store(lse_ptr + row, lse2)
        z_next = _start_next_row(
            z_first, logits_ptr, stride_logits_row, stride_logits_col, next_row, next_needed, cols,
            N_COLS, PREFETCH, L2_PREFETCH, ALIGN_ROWS, BLOCK,
        )  # fmt: skip
        if WRITE_GRAD:
            _row_gradient(
                start, stride_logits_col, grad_start, stride_grad_col, lead, read_end, store_start, store_end,
                cols, N_COLS, target, x_t, lse2, scale, label_smoothing, softcap, logit_scale, z_grad_first,
                HAS_SOFTCAP, HAS_LOGIT_SCALE, REVERSE, PREFETCH, ALIGN_ROWS, BLOCK,
            )  # fmt: skip
    return loss, z_next


@triton.jit
def _sum_over_programs(
    total,
    partials_ptr,
    ticket_ptr,
    out_ptr,
    denominator_ptr,
    n_programs,
    HAS_DENOMINATOR: tl.constexpr,
    PROGRAMS_BLOCK: tl.constexpr,
):
    """The loss, ``sum(total of every program) / denominator``, into ``out``: each program
    leaves its total in ``partials`` and takes a ticket; the program that takes the last
    ticket adds them up, always in the same order (the result does not depend on which
    program finishes last), and writes the loss. ``ticket`` starts at 0
    (check_targets_kernel)."""
    pid = tl.program_id(0)
    tl.store(partials_ptr + pid, total)
    # Every thread's stores before the ticket; the ticket's release makes them visible to
    # the program that takes the last one, its acquire makes all of them visible to it.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    if ticket == n_programs - 1:
        programs = tl.arange(0, PROGRAMS_BLOCK)
        # From L2 (.cg): another SM wrote them, this SM's L1 may hold older lines.
        partials = tl.load(partials_ptr + programs, mask=programs < n_programs, other=0.0, cache_modifier=".cg")
        loss = tl.sum(partials, axis=0)
        if HAS_DENOMINATOR:
            # An int64 count or a float32 num_items_in_batch; 0 / 0 is NaN, as torch's
            # "mean" over no rows.
            loss = loss / tl.load(denominator_ptr).to(tl.float32)
        tl.store(out_ptr, loss)


@triton.jit
def cross_entropy_forward_kernel(
    logits_ptr,
    stride_logits_row,
    stride_logits_col,
    target_ptr,
    stride_target,
    loss_ptr,
    lse_ptr,
    grad_ptr,
    stride_grad_row,
    stride_grad_col,
    denominator_ptr,
    prediction_ptr,
    partials_ptr,
    status_ptr,
    n_rows,
    N_COLS: tl.constexpr,
    n_programs,
    ignore_index,
    label_smoothing,
    softcap,
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    SUM: tl.constexpr,
    STORE_LSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_DENOMINATOR: tl.constexpr,
    REVERSE: tl.constexpr,
    PREFETCH: tl.constexpr,
    L2_PREFETCH: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    PROGRAMS_BLOCK: tl.constexpr,
):
    """Per-row loss (float32), optionally lse (base 2) and the gradient.

    SUM: instead of the rows' losses, their sum divided by the denominator (where there
    is one) into ``loss`` (one element), with ``partials`` (one float32 per program) and the
    ticket in the target check's status (0 at launch) for the programs to meet
    (_sum_over_programs).
    WRITE_GRAD writes ``prediction / denominator * d loss_row / d z`` into grad (which
    may be the logits buffer itself: each block is read before it is written).
    """
    _assert_blocks_cover_the_lead(logits_ptr, N_COLS, ALIGN_ROWS, BLOCK)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    scale = 1.0
    if WRITE_GRAD:
        scale = tl.load(prediction_ptr)
        if HAS_DENOMINATOR:
            scale = scale / tl.load(denominator_ptr).to(tl.float32)
    # A program reads its next row's target logit, and the target of the row after that,
    # while it works on the current row: the max/sum pass needs the target's logit before
    # its first load, and the two reads depend on each other, so they are issued one row
    # apart. With PREFETCH it also reads the next row's first block during the current
    # row (_forward_row). (A while loop: the interpreter cannot run range() over run-time
    # bounds.)
    tl.static_assert(not PREFETCH or (WRITE_GRAD and not REVERSE and N_COLS >= BLOCK))
    row = pid.to(tl.int64)
    target = _row_target(target_ptr, stride_target, row, n_rows, ignore_index)
    z_t = _target_logit(logits_ptr, stride_logits_row, stride_logits_col, row, n_rows, target, N_COLS)
    next_target = _row_target(target_ptr, stride_target, row + n_programs, n_rows, ignore_index)
    z_first = _first_block(
        logits_ptr, stride_logits_row, stride_logits_col, row, (row < n_rows) & (target != ignore_index), cols,
        N_COLS, PREFETCH, ALIGN_ROWS,
    )  # fmt: skip
    total = 0.0
    while row < n_rows:
        next_row = row + n_programs
        next_z_t = _target_logit(logits_ptr, stride_logits_row, stride_logits_col, next_row, n_rows, next_target, N_COLS)
        target_after = _row_target(target_ptr, stride_target, next_row + n_programs, n_rows, ignore_index)
        loss, z_first = _forward_row(
            row, target, z_t, z_first, next_row, next_target, n_rows,
            logits_ptr, stride_logits_row, stride_logits_col,
            loss_ptr, lse_ptr, grad_ptr, stride_grad_row, stride_grad_col, scale,
            cols, N_COLS, ignore_index, label_smoothing, softcap, logit_scale,
            HAS_SOFTCAP, HAS_LOGIT_SCALE, HAS_SMOOTHING, not SUM, STORE_LSE, WRITE_GRAD, REVERSE, PREFETCH,
            L2_PREFETCH, ALIGN_ROWS, BLOCK,
        )  # fmt: skip
        total += loss
        row = next_row
        target, z_t, next_target = next_target, next_z_t, target_after
    if SUM:
        _sum_over_programs(
            total, partials_ptr, status_ptr + 3, loss_ptr, denominator_ptr, n_programs, HAS_DENOMINATOR, PROGRAMS_BLOCK
        )


@triton.jit
def cross_entropy_backward_kernel(
    logits_ptr,
    stride_logits_row,
    stride_logits_col,
    target_ptr,
    stride_target,
    lse_ptr,
    grad_output_ptr,
    stride_grad_output,
    denominator_ptr,
    grad_ptr,
    stride_grad_row,
    stride_grad_col,
    site_ptr,
    n_rows,
    N_COLS: tl.constexpr,
    n_programs,
    ignore_index,
    label_smoothing,
    softcap,
    logit_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LOGIT_SCALE: tl.constexpr,
    HAS_DENOMINATOR: tl.constexpr,
    HAS_SITE: tl.constexpr,
    ALIGN_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad[r] = grad_output[r] / denominator * d loss_r / d z[r]: one read, one write.

    ``grad_output`` has stride 0 for a reduced loss; HAS_SITE records that (scalar)
    grad_output in the call site's state.
    """
    _assert_blocks_cover_the_lead(logits_ptr, N_COLS, ALIGN_ROWS, BLOCK)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    if HAS_SITE:
        if pid == 0:
            _record_grad_output(site_ptr, tl.load(grad_output_ptr))
    inv_denominator = 1.0
    if HAS_DENOMINATOR:
        inv_denominator = 1.0 / tl.load(denominator_ptr).to(tl.float32)
    row = pid.to(tl.int64)
    while row < n_rows:
        target = tl.load(target_ptr + row * stride_target).to(tl.int64)
        start, lead, read_end, store_start, store_end = _row_span(
            logits_ptr + row * stride_logits_row, N_COLS, ALIGN_ROWS
        )
        grad_start = _aligned_as(grad_ptr + row * stride_grad_row, lead, ALIGN_ROWS)
        if target == ignore_index:
            _zero_row(grad_start, stride_grad_col, lead, store_start, store_end, cols, N_COLS, ALIGN_ROWS, BLOCK)
        else:
            scale = tl.load(grad_output_ptr + row * stride_grad_output) * inv_denominator
            # Read before the row is overwritten (the gradient may go into the logits).
            z_t = _target_logit(logits_ptr, stride_logits_row, stride_logits_col, row, n_rows, target, N_COLS)
            x_t = _transform(z_t, softcap, logit_scale, HAS_SOFTCAP, HAS_LOGIT_SCALE)
            _row_gradient(
                start, stride_logits_col, grad_start, stride_grad_col, lead, read_end, store_start, store_end,
                cols, N_COLS, target, x_t, tl.load(lse_ptr + row), scale, label_smoothing, softcap,
                logit_scale, 0, HAS_SOFTCAP, HAS_LOGIT_SCALE, False, False, ALIGN_ROWS, BLOCK,
            )  # fmt: skip
        row += n_programs


@triton.jit
def correct_gradient_kernel(
    grad_ptr,
    stride_grad_row,
    stride_grad_col,
    grad_output_ptr,
    prediction_ptr,
    site_ptr,
    n_rows,
    N_COLS: tl.constexpr,
    n_programs,
    ALIGN_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad *= grad_output / prediction in place; nothing to do (decided on the device,
    no host sync) when the forward predicted grad_output right. Records grad_output in
    the call site's state for the next forward's prediction.
    """
    _assert_blocks_cover_the_lead(grad_ptr, N_COLS, ALIGN_ROWS, BLOCK)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    grad_output = tl.load(grad_output_ptr)
    prediction = tl.load(prediction_ptr)
    if pid == 0:
        _record_grad_output(site_ptr, grad_output)
    if grad_output != prediction:
        factor = grad_output / prediction
        row = pid.to(tl.int64)
        CHUNK: tl.constexpr = 16 // (grad_ptr.dtype.element_ty.primitive_bitwidth // 8)
        END: tl.constexpr = (N_COLS + 9 * CHUNK - 2) // CHUNK * CHUNK if ALIGN_ROWS else N_COLS
        while row < n_rows:
            grad_start, lead, read_end, store_start, store_end = _row_span(
                grad_ptr + row * stride_grad_row, N_COLS, ALIGN_ROWS
            )
            for start in range(0, END, BLOCK):
                pos = start + cols
                ptrs = grad_start + pos * stride_grad_col
                readable = _readable(pos, lead, read_end, CHUNK) if ALIGN_ROWS else pos < read_end
                g = tl.load(ptrs, mask=readable, other=0.0, eviction_policy="evict_first").to(tl.float32)
                # Zeros (ignored rows) stay zeros, as torch's, if grad_output is inf or NaN.
                g = tl.where(g == 0.0, 0.0, g * factor).to(grad_ptr.dtype.element_ty)
                tl.store(ptrs, g, mask=_stored(pos, store_start, store_end, ALIGN_ROWS), cache_modifier=".cs")
            if ALIGN_ROWS:
                pos, mask = _edge_chunks(lead, store_start, store_end, N_COLS, CHUNK)
                g = tl.load(grad_start + pos, mask=mask, other=0.0).to(tl.float32)
                g = tl.where(g == 0.0, 0.0, g * factor)
                tl.store(grad_start + pos, g.to(grad_ptr.dtype.element_ty), mask=mask)
            row += n_programs
