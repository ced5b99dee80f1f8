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
