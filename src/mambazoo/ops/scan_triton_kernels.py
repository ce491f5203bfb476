"""Triton kernels of the selective scan: one forward and one backward, everything fused.

Imported only when the Triton backend is used (``scan_triton``). Every kernel also runs in Triton's interpreter
(``TRITON_INTERPRET=1``, CPU tensors), which is how CI checks them.

Work split: one program owns BLOCK_D channels of one batch element and one channel group (channels of a program
share their B/C rows), and walks the sequence in chunks of BLOCK_L steps. Inside a chunk the recurrence
h_t = a_t * h_{t-1} + b_t is a ``tl.associative_scan`` over a (BLOCK_D, BLOCK_N, BLOCK_L) tile, seeded with the
state carried from the previous chunk. The state at every chunk start is written out: the backward restarts each
chunk from it instead of storing (batch, dim, L, N) states.

Backward, chunks last to first: recompute the chunk's states, then the adjoint G_t = C_t*dy_t + a_{t+1}*G_{t+1}
as a reverse scan seeded with the adjoint carried from the next chunk (a_{t+1} comes from delta one step ahead).
With a_t*h_{t-1} = h_t - b_t no shifted copy of the states is needed:
    d(delta_t) = sum_n G_t * (B_t*u_t + A * (h_t - b_t)),   dA = sum_t G_t * delta_t * (h_t - b_t),
    du_t = delta_t * sum_n G_t*B_t + D*dy_t,                 dB_t = sum_d G_t*delta_t*u_t,   dC_t = sum_d h_t*dy_t.
dB and dC of per-step B/C sum over every channel of a group, across programs: float32 atomics.
Padding: steps past L get delta = 0 (decay 1, drive 0), so the last column of a chunk is always the state to carry.

Cross scans (CROSS, VMamba's SS2D): the four traversals of an (H, W) map are read straight from the row-major
tensors: step t of direction k is loaded from, and written to, position ``_positions(t, k)`` along the L axis, so
the permuted copies of the cross scan are never made. u is shared by the four directions: channel d reads u's
channel d % u_channels.
"""
import triton
import triton.language as tl

# Globals read inside kernels must be constexpr objects (the interpreter does not check this; the compiler does).
LOG2_E = tl.constexpr(1.4426950408889634)
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


@triton.jit
def _first_order_combine(a_left, b_left, a_right, b_right):
    # (a, b) composes h -> a*h + b; the left map runs first.
    return a_left * a_right, b_left * a_right + b_right


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(exp(-|x|)), log1p from log with the rounding of 1 + e corrected (as scan_chunked does).
    e = tl.exp2(-tl.abs(x) * LOG2_E)
    w = 1.0 + e
    log1p_e = tl.log(w) - ((w - 1.0) - e) / w
    return tl.where(x > SOFTPLUS_THRESHOLD, x, tl.maximum(x, 0.0) + log1p_e)


@triton.jit
def _positions(t, direction, height, width, L, CROSS: tl.constexpr):
    """Where step t of the sequence lives along the tensors' L axis. Plain scans: t. VMamba's cross scan over an
    (height, width) map stored row-major: direction 0 walks rows, 1 columns, 2 and 3 the same backwards."""
    if CROSS:
        walked = tl.where(direction >= 2, L - 1 - t, t)
        by_column = (walked % height) * width + walked // height
        return tl.where(direction % 2 == 1, by_column, walked)
    return t


@triton.jit
def _load_delta(delta_ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta (+ bias, softplus) in float32, and the pre-softplus value (for the softplus gradient)."""
    raw = tl.load(delta_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _channel_block(n_groups, blocks_per_group, dims_per_group, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch element, channel group, scan direction (cross scans: each direction is a quarter of
    the groups), channels and states, with the masks of the last, partial block."""
    pid = tl.program_id(0)
    block = pid % blocks_per_group
    group = (pid // blocks_per_group) % n_groups
    b = pid // (blocks_per_group * n_groups)
    direction = (group * 4) // n_groups
    offs_in_group = block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_in_group < dims_per_group
    d = group * dims_per_group + offs_in_group
    n = tl.arange(0, BLOCK_N)
    return b, group, direction, d, d_mask, n, n < N


@triton.jit
def _channel_values(ptr, d, d_mask, PRESENT: tl.constexpr, BLOCK_D: tl.constexpr):
    """D or delta_bias at the program's channels, float32; zeros when the input is absent."""
    values = tl.zeros((BLOCK_D,), tl.float32)
    if PRESENT:
        values = tl.load(ptr + d, mask=d_mask, other=0.0).to(tl.float32)
    return values


@triton.jit
def _fixed_matrix(ptr, d, n, s_d, s_n, dn_mask, FIXED: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A fixed (dim, N) B or C at the program's channels, float32; zeros (unused) for per-step matrices."""
    values = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    if FIXED:
        values = tl.load(ptr + d[:, None] * s_d + n[None, :] * s_n, mask=dn_mask, other=0.0).to(tl.float32)
    return values


@triton.jit
def selective_scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
        dim, L, N, dims_per_group, n_chunks, u_channels, height, width,
        s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, s_o_b, s_o_d, s_o_l,
        s_A_d, s_A_n,
        s_B_b, s_B_g, s_B_d, s_B_n, s_B_l, s_C_b, s_C_g, s_C_d, s_C_n, s_C_l,
        s_st_b, s_st_d, s_st_c,
        n_groups, blocks_per_group, B_group_ratio, C_group_ratio,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, CROSS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b, group, direction, d, d_mask, n, n_mask = _channel_block(n_groups, blocks_per_group, dims_per_group, N,
                                                               BLOCK_D, BLOCK_N)
    dn_mask = d_mask[:, None] & n_mask[None, :]
    steps = tl.arange(0, BLOCK_L)
    # Per-channel constants, once.
    A = tl.load(A_ptr + d[:, None] * s_A_d + n[None, :] * s_A_n, mask=dn_mask, other=0.0).to(tl.float32)
    A2 = A * LOG2_E
    bias = _channel_values(bias_ptr, d, d_mask, HAS_BIAS, BLOCK_D)
    skip = _channel_values(D_ptr, d, d_mask, HAS_D, BLOCK_D)
    B_fix = _fixed_matrix(B_ptr, d, n, s_B_d, s_B_n, dn_mask, B_FIXED, BLOCK_D, BLOCK_N)
    C_fix = _fixed_matrix(C_ptr, d, n, s_C_d, s_C_n, dn_mask, C_FIXED, BLOCK_D, BLOCK_N)

    B_row = B_ptr + b * s_B_b + (group // B_group_ratio) * s_B_g
    C_row = C_ptr + b * s_C_b + (group // C_group_ratio) * s_C_g
    st_base = states_ptr + b * s_st_b + d[:, None] * s_st_d + n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    tl.store(st_base, h, mask=dn_mask)
    last_step = (steps == BLOCK_L - 1)[None, None, :]
    for c in range(0, n_chunks):
        t = c * BLOCK_L + steps
        t_mask = t < L
        p = _positions(t, direction, height, width, L, CROSS)
        mask = d_mask[:, None] & t_mask[None, :]
        u_at = u_ptr + b * s_u_b + (d % u_channels)[:, None] * s_u_d + p[None, :] * s_u_l
        u = tl.load(u_at, mask=mask, other=0.0).to(tl.float32)
        dt, _ = _load_delta(delta_ptr + b * s_dt_b + d[:, None] * s_dt_d + p[None, :] * s_dt_l, mask, bias,
                            HAS_BIAS, SOFTPLUS)
        decay = tl.exp2(dt[:, None, :] * A2[:, :, None])
        if B_FIXED:
            Bt = B_fix[:, :, None]
        else:
            Bt = tl.load(B_row + n[:, None] * s_B_n + p[None, :] * s_B_l,
                         mask=n_mask[:, None] & t_mask[None, :], other=0.0).to(tl.float32)[None, :, :]
        drive = (dt * u)[:, None, :] * Bt
        a_cum, b_cum = tl.associative_scan((decay, drive), axis=2, combine_fn=_first_order_combine)
        hs = a_cum * h[:, :, None] + b_cum
        if C_FIXED:
            Ct = C_fix[:, :, None]
        else:
            Ct = tl.load(C_row + n[:, None] * s_C_n + p[None, :] * s_C_l,
                         mask=n_mask[:, None] & t_mask[None, :], other=0.0).to(tl.float32)[None, :, :]
        y = tl.sum(hs * Ct, axis=1)
        if HAS_D:
            y += u * skip[:, None]
        if HAS_Z:
            z = tl.load(z_ptr + b * s_z_b + d[:, None] * s_z_d + p[None, :] * s_z_l, mask=mask, other=0.0)
            z = z.to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + b * s_o_b + d[:, None] * s_o_d + p[None, :] * s_o_l, y, mask=mask)
        h = tl.sum(tl.where(last_step, hs, 0.0), axis=2)
        tl.store(st_base + (c + 1) * s_st_c, h, mask=dn_mask)


@triton.jit
def selective_scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr, dlast_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
        dim, L, N, dims_per_group, n_chunks, u_channels, height, width,
        s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, s_do_b, s_do_d, s_do_l,
        s_A_d, s_A_n,
        s_B_b, s_B_g, s_B_d, s_B_n, s_B_l, s_C_b, s_C_g, s_C_d, s_C_n, s_C_l,
        s_st_b, s_st_d, s_st_c,
        s_g_b, s_g_d, s_g_l,
        s_dB_b, s_dB_g, s_dB_n, s_dB_l, s_dC_b, s_dC_g, s_dC_n, s_dC_l,
        n_groups, blocks_per_group, B_group_ratio, C_group_ratio,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        B_FIXED: tl.constexpr, C_FIXED: tl.constexpr, CROSS: tl.constexpr, HAS_DLAST: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Gradients. du, ddelta, dz share the strides s_g_*; per-channel results (dA, fixed dB/dC as (batch, dim, N),
    dD, dbias as (batch, dim)) are per batch element, summed by the caller; per-step dB/dC are float32 atomics."""
    b, group, direction, d, d_mask, n, n_mask = _channel_block(n_groups, blocks_per_group, dims_per_group, N,
                                                               BLOCK_D, BLOCK_N)
    dn_mask = d_mask[:, None] & n_mask[None, :]
    steps = tl.arange(0, BLOCK_L)
    # Per-channel constants, once.
    A = tl.load(A_ptr + d[:, None] * s_A_d + n[None, :] * s_A_n, mask=dn_mask, other=0.0).to(tl.float32)
    A2 = A * LOG2_E
    bias = _channel_values(bias_ptr, d, d_mask, HAS_BIAS, BLOCK_D)
    skip = _channel_values(D_ptr, d, d_mask, HAS_D, BLOCK_D)
    B_fix = _fixed_matrix(B_ptr, d, n, s_B_d, s_B_n, dn_mask, B_FIXED, BLOCK_D, BLOCK_N)
    C_fix = _fixed_matrix(C_ptr, d, n, s_C_d, s_C_n, dn_mask, C_FIXED, BLOCK_D, BLOCK_N)

    B_row = B_ptr + b * s_B_b + (group // B_group_ratio) * s_B_g
    C_row = C_ptr + b * s_C_b + (group // C_group_ratio) * s_C_g
    dB_row = dB_ptr + b * s_dB_b + (group // B_group_ratio) * s_dB_g
    dC_row = dC_ptr + b * s_dC_b + (group // C_group_ratio) * s_dC_g
    st_base = states_ptr + b * s_st_b + d[:, None] * s_st_d + n[None, :]
    per_channel = b * dim + d  # index into the (batch, dim) partial sums

    # The adjoint carried into the chunk from the one after it (at the end: the last state's gradient).
    if HAS_DLAST:
        g_carry = tl.load(dlast_ptr + per_channel[:, None] * N + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    else:
        g_carry = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dB_fix_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dC_fix_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    first_step = (steps == 0)[None, None, :]
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * BLOCK_L + steps
        t_mask = t < L
        p = _positions(t, direction, height, width, L, CROSS)
        mask = d_mask[:, None] & t_mask[None, :]
        nt_mask = n_mask[:, None] & t_mask[None, :]
        u_at = u_ptr + b * s_u_b + (d % u_channels)[:, None] * s_u_d + p[None, :] * s_u_l
        u = tl.load(u_at, mask=mask, other=0.0).to(tl.float32)
        delta_row = delta_ptr + b * s_dt_b + d[:, None] * s_dt_d
        dt, dt_raw = _load_delta(delta_row + p[None, :] * s_dt_l, mask, bias, HAS_BIAS, SOFTPLUS)
        # a_{t+1}: the next step's decay (1 past the end, where delta is 0).
        next_mask = d_mask[:, None] & (t + 1 < L)[None, :]
        p_next = _positions(t + 1, direction, height, width, L, CROSS)
        dt_next, _ = _load_delta(delta_row + p_next[None, :] * s_dt_l, next_mask, bias, HAS_BIAS, SOFTPLUS)
        decay = tl.exp2(dt[:, None, :] * A2[:, :, None])
        decay_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
        if B_FIXED:
            Bt = B_fix[:, :, None]
        else:
            Bt = tl.load(B_row + n[:, None] * s_B_n + p[None, :] * s_B_l, mask=nt_mask, other=0.0)
            Bt = Bt.to(tl.float32)[None, :, :]
        if C_FIXED:
            Ct = C_fix[:, :, None]
        else:
            Ct = tl.load(C_row + n[:, None] * s_C_n + p[None, :] * s_C_l, mask=nt_mask, other=0.0)
            Ct = Ct.to(tl.float32)[None, :, :]

        # Recompute the chunk's states from its saved start.
        h0 = tl.load(st_base + c * s_st_c, mask=dn_mask, other=0.0)
        drive = (dt * u)[:, None, :] * Bt
        a_cum, b_cum = tl.associative_scan((decay, drive), axis=2, combine_fn=_first_order_combine)
        hs = a_cum * h0[:, :, None] + b_cum

        dout = tl.load(dout_ptr + b * s_do_b + d[:, None] * s_do_d + p[None, :] * s_do_l, mask=mask, other=0.0)
        dout = dout.to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + b * s_z_b + d[:, None] * s_z_d + p[None, :] * s_z_l, mask=mask, other=0.0)
            z = z.to(tl.float32)
            sig = tl.sigmoid(z)
            y = tl.sum(hs * Ct, axis=1)
            if HAS_D:
                y += u * skip[:, None]
            dz = dout * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dz_ptr + b * s_g_b + d[:, None] * s_g_d + p[None, :] * s_g_l, dz, mask=mask)
            dy = dout * z * sig
        else:
            dy = dout
        du = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
        if HAS_D:
            dD_acc += tl.sum(dy * u, axis=1)
            du = dy * skip[:, None]

        # The adjoint, backwards through the chunk.
        g_a, g_b = tl.associative_scan((decay_next, dy[:, None, :] * Ct), axis=2,
                                       combine_fn=_first_order_combine, reverse=True)
        g = g_a * g_carry[:, :, None] + g_b
        g_carry = tl.sum(tl.where(first_step, g, 0.0), axis=2)

        decayed_prev = hs - drive  # a_t * h_{t-1}
        g_decayed = g * decayed_prev
        gB = g * Bt
        ddt = tl.sum(gB, axis=1) * u + tl.sum(g_decayed * A[:, :, None], axis=1)
        dA_acc += tl.sum(g_decayed * dt[:, None, :], axis=2)
        du += tl.sum(gB, axis=1) * dt
        dtu = dt * u
        if B_FIXED:
            dB_fix_acc += tl.sum(g * dtu[:, None, :], axis=2)
        else:
            tl.atomic_add(dB_row + n[:, None] * s_dB_n + p[None, :] * s_dB_l, tl.sum(g * dtu[:, None, :], axis=0),
                          mask=nt_mask)
        if C_FIXED:
            dC_fix_acc += tl.sum(hs * dy[:, None, :], axis=2)
        else:
            tl.atomic_add(dC_row + n[:, None] * s_dC_n + p[None, :] * s_dC_l, tl.sum(hs * dy[:, None, :], axis=0),
                          mask=nt_mask)
        if SOFTPLUS:
            ddt = tl.where(dt_raw > SOFTPLUS_THRESHOLD, ddt, ddt * tl.sigmoid(dt_raw))
        ddt = tl.where(mask, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(ddelta_ptr + b * s_g_b + d[:, None] * s_g_d + p[None, :] * s_g_l, ddt, mask=mask)
        tl.store(du_ptr + b * s_g_b + d[:, None] * s_g_d + p[None, :] * s_g_l, du, mask=mask)

    pc_dn = per_channel[:, None] * N + n[None, :]
    tl.store(dA_ptr + pc_dn, dA_acc, mask=dn_mask)
    if B_FIXED:
        tl.store(dB_ptr + pc_dn, dB_fix_acc, mask=dn_mask)
    if C_FIXED:
        tl.store(dC_ptr + pc_dn, dC_fix_acc, mask=dn_mask)
    if HAS_D:
        tl.store(dD_ptr + per_channel, dD_acc, mask=d_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + per_channel, dbias_acc, mask=d_mask)
