"""longattn's numpy (CPU) functions against a numpy f64 reference written from semantics.md."""

import numpy as np
import pytest

import longattn

RTOL = 1e-5


def rel_l2(got, want):
    got = np.asarray(got, dtype=np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def visible(sq, sk, left, right, causal, sinks=0):
    """FA2 window (left, right), -1 unbounded, bottom-right aligned; causal sets
    right = min(right, 0); sinks: j < sinks also visible but never right of the window."""
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    diag = i + sk - sq
    right_ok = np.ones((sq, sk), bool) if right < 0 else (j <= diag + right)
    left_ok = np.ones((sq, sk), bool) if left < 0 else (j >= diag - left)
    return right_ok & (left_ok | (j < sinks))


def attend(q, k, v, mask, scale, softcap):
    """q (sq, d), k/v (sk, d), mask (sq, sk) bool -> (sq, d); empty rows give 0."""
    s = (q @ k.T) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(mask, np.exp(s - m), 0.0)
    l = p.sum(axis=1, keepdims=True)
    return np.where(l > 0, (p @ v) / np.where(l > 0, l, 1.0), 0.0)


def ref_dense(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=None, sinks=0):
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(d) if scale is None else scale
    mask = visible(sq, sk, window[0], window[1], causal, sinks)
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            g = h // (hq // hkv)
            out[bi, :, h] = attend(q[bi, :, h], k[bi, :, g], v[bi, :, g], mask, scale, softcap)
    return out


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


SHAPES = [  # b, sq, sk, hq, hkv, d
    (2, 5, 9, 4, 2, 16),
    (1, 9, 5, 2, 2, 8),
    (2, 33, 40, 6, 1, 32),
]
MASKS = [  # causal, window, softcap, sinks
    (False, (-1, -1), None, 0),
    (True, (-1, -1), None, 0),
    (True, (0, -1), None, 0),  # W = 1 (causal composes: right becomes 0)
    (True, (1, -1), None, 0),  # W = 2
    (False, (3, 2), None, 0),
    (False, (2, 0), 0.5, 0),
    (True, (2, -1), None, 2),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", MASKS)
def test_dense(shape, mask):
    b, sq, sk, hq, hkv, d = shape
    causal, window, softcap, sinks = mask
    rng = np.random.default_rng(sum(shape))
    q, k, v = rand(rng, b, sq, hq, d), rand(rng, b, sk, hkv, d), rand(rng, b, sk, hkv, d)
    got = longattn.dense(q, k, v, scale=0.3, causal=causal, window=window, softcap=softcap,
                         sinks=sinks)
    assert got.shape == q.shape and got.dtype == np.float32
    want = ref_dense(q, k, v, 0.3, causal, window, softcap, sinks)
    assert rel_l2(got, want) < RTOL


def test_dense_lse_default_scale_and_views():
    rng = np.random.default_rng(7)
    q = rand(rng, 2, 4, 6, 16).transpose(0, 2, 1, 3)  # (2, 6, 4, 16), not contiguous
    k, v = rand(rng, 2, 8, 2, 16), rand(rng, 2, 8, 2, 16)
    out, lse = longattn.dense(q, k, v, causal=True, return_lse=True)
    assert rel_l2(out, ref_dense(q, k, v, causal=True)) < RTOL
    assert lse.shape == (2, 4, 6)
    # LSE: natural log of the sum of exp(scores) over the visible keys.
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    mask = visible(6, 8, -1, 0, True)
    s = np.einsum("bihd,bjhd->bhij", q64, np.repeat(k64, 2, axis=2)) / 4.0
    want = np.log(np.where(mask, np.exp(s), 0).sum(-1))
    assert np.allclose(lse, want, rtol=1e-5, atol=1e-5)


def test_dense_float16():
    rng = np.random.default_rng(3)
    q, k, v = (rand(rng, 1, 12, 4, 32).astype(np.float16),
               rand(rng, 1, 20, 2, 32).astype(np.float16),
               rand(rng, 1, 20, 2, 32).astype(np.float16))
    got = longattn.dense(q, k, v, causal=True, window=(4, 0))
    assert got.dtype == np.float16
    assert rel_l2(got, ref_dense(q, k, v, causal=True, window=(4, 0))) < 1e-2


def test_dense_varlen():
    rng = np.random.default_rng(11)
    hq, hkv, d = 4, 2, 8
    cu_q = np.array([0, 3, 8, 8, 17], np.int32)
    cu_k = np.array([0, 5, 5, 9, 29], np.int32)
    q, k, v = rand(rng, 17, hq, d), rand(rng, 29, hkv, d), rand(rng, 29, hkv, d)
    for causal, window in [(False, (-1, -1)), (True, (-1, -1)), (True, (2, -1)), (False, (1, 1))]:
        got = longattn.dense_varlen(q, k, v, cu_q, cu_k, scale=0.4, causal=causal, window=window)
        want = np.zeros((17, hq, d))
        for s in range(4):
            qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
            want[qs] = ref_dense(q[None, qs], k[None, ks], v[None, ks], 0.4, causal, window)[0]
        assert rel_l2(got, want) < RTOL
    # Sequence 1 has no keys: its rows are 0, never NaN.
    got = longattn.dense_varlen(q, k, v, cu_q, cu_k, causal=True)
    assert np.all(got[3:8] == 0)


def paged_cache(rng, lens, hkv, d, page=4, num_pages=12, max_pages=4):
    """Random sequences of `lens` tokens scattered into shuffled pages: the caches, the
    block table, seqlens_k and each sequence's dense (len, hkv, d) K and V."""
    b = len(lens)
    perm = rng.permutation(num_pages)
    k_cache = np.zeros((num_pages, page, hkv, d), np.float32)
    v_cache = np.zeros_like(k_cache)
    table = np.full((b, max_pages), -1, np.int32)
    ks, vs, nxt = [], [], 0
    for s, n in enumerate(lens):
        kd, vd = rand(rng, n, hkv, d), rand(rng, n, hkv, d)
        ks.append(kd)
        vs.append(vd)
        for t in range(n):
            if t % page == 0:
                table[s, t // page] = perm[nxt]
                nxt += 1
            k_cache[table[s, t // page], t % page] = kd[t]
            v_cache[table[s, t // page], t % page] = vd[t]
    return k_cache, v_cache, table, np.array(lens, np.int32), ks, vs


def test_paged_prefill():
    rng = np.random.default_rng(6)
    hq, hkv, d = 4, 2, 16
    lens = [9, 3, 14]
    k_cache, v_cache, table, seqlens, ks, vs = paged_cache(rng, lens, hkv, d)
    q = rand(rng, 3, 5, hq, d)  # 5 new tokens each (sequence 1 holds only 3: dense's rule)
    cu = np.array([0, 5, 5, 9], np.int32)  # packed: 5, 0 and 4 new tokens
    qp = rand(rng, 9, hq, d)
    for causal, window, softcap in [(True, (-1, -1), None), (False, (-1, -1), None),
                                    (True, (2, -1), 0.7), (False, (3, 2), None)]:
        opts = dict(scale=0.25, causal=causal, window=window, softcap=softcap)
        got = longattn.paged_prefill(q, k_cache, v_cache, table, seqlens, **opts)
        for s in range(3):
            want = ref_dense(q[s:s + 1], ks[s][None], vs[s][None], 0.25, causal, window, softcap)
            assert rel_l2(got[s:s + 1], want) < RTOL, (s, opts)
        got = longattn.paged_prefill(qp, k_cache, v_cache, table, seqlens, cu_seqlens_q=cu, **opts)
        assert got.shape == qp.shape
        for s in (0, 2):
            rows = slice(cu[s], cu[s + 1])
            want = ref_dense(qp[rows][None], ks[s][None], vs[s][None], 0.25, causal, window,
                             softcap)
            assert rel_l2(got[rows][None], want) < RTOL, (s, opts)
    with pytest.raises(ValueError):  # the packed rows must end where the offsets do
        longattn.paged_prefill(qp[:8], k_cache, v_cache, table, seqlens, cu_seqlens_q=cu)
    with pytest.raises(ValueError):  # one row of block_table per sequence
        longattn.paged_prefill(q[:2], k_cache, v_cache, table, seqlens)


def test_paged_decode():
    rng = np.random.default_rng(5)
    b, q_len, hq, hkv, d, page = 3, 2, 4, 2, 16, 4
    lens = [9, 1, 14]
    k_cache, v_cache, table, seqlens, ks, vs = paged_cache(rng, lens, hkv, d, page)
    q = rand(rng, b, q_len, hq, d)
    for window_left, softcap in [(-1, None), (2, None), (0, 0.8)]:
        got = longattn.paged_decode(q, k_cache, v_cache, table, seqlens, scale=0.25,
                                    window_left=window_left, softcap=softcap)
        for s in range(b):
            want = ref_dense(q[s:s + 1], ks[s][None], vs[s][None], 0.25, True,
                             (window_left, 0), softcap)
            assert rel_l2(got[s:s + 1], want) < RTOL


def e4m3_values():
    """Values of the 256 e4m3 codes (OCP e4m3fn), from the format's definition."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    e, m = (codes >> 3) & 0xF, (codes & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    mag = np.where((codes & 0x7F) == 0x7F, np.nan, mag)
    return sign * mag


def test_fp8_quantize_is_nearest_even_with_saturation():
    vals = e4m3_values()
    finite = [(c, vals[c]) for c in range(0x7F)]  # non-negative, ascending
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 100, 2000), [0.0, 448.0, 464.0, 500.0, 1e30, 2.0 ** -10,
                                                  2.0 ** -9, 3 * 2.0 ** -11]]).astype(np.float32)
    scale = 0.5
    got = longattn.fp8_quantize(x, scale)
    assert got.dtype == np.uint8 and got.shape == x.shape
    for xi, gi in zip(x, got):
        a = abs(float(xi) / scale)
        # Nearest finite code, ties to the even code; beyond 448 the nearest is 448.
        best = 0x7E if a > 448 else min(finite, key=lambda cv: (abs(cv[1] - a), cv[0] % 2))[0]
        want = best | (0x80 if np.signbit(xi) else 0)
        assert gi == want, (xi, gi, want)


def test_paged_decode_fp8_cache():
    rng = np.random.default_rng(8)
    num_pages, page, hkv, d, hq, b, q_len = 6, 4, 2, 8, 4, 2, 2
    k = rng.standard_normal((num_pages, page, hkv, d)).astype(np.float32)
    v = rng.standard_normal((num_pages, page, hkv, d)).astype(np.float32)
    k_scales, v_scales = [0.01, 0.004], [0.008, 0.02]
    # Quantize per kv head, as the cache stores it.
    k8 = np.stack([longattn.fp8_quantize(np.ascontiguousarray(k[:, :, h]), k_scales[h])
                   for h in range(hkv)], axis=2)
    v8 = np.stack([longattn.fp8_quantize(np.ascontiguousarray(v[:, :, h]), v_scales[h])
                   for h in range(hkv)], axis=2)
    vals = e4m3_values()
    kd = vals[k8] * np.array(k_scales)[None, None, :, None]
    vd = vals[v8] * np.array(v_scales)[None, None, :, None]
    table = np.array([[4, 1, 3], [0, 5, 2]], np.int32)
    lens = [10, 7]
    q = rand(rng, b, q_len, hq, d)
    got = longattn.paged_decode(q, k8, v8, table, np.array(lens, np.int32), scale=0.3,
                                k_scales=k_scales, v_scales=v_scales)
    for s in range(b):
        pages = [table[s, t // page] for t in range(lens[s])]
        ks = np.stack([kd[p, t % page] for t, p in enumerate(pages)])
        vs = np.stack([vd[p, t % page] for t, p in enumerate(pages)])
        want = ref_dense(q[s:s + 1], ks[None], vs[None], 0.3, True)
        assert rel_l2(got[s:s + 1], want) < RTOL
    with pytest.raises(ValueError):
        longattn.paged_decode(q, k8, v8, table, np.array(lens, np.int32), k_scales=k_scales)
    with pytest.raises(ValueError):
        longattn.fp8_quantize(k, 0.0)


def ref_neighborhood_1d(q, k, v, kernel, dilation, causal, scale):
    """NATTEN 1-D windows per semantics.md, then dense attention over the neighborhood."""
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    mask = np.zeros((n, n), bool)
    for x in range(n):
        g, i = x % dilation, x // dilation
        lg = -(-(n - g) // dilation)
        if causal:
            start, end = max(i - kernel + 1, 0), i + 1
        else:
            left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
            start = max(i - left, 0) + (lg - right - i - 1 if i + right >= lg else 0)
            end = start + kernel
        for j in range(start, end):
            mask[x, j * dilation + g] = True
    q64, k64, v64 = (t.astype(np.float64) for t in (q, k, v))
    out = np.zeros_like(q64)
    for bi in range(b):
        for h in range(hq):
            g = h // (hq // hkv)
            out[bi, :, h] = attend(q64[bi, :, h], k64[bi, :, g], v64[bi, :, g], mask, scale, None)
    return out


@pytest.mark.parametrize("kernel,dilation,causal", [(3, 1, False), (4, 1, False), (3, 2, False),
                                                     (5, 1, True), (2, 3, True), (13, 1, False)])
def test_neighborhood_1d(kernel, dilation, causal):
    rng = np.random.default_rng(kernel * 10 + dilation)
    q, k, v = rand(rng, 2, 13, 4, 8), rand(rng, 2, 13, 2, 8), rand(rng, 2, 13, 2, 8)
    got = longattn.neighborhood(q, k, v, kernel, dilation=dilation, causal=causal, scale=0.5)
    want = ref_neighborhood_1d(q, k, v, kernel, dilation, causal, 0.5)
    assert rel_l2(got, want) < RTOL


def test_neighborhood_2d_full_is_dense():
    # kernel = grid size, no dilation, not causal: full self-attention over the grid.
    rng = np.random.default_rng(9)
    q, k, v = rand(rng, 1, 4, 5, 2, 8), rand(rng, 1, 4, 5, 2, 8), rand(rng, 1, 4, 5, 2, 8)
    got = longattn.neighborhood(q, k, v, (4, 5))
    want = ref_dense(q.reshape(1, 20, 2, 8), k.reshape(1, 20, 2, 8), v.reshape(1, 20, 2, 8))
    assert rel_l2(got.reshape(1, 20, 2, 8), want) < RTOL


def ref_block_sparse(q, k, v, offsets, indices, full, block_m, block_n, mask_batch=1,
                     mask_heads=1, scale=None, causal=False, window=(-1, -1), softcap=None,
                     sinks=0):
    """Key j is visible to row i iff its key block is listed for i's query block (list
    (batch, head, query block), row-major; a mask dim of 1 broadcasts) and the block is Full
    or the element mask (window, causal, sinks) shows (i, j)."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(d) if scale is None else scale
    nq = -(-sq // block_m)
    elem = visible(sq, sk, window[0], window[1], causal, sinks)
    full = np.zeros(len(indices), bool) if full is None else full
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            first = ((bi if mask_batch > 1 else 0) * mask_heads + (h if mask_heads > 1 else 0)) * nq
            mask = np.zeros((sq, sk), bool)
            for i in range(sq):
                lst = first + i // block_m
                for e in range(offsets[lst], offsets[lst + 1]):
                    keys = slice(indices[e] * block_n, (indices[e] + 1) * block_n)
                    mask[i, keys] = True if full[e] else elem[i, keys]
            g = h // (hq // hkv)
            out[bi, :, h] = attend(q[bi, :, h], k[bi, :, g], v[bi, :, g], mask, scale, softcap)
    return out


def csr_mask(rng, lists, num_k_blocks):
    """A random CSR block mask: each key block of each list skipped, Full or Partial."""
    offsets, indices, full = [0], [], []
    for _ in range(lists):
        for kb in range(num_k_blocks):
            r = rng.random()
            if r >= 0.4:
                indices.append(kb)
                full.append(r >= 0.75)
        offsets.append(len(indices))
    return np.array(offsets, np.int32), np.array(indices, np.int32), np.array(full, bool)


@pytest.mark.parametrize("mask_shape", [(1, 1), (2, 4), (1, 4)])
@pytest.mark.parametrize("mask", MASKS)
def test_block_sparse(mask_shape, mask):
    # Odd lengths: the last query block (8 rows) and key block (16 keys) are short.
    b, sq, sk, hq, hkv, d, bm, bn = 2, 37, 45, 4, 2, 16, 8, 16
    causal, window, softcap, sinks = mask
    mb, mh = mask_shape
    rng = np.random.default_rng(mb * 10 + mh)
    q, k, v = rand(rng, b, sq, hq, d), rand(rng, b, sk, hkv, d), rand(rng, b, sk, hkv, d)
    offsets, indices, full = csr_mask(rng, mb * mh * -(-sq // bm), -(-sk // bn))
    opts = dict(scale=0.3, causal=causal, window=window, softcap=softcap, sinks=sinks)
    got = longattn.block_sparse(q, k, v, offsets, indices, full=full, block_m=bm, block_n=bn,
                                mask_batch=mb, mask_heads=mh, **opts)
    assert got.shape == q.shape and got.dtype == np.float32
    want = ref_block_sparse(q, k, v, offsets, indices, full, bm, bn, mb, mh, **opts)
    assert rel_l2(got, want) < RTOL
    # float16 in, float16 out, against the reference of the rounded inputs.
    qh, kh, vh = (x.astype(np.float16) for x in (q, k, v))
    got = longattn.block_sparse(qh, kh, vh, offsets, indices, full=full, block_m=bm, block_n=bn,
                                mask_batch=mb, mask_heads=mh, **opts)
    assert got.dtype == np.float16
    want = ref_block_sparse(qh, kh, vh, offsets, indices, full, bm, bn, mb, mh, **opts)
    assert rel_l2(got, want) < 1e-2


@pytest.mark.parametrize("mask", MASKS)
def test_block_sparse_with_an_equivalent_mask_is_dense(mask):
    # The blocks the element mask shows at all, Full where it shows all of them (as the
    # pattern constructors mark them): the output and LSE of dense.
    b, sq, sk, hq, hkv, d, bm, bn = 2, 33, 40, 6, 1, 32, 8, 8
    causal, window, softcap, sinks = mask
    rng = np.random.default_rng(17)
    q, k, v = rand(rng, b, sq, hq, d), rand(rng, b, sk, hkv, d), rand(rng, b, sk, hkv, d)
    elem = visible(sq, sk, window[0], window[1], causal, sinks)
    offsets, indices, full = [0], [], []
    for qb in range(-(-sq // bm)):
        for kb in range(-(-sk // bn)):
            blk = elem[qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn]
            if blk.any():
                indices.append(kb)
                full.append(bool(blk.all()))
        offsets.append(len(indices))
    offsets, indices, full = (np.array(offsets, np.int32), np.array(indices, np.int32),
                              np.array(full, bool))
    opts = dict(scale=0.3, causal=causal, window=window, softcap=softcap, sinks=sinks,
                return_lse=True)
    got, lse = longattn.block_sparse(q, k, v, offsets, indices, full=full, block_m=bm,
                                     block_n=bn, **opts)
    want, want_lse = longattn.dense(q, k, v, **opts)
    assert rel_l2(got, want) < 1e-6
    assert np.allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
    # Every key block listed Partial (no `full`): dense attention too.
    nq, nk = -(-sq // bm), -(-sk // bn)
    every = np.tile(np.arange(nk, dtype=np.int32), nq)
    got, _ = longattn.block_sparse(q, k, v, np.arange(nq + 1, dtype=np.int32) * nk, every,
                                   block_m=bm, block_n=bn, **opts)
    assert rel_l2(got, want) < 1e-6


def test_block_sparse_bad_masks_raise():
    rng = np.random.default_rng(2)
    q, k, v = rand(rng, 1, 9, 2, 8), rand(rng, 1, 12, 1, 8), rand(rng, 1, 12, 1, 8)
    i32 = lambda *x: np.array(x, np.int32)  # noqa: E731

    def call(offsets, indices, **kw):
        return longattn.block_sparse(q, k, v, offsets, indices, **{"block_m": 4, "block_n": 4,
                                                                   **kw})

    assert call(i32(0, 1, 2, 3), i32(0, 1, 2)).shape == q.shape
    bad = [
        (i32(0, 2, 2, 3), i32(1, 0, 2), {}),  # unsorted list
        (i32(0, 2, 2, 3), i32(1, 1, 2), {}),  # a block listed twice
        (i32(0, 1, 2, 3), i32(0, 1, 3), {}),  # key block 3 of 3
        (i32(0, 1, 2), i32(0, 1), {}),  # 2 lists for 3 query blocks
        (i32(0, 1, 2, 2), i32(0, 1, 2), {}),  # offsets end before the indices
        (i32(0, 1, 2, 3), i32(0, 1, 2), {"mask_heads": 3}),  # 3 heads for 2
        (i32(0, 1, 2, 3), i32(0, 1, 2), {"full": np.array([True])}),  # one flag per index
        (i32(0, 1, 2, 3), i32(0, 1, 2), {"block_m": 0}),
    ]
    for offsets, indices, kw in bad:
        with pytest.raises(ValueError):
            call(offsets, indices, **kw)
    with pytest.raises(TypeError):
        call(np.array([0, 1, 2, 3]), i32(0, 1, 2))  # int64 offsets
    with pytest.raises(TypeError):
        call(i32(0, 1, 2, 3), i32(0, 1, 2), full=np.ones(3, np.int32))


def test_bad_inputs_raise():
    rng = np.random.default_rng(1)
    q, k, v = rand(rng, 1, 4, 4, 8), rand(rng, 1, 6, 3, 8), rand(rng, 1, 6, 3, 8)
    with pytest.raises(ValueError):
        longattn.dense(q, k, v)  # 4 heads over 3 kv heads
    with pytest.raises(ValueError):
        longattn.dense(q, k[:, :, :2], v)  # k and v differ
    with pytest.raises(ValueError):
        longattn.dense(q, k[:, :, :2], v[:, :, :2], window=(-2, 0))
    with pytest.raises(TypeError):
        longattn.dense(q, k[:, :, :2].astype(np.float64), v[:, :, :2])
    with pytest.raises(ValueError):
        longattn.dense_varlen(q[0], k[0, :, :2], v[0, :, :2], np.array([0, 9], np.int32),
                              np.array([0, 6], np.int32))
    with pytest.raises(TypeError):
        longattn.dense_cuda(q, k, v, q)  # numpy arrays are not CUDA tensors


def test_cuda_functions_refuse_host_arrays_and_unsupported_dtypes():
    # Host memory through DLPack (numpy's __dlpack__): refused by device, before any stream use.
    q = np.zeros((1, 4, 2, 8), np.float16)
    with pytest.raises(TypeError, match="DLPack device type 1"):
        longattn.dense_cuda(q, q, q, q)

    class Interface:  # a CUDA array interface of float32: the GPU kernels are half-precision
        __cuda_array_interface__ = {"data": (0, False), "shape": (1, 4, 2, 8), "typestr": "<f4",
                                    "version": 3}

    x = Interface()
    with pytest.raises(TypeError, match="float16"):
        longattn.dense_cuda(x, x, x, x)
    with pytest.raises(TypeError, match="no __cuda_array_interface__ or __dlpack__"):
        longattn.paged_decode_cuda([0.0], [0.0], [0.0], [0.0], [[0]], [1])
    with pytest.raises(TypeError, match="DLPack device type 1"):
        longattn.neighborhood_cuda(q, q, q, q, 3)
    with pytest.raises(TypeError, match="float16"):
        longattn.block_sparse_cuda(x, x, x, x, [0, 0], [])

    class Half:  # float16 CUDA array interfaces: refused by the checks, before any CUDA call
        def __init__(self, shape, strides=None):
            self.__cuda_array_interface__ = {"data": (0, False), "shape": shape,
                                             "typestr": "<f2", "version": 3, "strides": strides}

    grid = Half((1, 5, 6, 2, 8))
    # (1, 6, 5, 2, 8) with the grid dims swapped: no single token axis (strides in bytes).
    swapped = Half((1, 5, 6, 2, 8), tuple(2 * s for s in (480, 16, 80, 8, 1)))
    with pytest.raises(ValueError, match="flatten"):
        longattn.neighborhood_cuda(swapped, grid, grid, grid, 3)
    with pytest.raises(ValueError):  # kernel 7 on a grid dim of 5
        longattn.neighborhood_cuda(grid, grid, grid, grid, 7)
    h = Half((1, 130, 2, 64))  # 3 query and 3 key blocks of 64
    with pytest.raises(ValueError, match="not sorted"):
        longattn.block_sparse_cuda(h, h, h, h, [0, 2, 2, 2], [1, 0], block_m=64, block_n=64)


def appended_cache(rng, lens_steps, hkv, d, page=4, num_pages=16, max_pages=6, dtype=np.float32,
                   meta=True):
    """Sequences grown by `paged_append` in steps: `lens_steps[t][s]` new tokens of sequence s
    at step t, into shuffled pages. Returns the caches, kmin/kmax (or None), the table,
    seqlens_k and each sequence's dense (len, hkv, d) K and V (float32, as appended)."""
    b = len(lens_steps[0])
    perm = rng.permutation(num_pages)
    k_cache = np.zeros((num_pages, page, hkv, d), dtype)
    v_cache = np.zeros_like(k_cache)
    kmin = np.zeros((num_pages, hkv, d), dtype) if meta else None
    kmax = np.zeros_like(kmin) if meta else None
    total = [sum(step[s] for step in lens_steps) for s in range(b)]
    table = np.full((b, max_pages), -1, np.int32)
    nxt = 0
    for s in range(b):
        for lp in range(-(-total[s] // page)):
            table[s, lp] = perm[nxt]
            nxt += 1
    seqlens = np.zeros(b, np.int32)
    ks, vs = [np.zeros((0, hkv, d), np.float32)] * b, [np.zeros((0, hkv, d), np.float32)] * b
    for step in lens_steps:
        cu = np.concatenate([[0], np.cumsum(step)]).astype(np.int32)
        k_new = rand(rng, int(cu[-1]), hkv, d).astype(dtype)
        v_new = rand(rng, int(cu[-1]), hkv, d).astype(dtype)
        seqlens = seqlens + np.array(step, np.int32)  # seqlens_k counts the new tokens
        longattn.paged_append(k_new, v_new, k_cache, v_cache, table, seqlens, cu, kmin=kmin,
                              kmax=kmax)
        ks = [np.concatenate([ks[s], k_new[cu[s]:cu[s + 1]].astype(np.float32)]) for s in range(b)]
        vs = [np.concatenate([vs[s], v_new[cu[s]:cu[s + 1]].astype(np.float32)]) for s in range(b)]
    return k_cache, v_cache, kmin, kmax, table, seqlens, ks, vs


STEPS = [[9, 0, 3], [1, 2, 1], [1, 1, 4]]  # prefill-like, then decode steps across pages


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_paged_append_then_decode_is_dense(dtype):
    rng = np.random.default_rng(21)
    hq, hkv, d, page = 4, 2, 16, 4
    k_cache, v_cache, kmin, kmax, table, seqlens, ks, vs = appended_cache(
        rng, STEPS, hkv, d, page, dtype=dtype)
    assert list(seqlens) == [11, 3, 8]
    q = rand(rng, 3, 2, hq, d).astype(dtype)
    got = longattn.paged_decode(q, k_cache, v_cache, table, seqlens, scale=0.25)
    for s in range(3):
        want = ref_dense(q[s:s + 1], ks[s][None], vs[s][None], 0.25, True)
        assert rel_l2(got[s:s + 1], want) < (RTOL if dtype == np.float32 else 1e-2)
    # The bounds: per channel, min/max of each page's stored keys (exact: they are stored).
    for s in range(3):
        for lp in range(-(-int(seqlens[s]) // page)):
            keys = ks[s][lp * page:(lp + 1) * page].astype(dtype)
            assert np.array_equal(kmin[table[s, lp]], keys.min(axis=0))
            assert np.array_equal(kmax[table[s, lp]], keys.max(axis=0))


def test_paged_append_and_decode_on_strided_views():
    """Arrays that are not C-contiguous (views into wider buffers) go through a copy written
    back: the same caches, bounds and decode as contiguous arrays, the buffers' other halves
    untouched."""
    rng = np.random.default_rng(23)
    hq, hkv, d, page, pages = 4, 2, 8, 4, 8
    table = np.array([[3, 5, -1], [0, 6, 2]], np.int32)
    seqlens = np.array([6, 9], np.int32)
    cu = np.array([0, 6, 15], np.int32)
    k_new, v_new = rand(rng, 15, hkv, d), rand(rng, 15, hkv, d)
    wide = [np.full((pages, page, hkv, 2 * d), 7.0, np.float32) for _ in range(2)]
    wide_meta = [np.full((pages, hkv, 2 * d), 7.0, np.float32) for _ in range(2)]
    views = [w[..., :d] for w in wide] + [w[..., :d] for w in wide_meta]
    flat = [np.zeros((pages, page, hkv, d), np.float32) for _ in range(2)] + \
        [np.zeros((pages, hkv, d), np.float32) for _ in range(2)]
    for x in views:
        assert not x.flags.c_contiguous
        x[...] = 0.0
    for k_c, v_c, lo, hi in (views, flat):
        longattn.paged_append(k_new, v_new, k_c, v_c, table, seqlens, cu, kmin=lo, kmax=hi)
    for got, want in zip(views, flat):
        assert np.array_equal(got, want)
    for w in wide + wide_meta:
        assert (w[..., d:] == 7.0).all()
    q = rand(rng, 2, 1, hq, d)
    kw = dict(policy="quest", quest_budget=4, kmin=views[2], kmax=views[3])
    got = longattn.paged_decode(q, views[0], views[1], table, seqlens, **kw)
    kw.update(kmin=flat[2], kmax=flat[3])
    want = longattn.paged_decode(q, flat[0], flat[1], table, seqlens, **kw)
    assert np.array_equal(got, want)


def test_paged_append_slot_zero_restarts_a_reused_page():
    rng = np.random.default_rng(22)
    hkv, d, page = 1, 8, 4
    k_cache = np.full((2, page, hkv, d), 100.0, np.float32)  # a previous owner's keys
    v_cache = np.zeros_like(k_cache)
    kmin, kmax = np.full((2, hkv, d), -100.0, np.float32), np.full((2, hkv, d), 100.0, np.float32)
    table = np.array([[1, 0]], np.int32)
    k_new, v_new = rand(rng, 2, hkv, d), rand(rng, 2, hkv, d)
    longattn.paged_append(k_new, v_new, k_cache, v_cache, table, np.array([2], np.int32),
                          np.array([0, 2], np.int32), kmin=kmin, kmax=kmax)
    assert np.array_equal(k_cache[1, :2], k_new) and np.array_equal(v_cache[1, :2], v_new)
    assert np.all(k_cache[1, 2:] == 100.0) and np.all(k_cache[0] == 100.0)  # untouched
    assert np.array_equal(kmin[1], k_new.min(axis=0)) and np.array_equal(kmax[1], k_new.max(0))
    assert np.all(kmin[0] == -100.0)
    # A later append (not slot 0) widens the page's bounds.
    k2 = np.full((1, hkv, d), 7.0, np.float32)
    longattn.paged_append(k2, k2, k_cache, v_cache, table, np.array([3], np.int32),
                          np.array([0, 1], np.int32), kmin=kmin, kmax=kmax)
    assert np.array_equal(kmax[1], np.full((hkv, d), 7.0)) and np.array_equal(kmin[1],
                                                                                 k_new.min(0))


def test_paged_append_fp8_codes_and_decode():
    rng = np.random.default_rng(23)
    hq, hkv, d, page, num_pages = 4, 2, 8, 4, 6
    k_scales, v_scales = [0.01, 0.004], [0.008, 0.02]
    k_cache = np.zeros((num_pages, page, hkv, d), np.uint8)
    v_cache = np.zeros_like(k_cache)
    kmin, kmax = np.zeros((num_pages, hkv, d), np.uint8), np.zeros((num_pages, hkv, d), np.uint8)
    table = np.array([[4, 1, 3], [0, 5, 2]], np.int32)
    lens, cu = np.array([10, 7], np.int32), np.array([0, 10, 17], np.int32)
    k_new, v_new = rand(rng, 17, hkv, d), rand(rng, 17, hkv, d)
    longattn.paged_append(k_new, v_new, k_cache, v_cache, table, lens, cu, kmin=kmin, kmax=kmax,
                          k_scales=k_scales, v_scales=v_scales)
    vals = e4m3_values()
    for s in range(2):
        for t in range(lens[s]):
            p, slot, row = table[s, t // page], t % page, cu[s] + t
            for h in range(hkv):
                assert np.array_equal(k_cache[p, slot, h],
                                      longattn.fp8_quantize(k_new[row, h], k_scales[h]))
                assert np.array_equal(v_cache[p, slot, h],
                                      longattn.fp8_quantize(v_new[row, h], v_scales[h]))
        for lp in range(-(-int(lens[s]) // page)):
            stored = vals[k_cache[table[s, lp], :min(page, lens[s] - lp * page)]]
            assert np.array_equal(vals[kmin[table[s, lp]]], stored.min(axis=0))
            assert np.array_equal(vals[kmax[table[s, lp]]], stored.max(axis=0))
    q = rand(rng, 2, 1, hq, d)
    got = longattn.paged_decode(q, k_cache, v_cache, table, lens, scale=0.3, k_scales=k_scales,
                                v_scales=v_scales)
    sk, sv = np.array(k_scales)[None, :, None], np.array(v_scales)[None, :, None]
    for s in range(2):
        rows = slice(cu[s], cu[s + 1])
        kd = np.stack([vals[longattn.fp8_quantize(k_new[rows, h], k_scales[h])]
                       for h in range(hkv)], axis=1) * sk
        vd = np.stack([vals[longattn.fp8_quantize(v_new[rows, h], v_scales[h])]
                       for h in range(hkv)], axis=1) * sv
        want = ref_dense(q[s:s + 1], kd[None], vd[None], 0.3, True)
        assert rel_l2(got[s:s + 1], want) < RTOL
        # Quest over the FP8 bounds (codes; the scores scale by the K scale).
        got_q = longattn.paged_decode(q[s:s + 1], k_cache, v_cache, table[s:s + 1], lens[s:s + 1],
                                      scale=0.3, k_scales=k_scales, v_scales=v_scales,
                                      policy="quest", quest_budget=8, kmin=kmin, kmax=kmax)
        pages = table[s, :-(-int(lens[s]) // page)]
        bounds = (vals[kmin[pages]] * sk, vals[kmax[pages]] * sk)
        want = ref_policy_decode(q[s], kd, vd, ["quest"] * hkv, 0.3, page, quest=(8, 0),
                                 bounds=bounds)
        assert rel_l2(got_q[0], want) < RTOL


def ref_policy_decode(q, ks, vs, heads, scale, page, streaming=(4, 1024), quest=None, bounds=None):
    """Decode of one sequence (`q (q_len, hq, d)`, `ks, vs (sk, hkv, d)`) with per-kv-head
    policies: "full" (causal), "streaming" (sinks + the last `window` tokens), "quest" (the
    selected pages: `quest = (budget_tokens, sink_pages)`, `bounds = (kmin, kmax)` per logical
    page `(pages, hkv, d)`)."""
    q, ks, vs = (x.astype(np.float64) for x in (q, ks, vs))
    q_len, hq, d = q.shape
    sk, hkv = ks.shape[0], ks.shape[1]
    group = hq // hkv
    out = np.zeros_like(q)
    for g in range(hkv):
        if heads[g] == "streaming":
            mask = visible(q_len, sk, streaming[1] - 1, 0, True, streaming[0])
        else:
            mask = visible(q_len, sk, -1, 0, True)
        if heads[g] == "quest":
            budget, sink_pages = quest
            n_pages = -(-sk // page)
            lo, hi = (b[:, g].astype(np.float64) for b in bounds)
            qg = q[:, g * group:(g + 1) * group].reshape(-1, d)  # every row of the group
            score = np.maximum(qg[:, None] * hi[None], qg[:, None] * lo[None]).sum(-1).max(0)
            kept = [p < sink_pages or p == n_pages - 1 for p in range(n_pages)]
            k = min(max(max(1, budget // page), sum(kept)), n_pages)
            order = sorted(range(n_pages), key=lambda p: (not kept[p], -score[p], p))
            chosen = np.zeros(n_pages, bool)
            chosen[order[:k]] = True
            mask = mask & chosen[np.arange(sk) // page][None, :]
        for h in range(g * group, (g + 1) * group):
            out[:, h] = attend(q[:, h], ks[:, g], vs[:, g], mask, scale, None)
    return out


def test_paged_decode_streaming_heads():
    rng = np.random.default_rng(24)
    hq, hkv, d, page = 6, 3, 16, 4
    steps = [[17, 6], [2, 1]]
    k_cache, v_cache, _, _, table, seqlens, ks, vs = appended_cache(
        rng, steps, hkv, d, page, meta=False)
    q = rand(rng, 2, 2, hq, d)
    heads = ["streaming", "full", "streaming"]
    got = longattn.paged_decode(q, k_cache, v_cache, table, seqlens, scale=0.25, policy=heads,
                                streaming_sinks=2, streaming_window=5)
    for s in range(2):
        want = ref_policy_decode(q[s], ks[s], vs[s], heads, 0.25, page, streaming=(2, 5))
        assert rel_l2(got[s], want) < RTOL
    # One name for every head; the defaults (no policy, or all "full") are the plain decode.
    got = longattn.paged_decode(q, k_cache, v_cache, table, seqlens, scale=0.25,
                                policy="streaming", streaming_sinks=0, streaming_window=3)
    for s in range(2):
        want = ref_policy_decode(q[s], ks[s], vs[s], ["streaming"] * 3, 0.25, page,
                                 streaming=(0, 3))
        assert rel_l2(got[s], want) < RTOL
    plain = longattn.paged_decode(q, k_cache, v_cache, table, seqlens, scale=0.25)
    full = longattn.paged_decode(q, k_cache, v_cache, table, seqlens, scale=0.25, policy="full")
    assert np.array_equal(plain, full)


@pytest.mark.parametrize("budget, sink_pages", [(8, 0), (8, 1), (12, 2), (3, 0), (100, 0)])
def test_paged_decode_quest_heads(budget, sink_pages):
    rng = np.random.default_rng(25)
    hq, hkv, d, page = 4, 2, 16, 4
    steps = [[22, 13], [1, 2]]
    k_cache, v_cache, kmin, kmax, table, seqlens, ks, vs = appended_cache(
        rng, steps, hkv, d, page, num_pages=20, max_pages=7)
    q = rand(rng, 2, 2, hq, d)
    heads = ["quest", "full"]
    got = longattn.paged_decode(q, k_cache, v_cache, table, seqlens, scale=0.25, policy=heads,
                                quest_budget=budget, quest_sink_pages=sink_pages, kmin=kmin,
                                kmax=kmax)
    for s in range(2):
        pages = table[s, :-(-int(seqlens[s]) // page)]
        want = ref_policy_decode(q[s], ks[s], vs[s], heads, 0.25, page, quest=(budget, sink_pages),
                                 bounds=(kmin[pages], kmax[pages]))
        assert rel_l2(got[s], want) < RTOL, s
    if budget < 100:  # the selection matters: all pages would give the dense result
        dense = longattn.paged_decode(q, k_cache, v_cache, table, seqlens, scale=0.25)
        assert rel_l2(got, dense.astype(np.float64)) > 1e-3


def test_merge_is_the_formula_and_merges_dense_halves():
    rng = np.random.default_rng(26)
    b, s, h, d = 2, 3, 4, 8
    o_a, o_b = rand(rng, b, s, h, d), rand(rng, b, s, h, d)
    lse_a, lse_b = rand(rng, b, h, s), rand(rng, b, h, s)
    lse_a[0, 1, 2] = -np.inf  # one side empty
    lse_b[1, 3, 0] = -np.inf
    lse_a[1, 0, 1] = lse_b[1, 0, 1] = -np.inf  # both empty: o = 0, lse = -inf
    o, lse = longattn.merge(o_a, lse_a, o_b, lse_b)
    assert o.dtype == np.float32 and lse.shape == (b, h, s)
    la, lb = lse_a.astype(np.float64), lse_b.astype(np.float64)
    with np.errstate(invalid="ignore"):
        m = np.maximum(la, lb)
        want_lse = np.where(np.isfinite(m), m + np.log(np.exp(la - m) + np.exp(lb - m)), -np.inf)
        wa = np.where(np.isfinite(want_lse), np.exp(la - want_lse), 0.0)
        wb = np.where(np.isfinite(want_lse), np.exp(lb - want_lse), 0.0)
    tr = lambda w: w.transpose(0, 2, 1)[..., None]  # (b, h, s) -> (b, s, h, 1)
    want_o = tr(wa) * o_a + tr(wb) * o_b
    assert np.array_equal(np.isinf(lse), np.isinf(want_lse))
    fin = np.isfinite(want_lse)
    assert np.allclose(lse[fin], want_lse[fin], rtol=1e-6, atol=1e-6)
    assert rel_l2(o, want_o) < RTOL
    assert np.all(o[1, 1, 0] == 0) and lse[1, 0, 1] == -np.inf
    # Dense attention over two halves of the keys, merged, is dense over all of them.
    q, k, v = rand(rng, 1, 5, 4, 16), rand(rng, 1, 12, 2, 16), rand(rng, 1, 12, 2, 16)
    parts = [longattn.dense(q, k[:, sl], v[:, sl], return_lse=True)
             for sl in (slice(0, 7), slice(7, 12))]
    o, lse = longattn.merge(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    o_all, lse_all = longattn.dense(q, k, v, return_lse=True)
    assert rel_l2(o, o_all.astype(np.float64)) < RTOL
    assert np.allclose(lse, lse_all, rtol=1e-5, atol=1e-5)
    o16, _ = longattn.merge(o_a.astype(np.float16), lse_a, o_b.astype(np.float16), lse_b)
    assert o16.dtype == np.float16 and rel_l2(o16, want_o) < 1e-2


def test_append_policy_and_merge_refusals():
    rng = np.random.default_rng(27)
    hkv, d, page = 2, 8, 4
    k_cache = np.zeros((4, page, hkv, d), np.float32)
    v_cache = np.zeros_like(k_cache)
    kmin, kmax = np.zeros((4, hkv, d), np.float32), np.zeros((4, hkv, d), np.float32)
    table, lens, cu = np.array([[0, 1], [2, 3]], np.int32), np.array([3, 2], np.int32), \
        np.array([0, 3, 5], np.int32)
    k_new = rand(rng, 5, hkv, d)
    append = longattn.paged_append
    with pytest.raises(ValueError, match="go together"):
        append(k_new, k_new, k_cache, v_cache, table, lens, cu, kmin=kmin)
    with pytest.raises(ValueError):  # k_new's heads differ from the cache's
        append(k_new[:, :1], k_new[:, :1], k_cache, v_cache, table, lens, cu)
    with pytest.raises(ValueError):  # rows != cu_seqlens_new[-1]
        append(k_new[:4], k_new[:4], k_cache, v_cache, table, lens, cu)
    with pytest.raises(ValueError, match="count the new tokens"):
        append(k_new, k_new, k_cache, v_cache, table, np.array([2, 2], np.int32), cu)
    with pytest.raises(ValueError, match="written by sequence 0"):  # two writers of page 0
        append(k_new, k_new, k_cache, v_cache, np.array([[0, 1], [0, 3]], np.int32), lens, cu)
    with pytest.raises(ValueError):  # kmin not (num_pages, heads_kv, head_dim)
        append(k_new, k_new, k_cache, v_cache, table, lens, cu, kmin=kmin.reshape(4, d, hkv),
               kmax=kmax)
    frozen = k_cache.copy()
    frozen.setflags(write=False)
    with pytest.raises(TypeError, match="writable"):
        append(k_new, k_new, frozen, v_cache, table, lens, cu)
    with pytest.raises(TypeError, match="writable"):  # one array as both caches
        append(k_new, k_new, k_cache, k_cache, table, lens, cu)
    with pytest.raises(TypeError):  # an FP8 cache's bounds are codes too
        append(k_new, k_new, k_cache.astype(np.uint8), v_cache.astype(np.uint8), table, lens, cu,
               kmin=kmin, kmax=kmax)
    with pytest.raises(ValueError):  # scales describe an FP8 cache
        append(k_new, k_new, k_cache, v_cache, table, lens, cu, k_scales=[1, 1], v_scales=[1, 1])
    assert np.all(k_cache == 0)  # nothing written by a refused call
    append(k_new, k_new, k_cache, v_cache, table, lens, cu, kmin=kmin, kmax=kmax)
    q = rand(rng, 2, 1, 4, d)
    decode = lambda **kw: longattn.paged_decode(q, k_cache, v_cache, table, lens, **kw)
    with pytest.raises(ValueError, match="'full', 'streaming' or 'quest'"):
        decode(policy=["full", "sparse"])
    with pytest.raises(ValueError):  # one name per kv head
        decode(policy=["full", "full", "full"])
    with pytest.raises(TypeError):
        decode(policy=3)
    with pytest.raises(ValueError, match="quest_budget"):
        decode(policy="quest", kmin=kmin, kmax=kmax)
    with pytest.raises(ValueError, match="metadata"):
        decode(policy="quest", quest_budget=8)
    with pytest.raises(ValueError, match="streaming window"):
        decode(policy="streaming", streaming_window=0)
    o, l = rand(rng, 1, 2, 3, 4), rand(rng, 1, 3, 2)
    with pytest.raises(ValueError):  # lse must be (batch, heads, seqlen)
        longattn.merge(o, l.transpose(0, 2, 1), o, l)
    with pytest.raises(ValueError):
        longattn.merge(o, l, o[:, :1], l)
    with pytest.raises(TypeError):
        longattn.merge(o, l.astype(np.float64), o, l)


def test_valid_cuda_calls_without_a_usable_gpu_raise():
    # Valid arguments on device 10**6: "CUDA not compiled" (a CPU-only build) or no such GPU,
    # a ValueError either way (never cudarc's panic without libcuda), before any launch.
    class Iface:
        def __init__(self, shape, typestr):
            self.__cuda_array_interface__ = {"data": (0, False), "shape": shape,
                                             "typestr": typestr, "version": 3}

    o, lse = Iface((1, 2, 3, 8), "<f4"), Iface((1, 3, 2), "<f4")
    with pytest.raises(ValueError, match="longattn"):
        longattn.merge_cuda(o, lse, o, lse, o, lse, device=10**6)
    h = Iface((1, 4, 2, 8), "<f2")
    with pytest.raises(ValueError, match="longattn"):
        longattn.dense_cuda(h, h, h, h, device=10**6)


def test_new_cuda_functions_refuse_before_any_cuda_call():
    class Iface:
        def __init__(self, shape, typestr="<f2"):
            self.__cuda_array_interface__ = {"data": (0, False), "shape": shape,
                                             "typestr": typestr, "version": 3}

    c8 = Iface((4, 4, 2, 8), "|u1")
    n = Iface((3, 2, 8))
    with pytest.raises(TypeError, match="k_new: uint8"):  # FP8 codes are for caches only
        longattn.paged_append_cuda(c8, c8, c8, c8, [[0]], [3], [0, 3])
    c32 = Iface((4, 4, 2, 8), "<f4")
    with pytest.raises(TypeError, match="float32"):
        longattn.paged_append_cuda(n, n, c32, c32, [[0]], [3], [0, 3])
    c = Iface((4, 4, 2, 8))
    with pytest.raises(ValueError):  # k_new is (total, heads_kv, head_dim) of the cache
        longattn.paged_append_cuda(Iface((3, 1, 8)), Iface((3, 1, 8)), c, c, [[0]], [3], [0, 3])
    o, lse16 = Iface((1, 2, 3, 8)), Iface((1, 3, 2))
    with pytest.raises(TypeError, match="float32"):
        longattn.merge_cuda(o, lse16, o, lse16, o, lse16)
    lse = Iface((1, 2, 3), "<f4")  # (batch, seqlen, heads): not (batch, heads, seqlen)
    with pytest.raises(ValueError):
        longattn.merge_cuda(o, lse, o, lse, o, lse)
    with pytest.raises(ValueError, match="quest_budget"):
        longattn.paged_decode_cuda(Iface((1, 1, 4, 8)), c, c, Iface((1, 1, 4, 8)), [[0]], [3],
                                   policy="quest")


def test_fp8_cuda_caches_are_checked_before_any_cuda_call():
    class Iface:
        def __init__(self, shape, typestr="<f2"):
            self.__cuda_array_interface__ = {"data": (0, False), "shape": shape,
                                             "typestr": typestr, "version": 3}

    hkv, d = 2, 8
    c8, c16 = Iface((4, 4, hkv, d), "|u1"), Iface((4, 4, hkv, d))  # FP8 codes, halves
    m8, m16 = Iface((4, hkv, d), "|u1"), Iface((4, hkv, d))  # Quest bounds alike
    q, q8 = Iface((1, 1, 4, d)), Iface((1, 1, 4, d), "|u1")
    n, n8 = Iface((3, hkv, d)), Iface((3, hkv, d), "|u1")
    table, lens, cu = [[0]], [3], [0, 3]
    decode, prefill = longattn.paged_decode_cuda, longattn.paged_prefill_cuda
    append = longattn.paged_append_cuda
    quest = dict(policy="quest", quest_budget=4)
    # uint8 only as a cache or its bounds: q, out, new tokens and the other functions'
    # tensors refuse it by name.
    with pytest.raises(TypeError, match="q: uint8"):
        decode(q8, c8, c8, q, table, lens)
    with pytest.raises(TypeError, match="out: uint8"):
        decode(q, c8, c8, q8, table, lens)
    with pytest.raises(TypeError, match="q: uint8"):
        prefill(q8, c8, c8, q8, table, lens)
    with pytest.raises(TypeError, match="v_new: uint8"):
        append(n, n8, c8, c8, table, lens, cu)
    x8, x = Iface((1, 4, 2, 8), "|u1"), Iface((1, 4, 2, 8))
    with pytest.raises(TypeError, match="k: uint8"):
        longattn.dense_cuda(x, x8, x, x)
    o8, lse = Iface((1, 2, 3, 8), "|u1"), Iface((1, 3, 2), "<f4")
    with pytest.raises(TypeError, match="o_a: uint8"):
        longattn.merge_cuda(o8, lse, o8, lse, o8, lse)
    # Mismatched dtypes: k and v caches alike, bounds of the cache's dtype, halves of q's.
    with pytest.raises(TypeError, match="v_cache has dtype"):
        decode(q, c8, c16, q, table, lens)
    with pytest.raises(TypeError, match="v_cache has dtype"):
        append(n, n, c16, c8, table, lens, cu)
    with pytest.raises(TypeError, match="kmin has dtype"):  # an FP8 cache's bounds are codes
        decode(q, c8, c8, q, table, lens, kmin=m16, kmax=m16, **quest)
    with pytest.raises(TypeError, match="kmin has dtype"):
        append(n, n, c16, c16, table, lens, cu, kmin=m8, kmax=m8)
    with pytest.raises(TypeError, match="k_cache: float32"):
        prefill(q, Iface((4, 4, hkv, d), "<f4"), c16, q, table, lens)
    # Scales: both or neither, one per kv head, > 0, and only for an FP8 cache.
    with pytest.raises(ValueError, match="go together"):
        decode(q, c8, c8, q, table, lens, k_scales=[1.0, 1.0])
    with pytest.raises(ValueError, match="FP8"):
        decode(q, c16, c16, q, table, lens, k_scales=[1.0, 1.0], v_scales=[1.0, 1.0])
    with pytest.raises(ValueError, match="FP8"):
        append(n, n, c16, c16, table, lens, cu, k_scales=[1.0, 1.0], v_scales=[1.0, 1.0])
    with pytest.raises(ValueError, match="heads_kv"):
        prefill(q, c8, c8, q, table, lens, k_scales=[1.0] * 3, v_scales=[1.0] * 3)
    with pytest.raises(ValueError, match="> 0"):
        append(n, n, c8, c8, table, lens, cu, k_scales=[1.0, 0.0], v_scales=[1.0, 1.0])
    # Valid FP8 calls (scales 1 when not given, as on the CPU) pass every check and stop at
    # the device: the kernels were not compiled, or there is no device 10**6.
    no_device = "not compiled|no GPU"
    for scales in ({}, dict(k_scales=[0.5, 2.0], v_scales=[1.0, 0.25])):
        with pytest.raises(ValueError, match=no_device):
            decode(q, c8, c8, q, table, lens, device=10**6, **scales)
        with pytest.raises(ValueError, match=no_device):
            decode(q, c8, c8, q, table, lens, kmin=m8, kmax=m8, device=10**6, **quest, **scales)
        with pytest.raises(ValueError, match=no_device):
            prefill(q, c8, c8, q, table, lens, causal=True, device=10**6, **scales)
        with pytest.raises(ValueError, match=no_device):
            append(n, n, c8, c8, table, lens, cu, kmin=m8, kmax=m8, device=10**6, **scales)

    class DlpackU8:  # uint8 DLPack (code 1, 8 bits) on "CUDA device 10**6": parsed, never read
        def __init__(self, shape):
            self.a = np.zeros(shape, np.uint8)

        def __dlpack_device__(self):
            return (2, 10**6)

        def __dlpack__(self, stream=None):
            return self.a.__dlpack__()

    with pytest.raises(TypeError, match="q: uint8"):
        decode(DlpackU8((1, 1, 4, d)), c8, c8, q, table, lens, device=10**6)
    k8 = DlpackU8((4, 4, hkv, d))
    with pytest.raises(ValueError, match=no_device):
        decode(q, k8, k8, q, table, lens, device=10**6)
