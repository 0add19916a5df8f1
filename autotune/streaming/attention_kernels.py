"""The Triton source of :mod:`autotune.streaming.attention`'s kernels (that module says what
they do), imported at their first use: importing triton costs a second, and under
``TRITON_INTERPRET=1`` it must come after the variable is set. One online softmax,
:func:`attend_positions`, serves both attention kernels.
"""

import triton
import triton.language as tl


@triton.jit
def attend_positions(q, k_base, v_base, k_sl, v_sl, first, end, scale, top, total, acc,
                     BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """The online softmax of queries ``q`` [rows, d] over cache positions ``first..end-1`` of
    one (sequence, KV head), ``BLOCK`` at a time: scores and running sums in float32, the
    probabilities rounded to the cache dtype before their product with the values, as flash
    attention does. Takes and returns the running maximum, sum and accumulator."""
    d = tl.arange(0, q.shape[1])
    for start in range(first, end, BLOCK):
        n = start + tl.arange(0, BLOCK)
        filled = n < end
        k = tl.load(k_base + n[:, None] * k_sl + d[None, :], mask=filled[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(filled[None, :], s, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, 1))
        shrink = tl.exp(top - new_top)  # 0 at the first score
        p = tl.exp(s - new_top[:, None])
        total = total * shrink + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * v_sl + d[None, :], mask=filled[:, None], other=0.0)
        acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        top = new_top
    return top, total, acc


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr,  # noqa: PLR0913
                            q_sb, q_sh, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh,
                            scale, kv_heads,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                            PRECISION: tl.constexpr):
    program = tl.program_id(0)
    b, kv = program // kv_heads, program % kv_heads
    length = tl.load(pos_ptr) + 1  # keys 0..pos
    g = tl.arange(0, GROUP_PAD)  # tl.dot wants 16 rows: the group's, then zeros
    d = tl.arange(0, HEAD_DIM)
    heads = kv * GROUP + g
    rows = g < GROUP
    q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :],
                mask=rows[:, None], other=0.0)
    top = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of the scores
    total = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp(score - top)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    k_base = k_ptr + b * k_sb + kv * k_sh
    v_base = v_ptr + b * v_sb + kv * v_sh
    top, total, acc = attend_positions(q, k_base, v_base, k_sl, v_sl, 0, length, scale, top,
                                       total, acc, BLOCK, PRECISION)
    out = acc / total[:, None]
    tl.store(o_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=rows[:, None])


# The number of splits is an argument, not a constant, so that the batches of a study
# (1 to 5 splits for llama2-7b) share two builds of the kernel, split or not, instead of
# one each: Triton's build is about a second, paid in a worker's warm-ups (item 3).
@triton.jit(do_not_specialize=["splits"])
def decode_rope_attention_kernel(qkv_ptr, k_ptr, v_ptr, o_ptr, part_ptr, pos_ptr,  # noqa: PLR0913
                                 cos_ptr, sin_ptr,
                                 qkv_sb, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh,
                                 scale, heads, kv_heads, splits,
                                 GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                                 HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                                 SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    dtype = o_ptr.dtype.element_ty
    program, split = tl.program_id(0), tl.program_id(1)
    b, kv = program // kv_heads, program % kv_heads
    pos = tl.load(pos_ptr)
    d = tl.arange(0, HEAD_DIM)
    swapped = (d + HEAD_DIM // 2) % HEAD_DIM  # rotate-half's partner of each element
    cos = tl.load(cos_ptr + d).to(tl.float32)
    sin = tl.load(sin_ptr + d).to(tl.float32)  # signed: cat(-sin1, sin2)
    row = qkv_ptr + b * qkv_sb
    g = tl.arange(0, GROUP_PAD)
    rows = g < GROUP
    q_at = row + (kv * GROUP + g)[:, None] * HEAD_DIM
    qx = tl.load(q_at + d[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
    qs = tl.load(q_at + swapped[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
    # Rotated as apply_rope rounds it: x * cos, then the sum.
    q = ((qx * cos[None, :]).to(dtype).to(tl.float32) + qs * sin[None, :]).to(dtype)
    # The running maximum before any score: finite, so that exp(top - new_top) is 0 at the
    # first score and 1 (times nothing) in a split that had none, never NaN.
    top = tl.full([GROUP_PAD], -1e30, tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    k_base = k_ptr + b * k_sb + kv * k_sh
    v_base = v_ptr + b * v_sb + kv * v_sh
    # This split's share of positions 0..pos-1, read from the cache, in whole blocks.
    share = tl.cdiv(tl.cdiv(pos, splits), BLOCK) * BLOCK
    first, end = split * share, tl.minimum(split * share + share, pos)
    top, total, acc = attend_positions(q, k_base, v_base, k_sl, v_sl, first, end, scale, top,
                                       total, acc, BLOCK, PRECISION)
    if split == splits - 1:  # the last split: position pos, written, attended from registers
        k_at = row + (heads + kv) * HEAD_DIM
        k_new = ((tl.load(k_at + d).to(tl.float32) * cos).to(dtype).to(tl.float32)
                 + tl.load(k_at + swapped).to(tl.float32) * sin).to(dtype)
        v_new = tl.load(row + (heads + kv_heads + kv) * HEAD_DIM + d)
        tl.store(k_base + pos * k_sl + d, k_new)
        tl.store(v_base + pos * v_sl + d, v_new)
        s_now = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
        top_now = tl.maximum(top, s_now)
        shrink_now = tl.exp(top - top_now)
        p_now = tl.exp(s_now - top_now)
        total = total * shrink_now + p_now
        acc = acc * shrink_now[:, None] + (p_now.to(dtype).to(tl.float32)[:, None]
                                           * v_new.to(tl.float32)[None, :])
        top = top_now
    if not SPLIT:
        out = acc / total[:, None]
        tl.store(o_ptr + b * o_sb + (kv * GROUP + g)[:, None] * o_sh + d[None, :],
                 out.to(dtype), mask=rows[:, None])
    else:  # partials [pair, split, row, (top, total, acc...)], float32, for the combine
        at = part_ptr + ((program * splits + split) * GROUP_PAD + g) * (HEAD_DIM + 2)
        tl.store(at, top)
        tl.store(at + 1, total)
        tl.store(at[:, None] + 2 + d[None, :], acc)

@triton.jit(do_not_specialize=["splits"])
def combine_kernel(o_ptr, part_ptr, o_sb, o_sh, kv_heads, splits, GROUP: tl.constexpr,
                   GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    program = tl.program_id(0)
    b, kv = program // kv_heads, program % kv_heads
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    top = tl.full([GROUP_PAD], -1e30, tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for split in range(splits):  # an empty split: top -1e30, total 0, acc 0
        at = part_ptr + ((program * splits + split) * GROUP_PAD + g) * (HEAD_DIM + 2)
        its_top = tl.load(at)
        new_top = tl.maximum(top, its_top)
        mine = tl.exp(top - new_top)
        its = tl.exp(its_top - new_top)
        total = total * mine + tl.load(at + 1) * its
        acc = acc * mine[:, None] + tl.load(at[:, None] + 2 + d[None, :]) * its[:, None]
        top = new_top
    out = acc / total[:, None]
    tl.store(o_ptr + b * o_sb + (kv * GROUP + g)[:, None] * o_sh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])
