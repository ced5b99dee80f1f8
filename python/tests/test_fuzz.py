"""Randomised robustness of the Python package: every public function gets seeded bad
arguments (wrong dtypes, ranks and shapes, empty, strided, read-only and broadcast views
claiming huge shapes, negative and huge ints, NaN/inf scales, None or lists where arrays are
required, wrong table lengths, CSR block masks with bad offsets and indices, malformed CUDA
array interfaces). Each call must return or raise ``ValueError``, ``TypeError`` or
``OverflowError`` (a negative or huge int for an unsigned parameter, Python's own error for
it), or longattn's own ``MemoryError`` for a copy or an output that does not fit (a broadcast
view may claim a shape far beyond memory): never pyo3's ``PanicException`` (a
``BaseException``), an abort or another error. Valid random inputs must match the f64
references of ``test_cpu.py``."""

import os

import numpy as np
import pytest

import longattn
from longattn import _longattn
from test_cpu import ref_block_sparse, ref_dense, ref_neighborhood_1d, rel_l2

CLEAR = (ValueError, TypeError, OverflowError)
# Longer hunts: another seed and more cases (CI runs the defaults).
SEED = int(os.environ.get("LONGATTN_FUZZ_SEED", "0"))
SCALE = int(os.environ.get("LONGATTN_FUZZ_SCALE", "1"))
INTS = [0, 1, -1, 2, 3, 7, 64, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63), 2**64]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e30, 3.4e38, np.inf, -np.inf, np.nan, 65536.0,
          65537.0]


def call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None when it raised one of the clear errors; any other
    exception (a panic, a foreign MemoryError) propagates and fails the test."""
    try:
        return fn(*args, **kwargs)
    except CLEAR:
        return None
    except MemoryError as e:
        assert str(e).startswith("longattn:"), e
        return None


def pick(rng, xs):
    """One of ``xs`` (any types)."""
    return xs[int(rng.integers(0, len(xs)))]


def refused(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` must raise a clear error (aliased writable arrays; fake CUDA
    tensors without a GPU)."""
    try:
        fn(*args, **kwargs)
    except CLEAR:
        return
    raise AssertionError(f"{fn.__name__} accepted what it must refuse")


def rand(rng, *shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def bad_array(rng, x):
    """``x`` spoiled one way: dtype, rank, shape, emptiness, layout, or not an array."""
    n = x.ndim
    if x.size > 4096 or max(x.shape, default=0) > 4096:
        return x  # already a huge broadcast view: spoiling it further would copy it here
    choice = rng.integers(0, 16)
    if choice == 0:
        with np.errstate(invalid="ignore"):
            return x.astype(pick(rng, [np.float64, np.int32, np.int64, np.bool_, np.int8,
                                        np.uint8, np.float16, np.float32]))
    if choice == 1:
        return x[None]
    if choice == 2:
        return x.reshape(-1)
    if choice == 3 and n > 0 and x.shape[-1] > 0:
        return x[..., 0]
    if choice == 4 and n > 0:
        ax = int(rng.integers(0, n))
        return np.take(x, range(max(x.shape[ax] - 1, 0)), axis=ax)
    if choice == 5 and n > 0:
        ax = int(rng.integers(0, n))
        return np.concatenate([x, np.take(x, [0] * min(x.shape[ax], 1), axis=ax)], axis=ax)
    if choice == 6:
        shape = list(x.shape)
        if shape:
            shape[int(rng.integers(0, len(shape)))] = 0
        return np.zeros(shape, x.dtype)
    if choice == 7 and n > 0:
        return x[..., ::2]
    if choice == 8 and n > 1:
        return np.swapaxes(x, 0, n - 1)
    if choice == 9:
        # A broadcast view of one element claiming 2**44 or more elements: a copy (or an
        # output) of that size must be refused, not attempted.
        big = [2**44] if n <= 1 else [2 ** -(-44 // (n - 1))] * (n - 1) + [max(x.shape[-1], 1)]
        return np.broadcast_to(np.zeros([1] * len(big), x.dtype), big)
    if choice == 10:
        return None
    if choice == 11:
        return x.tolist() if x.size < 64 else [0.0]
    if choice == 12:
        return float(pick(rng, FLOATS))
    if choice == 13:
        return "q"
    if choice == 14:
        y = x.copy()
        if y.size and y.dtype.kind == "f":
            y.flat[int(rng.integers(0, y.size))] = pick(rng, [np.nan, np.inf, -np.inf])
        return y
    return np.asfortranarray(x)


def bad_table(rng, t):
    """An int32 table spoiled: an entry set to an edge value, a length changed, a dtype or
    rank changed."""
    if t.size > 4096 or max(t.shape, default=0) > 4096:
        return t  # already a huge broadcast view
    t = np.array(t, np.int32)
    choice = rng.integers(0, 6)
    if choice == 0 and t.size:
        t.flat[int(rng.integers(0, t.size))] = pick(rng, [-1, 2**31 - 1, -(2**31), 3, 0, 1])
        return t
    if choice == 1:
        return t.reshape(-1)[:-1] if t.size else t
    if choice == 2:
        return np.concatenate([t.reshape(-1), [0]]).astype(np.int32)
    if choice == 3:
        return t.astype(np.int64)
    if choice == 4:
        return t[None]
    return bad_array(rng, t)


def spoil(rng, args, kwargs, bad_kwargs):
    """One to three arguments spoiled: an array (positional or keyword) or a scalar option
    (from ``bad_kwargs``: name -> candidate values)."""
    args, kwargs = list(args), dict(kwargs)
    for _ in range(int(rng.integers(1, 4))):
        names = list(range(len(args))) + list(bad_kwargs)
        name = names[int(rng.integers(0, len(names)))]
        if isinstance(name, int):
            a = args[name]
            if isinstance(a, np.ndarray):
                args[name] = bad_table(rng, a) if a.dtype == np.int32 else bad_array(rng, a)
            else:
                args[name] = pick(rng, [None, -1, 2**64, "x", 0.5])
        else:
            kwargs[name] = pick(rng, bad_kwargs[name])
    return args, kwargs


OPTS = {
    "scale": [None] + FLOATS,
    "softcap": [None] + FLOATS,
    "window": [None, (-1, -1), (-2, 0), (0, -2), (2**31, 0), (2**63 - 1, 1), (1, 2**64), (3,),
               "w", (0.5, 1)],
    "sinks": INTS,
    "causal": [True, False, 2, None, "yes"],
    "return_lse": [True, False],
}


def dense_case(rng):
    b, sq, sk = int(rng.integers(1, 3)), int(rng.integers(1, 7)), int(rng.integers(1, 9))
    hkv = int(rng.integers(1, 3))
    hq, d = hkv * int(rng.integers(1, 3)), int(pick(rng, [1, 4, 8]))
    dtype = pick(rng, [np.float32, np.float16])
    q, k, v = (rand(rng, b, s, h, d, dtype=dtype) for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    kw = {"causal": bool(rng.integers(0, 2)), "scale": float(rng.uniform(0.1, 1.0))}
    if rng.random() < 0.5:
        kw["window"] = (int(rng.integers(-1, 5)), int(rng.integers(-1, 3)))
    return [q, k, v], kw


def test_fuzz_dense():
    rng = np.random.default_rng([0xD, SEED])
    oks = 0
    for _ in range(4000 * SCALE):
        args, kw = dense_case(rng)
        if rng.random() < 0.15:
            got = longattn.dense(*args, **kw)
            tol = 1e-5 if args[0].dtype == np.float32 else 2e-2
            assert rel_l2(got, ref_dense(*args, **kw)) < tol
            oks += 1
            continue
        args, kw = spoil(rng, args, kw, OPTS)
        out = call(longattn.dense, *args, **kw)
        if out is not None:
            res = out if isinstance(out, np.ndarray) else out[0]
            assert res.dtype in (np.float32, np.float16)
    assert oks > 50


def test_fuzz_dense_varlen():
    rng = np.random.default_rng([0xE, SEED])
    for _ in range(3000 * SCALE):
        hkv, d = int(rng.integers(1, 3)), 4
        hq = hkv * int(rng.integers(1, 3))
        lq = rng.integers(0, 5, int(rng.integers(1, 4)))
        lk = rng.integers(1, 6, len(lq))
        cq = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
        ck = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
        q, k, v = rand(rng, cq[-1], hq, d), rand(rng, ck[-1], hkv, d), rand(rng, ck[-1], hkv, d)
        args, kw = [q, k, v, cq, ck], {"causal": bool(rng.integers(0, 2))}
        if rng.random() < 0.2:
            got = longattn.dense_varlen(*args, **kw)
            for i in range(len(lq)):
                rq, rk = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
                want = ref_dense(q[None, rq], k[None, rk], v[None, rk], **kw)[0]
                assert rel_l2(got[rq], want) < 1e-5 or want.size == 0
            continue
        args, kw = spoil(rng, args, kw, OPTS)
        call(longattn.dense_varlen, *args, **kw)


def csr(rng, lists, nk):
    offsets, indices = [0], []
    for _ in range(lists):
        indices += [kb for kb in range(nk) if rng.random() < 0.6]
        offsets.append(len(indices))
    full = rng.random(len(indices)) < 0.3
    return np.array(offsets, np.int32), np.array(indices, np.int32), full


def test_fuzz_block_sparse():
    rng = np.random.default_rng([0xB, SEED])
    bad = dict(OPTS, block_m=INTS, block_n=INTS, mask_batch=INTS, mask_heads=INTS,
               full=[None, np.zeros(3, bool), np.ones(1000, bool), np.zeros(2, np.int32), [1]])
    for _ in range(3000 * SCALE):
        (q, k, v), kw = dense_case(rng)
        q, k, v = (x.astype(np.float32) for x in (q, k, v))
        bm, bn = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        mb, mh = int(pick(rng, [1, q.shape[0]])), int(pick(rng, [1, q.shape[2]]))
        nq, nk = -(-q.shape[1] // bm), -(-k.shape[1] // bn)
        offsets, indices, full = csr(rng, mb * mh * nq, nk)
        kw.update(block_m=bm, block_n=bn, mask_batch=mb, mask_heads=mh, full=full)
        args = [q, k, v, offsets, indices]
        if rng.random() < 0.2:
            got = longattn.block_sparse(*args, **kw)
            want = ref_block_sparse(q, k, v, offsets, indices, full, bm, bn, mb, mh,
                                    scale=kw["scale"], causal=kw["causal"],
                                    window=kw.get("window", (-1, -1)))
            assert rel_l2(got, want) < 1e-5
            continue
        args, kw = spoil(rng, args, kw, bad)
        call(longattn.block_sparse, *args, **kw)


def paged_case(rng, dtype=np.float32):
    page, hkv, d = int(pick(rng, [1, 2, 4])), int(rng.integers(1, 3)), 4
    b, max_pages = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    num_pages = b * max_pages + int(rng.integers(0, 3))
    table = rng.permutation(num_pages)[: b * max_pages].reshape(b, max_pages).astype(np.int32)
    q_len = int(rng.integers(1, min(2, max_pages * page) + 1))
    lens = rng.integers(q_len, max_pages * page + 1, b).astype(np.int32)
    k_cache = rand(rng, num_pages, page, hkv, d, dtype=dtype)
    v_cache = rand(rng, num_pages, page, hkv, d, dtype=dtype)
    hq = hkv * int(rng.integers(1, 3))
    q = rand(rng, b, q_len, hq, d, dtype=dtype)
    return q, k_cache, v_cache, table, lens


def gathered(cache, table, lens, bi):
    page = cache.shape[1]
    rows = [cache[table[bi, t // page], t % page] for t in range(lens[bi])]
    return np.stack(rows)[None]


PAGED_OPTS = {
    "scale": [None] + FLOATS,
    "softcap": [None] + FLOATS,
    "sinks": INTS,
    "k_scales": [None, np.ones(1, np.float32), np.array([np.nan, 1], np.float32), [1.0, 2.0],
                 np.zeros(2, np.float32), np.full(2, 1e38, np.float32)],
    "v_scales": [None, np.ones(2, np.float32), np.ones(3, np.float32)],
}
DECODE_OPTS = dict(PAGED_OPTS, window_left=INTS,
                   policy=[None, "full", "quest", "streaming", "nope", ["full"], ["quest"] * 3,
                           [1, 2], 5],
                   quest_budget=[None] + INTS, quest_sink_pages=INTS, streaming_sinks=INTS,
                   streaming_window=INTS,
                   kmin=[None, np.zeros((1, 1, 4), np.float32)],
                   kmax=[None, np.zeros((1, 1, 4), np.float32)])
PREFILL_OPTS = dict(PAGED_OPTS, causal=OPTS["causal"], window=OPTS["window"],
                    cu_seqlens_q=[None, np.array([0, 1], np.int32), np.array([0], np.int32),
                                  np.array([0, -1, 2], np.int32), np.array([], np.int32),
                                  [0, 1]])


def test_fuzz_paged_decode_and_prefill():
    rng = np.random.default_rng([0xA, SEED])
    for i in range(5000 * SCALE):
        q, k_cache, v_cache, table, lens = paged_case(rng)
        decode = i % 2 == 0
        fn = longattn.paged_decode if decode else longattn.paged_prefill
        if rng.random() < 0.15:
            kw = {"scale": 0.3} if decode else {"scale": 0.3, "causal": True}
            got = fn(q, k_cache, v_cache, table, lens, **kw)
            for bi in range(q.shape[0]):
                k = gathered(k_cache, table, lens, bi)
                v = gathered(v_cache, table, lens, bi)
                want = ref_dense(q[bi:bi + 1], k, v, scale=0.3, causal=True)
                assert rel_l2(got[bi:bi + 1], want) < 1e-5
            continue
        args, kw = spoil(rng, [q, k_cache, v_cache, table, lens], {},
                         DECODE_OPTS if decode else PREFILL_OPTS)
        call(fn, *args, **kw)


def test_fuzz_paged_append():
    rng = np.random.default_rng([0xAA, SEED])
    bad = {"kmin": [None, np.zeros((1, 1, 4), np.float32)],
           "kmax": [None, np.zeros((1, 1, 4), np.float32)],
           "k_scales": PAGED_OPTS["k_scales"], "v_scales": PAGED_OPTS["v_scales"]}
    for _ in range(4000 * SCALE):
        _, k_cache, v_cache, table, lens = paged_case(rng)
        n = np.minimum(rng.integers(0, 3, len(lens)), lens)
        cu = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
        hkv, d = k_cache.shape[2], k_cache.shape[3]
        k_new, v_new = rand(rng, cu[-1], hkv, d), rand(rng, cu[-1], hkv, d)
        kw = {}
        if rng.random() < 0.5:
            kw = {"kmin": np.zeros((k_cache.shape[0], hkv, d), np.float32),
                  "kmax": np.zeros((k_cache.shape[0], hkv, d), np.float32)}
        args = [k_new, v_new, k_cache, v_cache, table, lens, cu]
        if rng.random() < 0.15:
            longattn.paged_append(*args, **kw)
            for bi in range(len(lens)):
                page = k_cache.shape[1]
                for j, t in enumerate(range(lens[bi] - n[bi], lens[bi])):
                    slot = k_cache[table[bi, t // page], t % page]
                    assert np.array_equal(slot, k_new[cu[bi] + j])
            continue
        r = rng.random()
        if r < 0.05:
            args[3] = args[2]  # one array as both caches: two writers
            refused(longattn.paged_append, *args, **kw)
            continue
        if r < 0.1 and kw:
            kw["kmax"] = kw["kmin"]
            refused(longattn.paged_append, *args, **kw)
            continue
        args, kw = spoil(rng, args, kw, bad)
        if rng.random() < 0.1:
            args[2] = np.broadcast_to(k_cache, k_cache.shape)  # read-only cache
        call(longattn.paged_append, *args, **kw)


def test_fuzz_merge():
    rng = np.random.default_rng([0x3, SEED])
    for _ in range(4000 * SCALE):
        b, s, h, d = (int(rng.integers(1, 4)) for _ in range(4))
        oa, ob = rand(rng, b, s, h, d), rand(rng, b, s, h, d)
        la, lb = rand(rng, b, h, s), rand(rng, b, h, s)
        args = [oa, la, ob, lb]
        if rng.random() < 0.2:
            o, lse = longattn.merge(*args)
            m = np.maximum(la, lb)
            want_lse = m + np.log(np.exp(la - m) + np.exp(lb - m))
            wa = np.exp(la - want_lse).transpose(0, 2, 1)[..., None]
            wb = np.exp(lb - want_lse).transpose(0, 2, 1)[..., None]
            assert rel_l2(o, wa * oa + wb * ob) < 1e-5
            assert np.abs(lse - want_lse).max() < 1e-5
            continue
        args, kw = spoil(rng, args, {}, {})
        call(longattn.merge, *args, **kw)


def test_fuzz_fp8_quantize():
    rng = np.random.default_rng([0x8, SEED])
    for _ in range(4000 * SCALE):
        x = rand(rng, int(rng.integers(0, 20))) * 100
        scale = float(rng.uniform(0.01, 4))
        if rng.random() < 0.2:
            got = longattn.fp8_quantize(x, scale)
            assert got.dtype == np.uint8 and got.shape == x.shape
            continue
        args, kw = spoil(rng, [x], {"scale": scale}, {"scale": FLOATS + [None, "s"]})
        call(longattn.fp8_quantize, *args, **kw)


def test_fuzz_neighborhood():
    rng = np.random.default_rng([0x4, SEED])
    bad = {"kernel_size": [0, -1, 2**64, (1, 1, 1, 1), (), None, 1.5, 9],
           "dilation": [0, -1, 2**64, (1, 2, 3, 4), 9], "stride": [0, -1, 2**64, 9],
           "causal": [True, (True, False, True, False), None],
           "scale": OPTS["scale"], "softcap": OPTS["softcap"]}
    for _ in range(3000 * SCALE):
        length, d = int(rng.integers(1, 9)), 4
        kernel = int(rng.integers(1, length + 1))
        dilation = int(rng.integers(1, length // kernel + 1))
        causal = bool(rng.integers(0, 2))
        q, k, v = (rand(rng, 1, length, 2, d) for _ in range(3))
        kw = {"dilation": dilation, "causal": causal, "scale": 0.5}
        if rng.random() < 0.2:
            got = longattn.neighborhood(q, k, v, kernel, **kw)
            want = ref_neighborhood_1d(q, k, v, kernel, dilation, causal, 0.5)
            assert rel_l2(got, want) < 1e-5
            continue
        args, kw = spoil(rng, [q, k, v, kernel], kw, bad)
        call(longattn.neighborhood, *args, **kw)


class FakeCuda:
    """A ``__cuda_array_interface__`` (version 3) without memory behind it."""

    def __init__(self, iface):
        self.__cuda_array_interface__ = iface


def fake(rng, shape, typestr="<f2"):
    iface = {"data": (int(pick(rng, [0, 256, 2**40])), False), "shape": tuple(shape),
             "typestr": typestr, "version": 3}
    r = rng.integers(0, 12)
    if r == 0:
        iface["strides"] = tuple(int(pick(rng, [0, -2, 2, 2**62])) for _ in shape)
    elif r == 1:
        iface["typestr"] = str(pick(rng, ["<f4", "<f8", "|u1", "<i4", "bogus", ""]))
    elif r == 2:
        iface["shape"] = tuple(int(pick(rng, [0, -1, 2**31, 2**62])) for _ in shape)
    elif r == 3:
        del iface["shape"]
    elif r == 4:
        iface["data"] = pick(rng, [None, (None, False), 5, "p", (-1, False)])
    elif r == 5:
        iface["version"] = int(pick(rng, [0, 1, 99]))
    elif r == 6:
        iface["strides"] = (2,)
    elif r == 7:
        iface["mask"] = object()
    elif r == 8:
        return FakeCuda(None)
    return FakeCuda(iface)


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"),
                    reason="a GPU is present: fake device pointers must not reach it")
def test_fuzz_cuda_functions_refuse_without_a_gpu():
    """Without libcuda every call raises a clear error; malformed interfaces, shapes and
    options are refused by the checks that run before the device is opened."""
    rng = np.random.default_rng([0xC, SEED])
    for _ in range(3000 * SCALE):
        b, s, h, d = 1, int(rng.integers(1, 130)), 2, int(pick(rng, [8, 64, 128]))
        q = fake(rng, (b, s, h, d))
        kv = fake(rng, (b, s, h, d))
        out = fake(rng, (b, s, h, d))
        which = rng.integers(0, 8)
        opts = {k: v[int(rng.integers(0, len(v)))] for k, v in OPTS.items()
                if k != "return_lse" and rng.random() < 0.3}
        if which == 0:
            refused(longattn.dense_cuda, q, kv, kv, out, **opts)
        elif which == 1:
            cu = [0, s] if rng.random() < 0.7 else [0, -1]
            refused(longattn.dense_varlen_cuda, fake(rng, (s, h, d)), fake(rng, (s, h, d)),
                 fake(rng, (s, h, d)), fake(rng, (s, h, d)), cu, cu, **opts)
        elif which == 2:
            cache = fake(rng, (4, 16, h, d))
            refused(longattn.paged_decode_cuda, fake(rng, (1, 1, h, d)), cache, cache,
                 fake(rng, (1, 1, h, d)), [[0, 1]], [int(pick(rng, [1, 40, -1]))],
                 policy=pick(rng, [None, "full", "x"]))
        elif which == 3:
            cache = fake(rng, (4, 16, h, d))
            refused(longattn.paged_prefill_cuda, q, cache, cache, out, [[0, 1]], [s])
        elif which == 4:
            cache = fake(rng, (4, 16, h, d))
            refused(longattn.paged_append_cuda, fake(rng, (2, h, d)), fake(rng, (2, h, d)), cache,
                 cache, [[0, 1]], [int(pick(rng, [2, 1, 40]))], [0, 2])
        elif which == 5:
            lse = fake(rng, (b, h, s), "<f4")
            refused(longattn.merge_cuda, q, lse, kv, lse, out, fake(rng, (b, h, s), "<f4"))
        elif which == 6:
            refused(longattn.neighborhood_cuda, q, kv, kv, out, int(pick(rng, [1, 3, 0, 200])))
        else:
            refused(longattn.block_sparse_cuda, q, kv, kv, out, [0, 0, 0, 0], [],
                 block_m=int(pick(rng, [64, 0, 65])), block_n=64)


def test_regression_broadcast_view_claiming_a_huge_shape_is_refused():
    """Fuzz finding: a broadcast view of one element claiming 2**47 elements made the CPU
    functions copy it with an infallible allocation, which aborted the interpreter ("memory
    allocation of ... bytes failed"). The copies and outputs are now allocated fallibly."""
    q = np.zeros((1, 4, 2, 8), np.float32)
    big = np.broadcast_to(np.zeros((1, 1, 1, 1), np.float32), (2**14, 2**14, 2**14, 8))
    with pytest.raises(MemoryError, match="longattn: q"):
        longattn.dense(big, q, q)
    with pytest.raises(MemoryError, match="longattn: k"):
        longattn.dense(q, big, big)
    table = np.broadcast_to(np.zeros((1, 1), np.int32), (2**23, 2**23))
    cache = np.zeros((4, 2, 2, 8), np.float32)
    with pytest.raises(MemoryError, match="block_table"):
        longattn.paged_decode(q[:, :1], cache, cache, table, np.ones(1, np.int32))


def meminfo_bytes(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def test_regression_copy_beyond_free_memory_is_refused_before_it_is_made():
    """Noticed after the fuzz finding above: a broadcast view claiming more than the memory
    left, but less than RAM + swap, was allocated (Linux overcommits) and then filled until
    the OOM killer ended the interpreter. A large copy or output is now weighed against
    ``_memory_left()`` (free memory and swap, within the cgroup's limit) first. Were the check
    broken, this test would be killed, not pass. Where the claimed size also exceeds RAM +
    swap the allocator refuses it too, and the test checks less."""
    left = _longattn._memory_left()
    if left is None:
        pytest.skip("neither /proc/meminfo nor a cgroup limit to read (not Linux)")
    total = meminfo_bytes("MemTotal") + meminfo_bytes("SwapTotal")
    assert 0 < left and (total == 0 or left <= total)
    claimed = left + max((total - left) // 2, 256 << 20)
    rows = claimed // (4 * 2 * 8) + 1
    big = np.broadcast_to(np.zeros((1, 1, 1, 1), np.float32), (1, rows, 2, 8))
    small = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(MemoryError, match="longattn: q"):
        longattn.dense(big, small, small)


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"),
                    reason="a GPU is present: fake device pointers must not reach it")
def test_regression_cuda_interface_with_fewer_strides_than_dims_is_refused():
    """Fuzz finding: a ``__cuda_array_interface__`` whose ``strides`` had fewer entries than
    ``shape`` indexed past them (a panic, ``PanicException``) in neighborhood_cuda's layout
    check. The interface is now refused when it is read."""
    iface = {"data": (256, False), "shape": (1, 5, 2, 8), "typestr": "<f2", "version": 3,
             "strides": (2,)}
    x = FakeCuda(iface)
    with pytest.raises(ValueError, match="one stride per dim"):
        longattn.neighborhood_cuda(x, x, x, x, 3)
