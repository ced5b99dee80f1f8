"""longattn's CUDA functions on torch tensors against its CPU functions (themselves checked
against an f64 reference in test_cpu.py) on the same rounded inputs: float16 through
``__cuda_array_interface__``, bfloat16 through DLPack, a non-contiguous q, a side stream, FP8
e4m3 paged caches (uint8 codes).

Needs torch with a GPU: skipped otherwise (failed with LONGATTN_REQUIRE_GPU=1). Runs under
pytest or alone (``python3 test_cuda.py``, as the device script does: no pytest there).
"""

import os

import numpy as np

import longattn

TOL = {"float16": 4e-3, "bfloat16": 2e-2}


def _torch_or_skip():
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        return torch
    why = "no torch" if torch is None else "no GPU"
    if os.environ.get("LONGATTN_REQUIRE_GPU") == "1":
        raise RuntimeError(f"LONGATTN_REQUIRE_GPU=1 but {why}")
    import pytest

    pytest.skip(why)


def rel_l2(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _host(t):
    """A torch tensor (any dtype, any device) as float32 numpy."""
    return t.detach().float().cpu().numpy()


def _inputs(torch, dtype, shape_q, shape_kv, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g).to(dtype)
    k = torch.randn(shape_kv, generator=g).to(dtype)
    v = torch.randn(shape_kv, generator=g).to(dtype)
    return q, k, v


def test_dense_cuda_matches_cpu():
    torch = _torch_or_skip()
    cases = [(2, 77, 130, 8, 2, 64), (1, 130, 77, 4, 4, 128), (1, 1, 300, 8, 1, 128)]
    options = [dict(causal=False), dict(causal=True), dict(causal=True, window=(31, 0)),
               dict(window=(5, 9), softcap=0.6)]
    for n, (b, sq, sk, hq, hkv, d) in enumerate(cases):
        for dtype in (torch.float16, torch.bfloat16):
            q, k, v = _inputs(torch, dtype, (b, sq, hq, d), (b, sk, hkv, d), n)
            qg, kg, vg = (x.cuda() for x in (q, k, v))
            for opts in options:
                out = torch.full_like(qg, float("nan"))
                longattn.dense_cuda(qg, kg, vg, out, scale=0.3, **opts)
                torch.cuda.synchronize()
                want = longattn.dense(_host(q), _host(k), _host(v), scale=0.3, **opts)
                err = rel_l2(_host(out), want)
                assert err < TOL[str(dtype)[6:]], (n, dtype, opts, err)


def test_dense_cuda_strided_and_on_a_side_stream():
    torch = _torch_or_skip()
    b, sq, sk, hq, hkv, d = 2, 50, 70, 4, 2, 64
    for dtype in (torch.float16, torch.bfloat16):
        # q as the transpose of a (b, h, s, d) tensor, k and v halves of one fused buffer.
        g = torch.Generator().manual_seed(7)
        q_bhsd = torch.randn((b, hq, sq, d), generator=g).to(dtype)
        kv = torch.randn((b, sk, 2 * hkv, d), generator=g).to(dtype)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            # Produced, consumed and read back on the side stream: the call must be ordered
            # on torch's current stream, which is the side stream here.
            qg = q_bhsd.cuda().transpose(1, 2)
            kvg = kv.cuda()
            kg, vg = kvg[:, :, :hkv], kvg[:, :, hkv:]
            out = torch.empty((b, sq, hq, d), dtype=dtype, device="cuda")
            longattn.dense_cuda(qg, kg, vg, out, causal=True)
            got = out.float().cpu()
        q = q_bhsd.transpose(1, 2)
        want = longattn.dense(_host(q), _host(kv[:, :, :hkv]), _host(kv[:, :, hkv:]), causal=True)
        err = rel_l2(got.numpy(), want)
        assert err < TOL[str(dtype)[6:]], (dtype, err)


def test_dense_varlen_cuda_matches_cpu():
    torch = _torch_or_skip()
    hq, hkv, d = 4, 2, 64
    cu_q, cu_k = [0, 3, 40, 41, 170], [0, 65, 65, 130, 300]
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = _inputs(torch, dtype, (cu_q[-1], hq, d), (cu_k[-1], hkv, d), 11)
        qg, kg, vg = (x.cuda() for x in (q, k, v))
        for opts in (dict(causal=True), dict(window=(20, 3)), dict()):
            out = torch.full_like(qg, float("nan"))
            longattn.dense_varlen_cuda(qg, kg, vg, out, cu_q, cu_k, **opts)
            torch.cuda.synchronize()
            want = longattn.dense_varlen(_host(q), _host(k), _host(v), np.array(cu_q, np.int32),
                                         np.array(cu_k, np.int32), **opts)
            err = rel_l2(_host(out), want)
            assert err < TOL[str(dtype)[6:]], (dtype, opts, err)


def test_paged_decode_cuda_matches_cpu():
    torch = _torch_or_skip()
    b, q_len, hq, hkv, d, page_size, num_pages = 3, 2, 8, 2, 128, 16, 40
    table = [[(i * 7 + 3) % num_pages for i in range(s * 12, s * 12 + 12)] for s in range(b)]
    lens = [170, 1, 33]
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = _inputs(torch, dtype, (b, q_len, hq, d), (num_pages, page_size, hkv, d), 13)
        qg, kg, vg = (x.cuda() for x in (q, k, v))
        for opts in (dict(), dict(window_left=40, softcap=0.9)):
            out = torch.full_like(qg, float("nan"))
            longattn.paged_decode_cuda(qg, kg, vg, out, table, lens, **opts)
            torch.cuda.synchronize()
            want = longattn.paged_decode(_host(q), _host(k), _host(v),
                                         np.array(table, np.int32), np.array(lens, np.int32),
                                         **opts)
            err = rel_l2(_host(out), want)
            assert err < TOL[str(dtype)[6:]], (dtype, opts, err)


def _prefill_both(torch, g, dtype, kv, kv_cpu, tables, q_shapes, **scales):
    """``paged_prefill_cuda`` over the CUDA cache ``kv`` against ``paged_prefill`` over its
    numpy copy ``kv_cpu`` (tables ``(block_table, seqlens_k)``), for random ``dtype``
    queries of each ``(shape, cu_seqlens_q)`` in ``q_shapes``, causal with and without a
    window and softcap."""
    table, lens = tables
    for q_shape, cu in q_shapes:
        q = torch.randn(q_shape, generator=g).to(dtype)
        qg = q.cuda()
        for opts in (dict(causal=True), dict(causal=True, window=(40, -1), softcap=0.9)):
            out = torch.full_like(qg, float("nan"))
            longattn.paged_prefill_cuda(qg, *kv, out, table, lens, cu_seqlens_q=cu, **scales,
                                        **opts)
            torch.cuda.synchronize()
            cu_np = None if cu is None else np.array(cu, np.int32)
            want = longattn.paged_prefill(_host(q), *kv_cpu, np.array(table, np.int32),
                                          np.array(lens, np.int32), cu_seqlens_q=cu_np,
                                          **scales, **opts)
            err = rel_l2(_host(out), want)
            assert err < TOL[str(dtype)[6:]], (dtype, q_shape, opts, err)


def test_paged_prefill_cuda_matches_cpu():
    torch = _torch_or_skip()
    hq, hkv, d, page_size, num_pages = 8, 2, 128, 16, 40
    table = [[(i * 7 + 3) % num_pages for i in range(s * 12, s * 12 + 12)] for s in range(3)]
    cu = [0, 37, 38, 70]  # packed: 37, 1 and 32 new tokens
    for dtype in (torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(17)
        k, v = (torch.randn((num_pages, page_size, hkv, d), generator=g).to(dtype)
                for _ in range(2))
        _prefill_both(torch, g, dtype, (k.cuda(), v.cuda()), (_host(k), _host(v)),
                      (table, [170, 1, 33]), (((3, 37, hq, d), None), ((70, hq, d), cu)))


def test_neighborhood_cuda_matches_cpu():
    torch = _torch_or_skip()
    # (batch, *grid), heads_q, heads_kv, head_dim, per-dim settings: head_dim 128 and 64 take
    # the fused kernel, 32 the portable one.
    cases = [((2, 100), 2, 1, 128, dict(kernel_size=13, stride=2)),
             ((1, 9, 11), 4, 2, 64, dict(kernel_size=(5, 3), dilation=(1, 2),
                                         causal=(False, True))),
             ((1, 4, 5, 6), 2, 2, 32, dict(kernel_size=3, causal=(False, False, True)))]
    for n, (bgrid, hq, hkv, d, spec) in enumerate(cases):
        for dtype in (torch.float16, torch.bfloat16):
            q, k, v = _inputs(torch, dtype, (*bgrid, hq, d), (*bgrid, hkv, d), 20 + n)
            qg, kg, vg = (x.cuda() for x in (q, k, v))
            for softcap in (None, 0.6):
                out = torch.full_like(qg, float("nan"))
                longattn.neighborhood_cuda(qg, kg, vg, out, scale=0.3, softcap=softcap, **spec)
                torch.cuda.synchronize()
                want = longattn.neighborhood(_host(q), _host(k), _host(v), scale=0.3,
                                             softcap=softcap, **spec)
                err = rel_l2(_host(out), want)
                assert err < TOL[str(dtype)[6:]], (n, dtype, softcap, err)
            # q as a permuted (batch, heads, *grid, head_dim) tensor: the grid still flattens.
            r = q.dim()
            to_bh = (0, r - 2, *range(1, r - 2), r - 1)
            back = (0, *range(2, r - 1), 1, r - 1)
            qs = q.permute(to_bh).contiguous().cuda().permute(back)
            out = torch.full_like(qg, float("nan"))
            longattn.neighborhood_cuda(qs, kg, vg, out, scale=0.3, **spec)
            torch.cuda.synchronize()
            want = longattn.neighborhood(_host(q), _host(k), _host(v), scale=0.3, **spec)
            err = rel_l2(_host(out), want)
            assert err < TOL[str(dtype)[6:]], (n, dtype, "strided q", err)


def _block_lists(lists, num_k_blocks, seed):
    """CSR arrays of a fixed mix of unlisted (2 in 5), Full and Partial key blocks."""
    kind = [[(lst * 7 + kb * 3 + seed) % 5 for kb in range(num_k_blocks)]
            for lst in range(lists)]
    listed = [[(kb, c == 2) for kb, c in enumerate(row) if c >= 2] for row in kind]
    offsets = np.cumsum([0] + [len(row) for row in listed]).astype(np.int32)
    indices = np.array([kb for row in listed for kb, _ in row], np.int32)
    full = np.array([f for row in listed for _, f in row], bool)
    return offsets, indices, full


def test_block_sparse_cuda_matches_cpu():
    torch = _torch_or_skip()
    b, sq, sk, hq, hkv = 2, 200, 300, 4, 2
    # Mask (batch, heads), block sizes, options: per-(batch, head) lists of 64 x 64 blocks,
    # causal; broadcast lists of 64 x 128 blocks with a window and softcap.
    masks = [((b, hq), 64, 64, dict(causal=True)),
             ((1, 1), 64, 128, dict(window=(70, 10), softcap=0.6))]
    for d in (64, 128):
        for dtype in (torch.float16, torch.bfloat16):
            q, k, v = _inputs(torch, dtype, (b, sq, hq, d), (b, sk, hkv, d), d)
            qg, kg, vg = (x.cuda() for x in (q, k, v))
            for (mb, mh), bm, bn, opts in masks:
                lists = mb * mh * -(-sq // bm)
                offsets, indices, full = _block_lists(lists, -(-sk // bn), bm + bn)
                mask = dict(full=full, block_m=bm, block_n=bn, mask_batch=mb, mask_heads=mh)
                out = torch.full_like(qg, float("nan"))
                longattn.block_sparse_cuda(qg, kg, vg, out, offsets, indices, scale=0.3, **mask,
                                           **opts)
                torch.cuda.synchronize()
                want = longattn.block_sparse(_host(q), _host(k), _host(v), offsets, indices,
                                             scale=0.3, **mask, **opts)
                err = rel_l2(_host(out), want)
                assert err < TOL[str(dtype)[6:]], (d, dtype, bm, bn, opts, err)


def test_block_sparse_cuda_under_patterns_matches_cpu():
    # The pattern constructors' keywords splatted into both functions (blocks of 64, seqlen_q
    # two blocks below seqlen_k, odd lengths): per-head BigBird and DuoAttention, causal;
    # broadcast Longformer under a two-sided window with sinks.
    torch = _torch_or_skip()
    b, sq, sk, hq, hkv, d = 2, 171, 299, 4, 2, 64
    masks = [longattn.bigbird_mask(sq, sk, 1, 1, 2, heads=hq, seed=3, block=64, causal=True),
             longattn.streaming_heads_mask(sq, sk, [True, False, True, True], 1, 1, block=64,
                                           causal=True, sinks=5),
             longattn.longformer_mask(sq, sk, 1, 1, block=64, window=(70, 10), sinks=3)]
    q, k, v = _inputs(torch, torch.float16, (b, sq, hq, d), (b, sk, hkv, d), 5)
    qg, kg, vg = (x.cuda() for x in (q, k, v))
    for mask in masks:
        out = torch.full_like(qg, float("nan"))
        longattn.block_sparse_cuda(qg, kg, vg, out, **mask, scale=0.3)
        torch.cuda.synchronize()
        want = longattn.block_sparse(_host(q), _host(k), _host(v), **mask, scale=0.3)
        err = rel_l2(_host(out), want)
        assert err < TOL["float16"], (mask["mask_heads"], mask["causal"], err)



def _append_both(torch, g, dtype, gpu, cpu, table, **scales):
    """Three append steps (prefill-like, then decodes) of random ``dtype`` tokens into the
    CUDA caches and bounds ``gpu = (k, v, kmin, kmax)`` with ``paged_append_cuda`` and into
    the numpy ones ``cpu`` with ``paged_append``, on the same values; returns ``seqlens_k``
    after them."""
    hkv, d = cpu[0].shape[2:]
    lens = np.zeros(3, np.int32)
    for step in ([150, 1, 20], [1, 1, 13], [1, 1, 1]):
        cu = np.concatenate([[0], np.cumsum(step)]).astype(np.int32)
        lens = lens + np.array(step, np.int32)
        k_new, v_new = (torch.randn((int(cu[-1]), hkv, d), generator=g).to(dtype)
                        for _ in range(2))
        longattn.paged_append_cuda(k_new.cuda(), v_new.cuda(), *gpu[:2], table, lens, cu,
                                   kmin=gpu[2], kmax=gpu[3], **scales)
        longattn.paged_append(_host(k_new), _host(v_new), *cpu[:2], np.array(table, np.int32),
                              lens, cu, kmin=cpu[2], kmax=cpu[3], **scales)
    torch.cuda.synchronize()
    return lens


def test_paged_append_and_policy_decode_cuda_match_cpu():
    torch = _torch_or_skip()
    hq, hkv, d, page_size, num_pages = 8, 2, 128, 16, 40
    table = [[(i * 7 + 3) % num_pages for i in range(s * 12, s * 12 + 12)] for s in range(3)]
    tables = np.array(table, np.int32)
    for dtype in (torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(19)
        kc, vc = (torch.zeros((num_pages, page_size, hkv, d), dtype=dtype, device="cuda")
                  for _ in range(2))
        lo, hi = (torch.zeros((num_pages, hkv, d), dtype=dtype, device="cuda") for _ in range(2))
        kc_cpu, vc_cpu = (np.zeros((num_pages, page_size, hkv, d), np.float32) for _ in range(2))
        lo_cpu, hi_cpu = (np.zeros((num_pages, hkv, d), np.float32) for _ in range(2))
        lens = _append_both(torch, g, dtype, (kc, vc, lo, hi), (kc_cpu, vc_cpu, lo_cpu, hi_cpu),
                            table)
        # Copies and min/max of stored values: exact.
        for got, want in ((kc, kc_cpu), (vc, vc_cpu), (lo, lo_cpu), (hi, hi_cpu)):
            assert np.array_equal(_host(got), want), dtype
        q = torch.randn((3, 2, hq, d), generator=g).to(dtype)
        qg = q.cuda()
        for opts in (dict(policy=["quest", "streaming"], quest_budget=64, quest_sink_pages=1,
                          streaming_sinks=4, streaming_window=40),
                     dict(policy="quest", quest_budget=32, window_left=100)):
            out = torch.full_like(qg, float("nan"))
            longattn.paged_decode_cuda(qg, kc, vc, out, table, lens, kmin=lo, kmax=hi, **opts)
            torch.cuda.synchronize()
            want = longattn.paged_decode(_host(q), kc_cpu, vc_cpu, tables, lens, kmin=lo_cpu,
                                         kmax=hi_cpu, **opts)
            err = rel_l2(_host(out), want)
            assert err < TOL[str(dtype)[6:]], (dtype, opts, err)


def test_paged_fp8_cuda_matches_cpu():
    # FP8 e4m3 caches (uint8 codes; a torch.float8_e4m3fn tensor for bfloat16, viewed as uint8
    # by the wrapper) with power-of-two per-kv-head scales, so that every dequantised key is
    # exact in float16 and bfloat16: the append quantises as the CPU does (bit for bit), the
    # decode and prefill match the CPU functions on the same codes.
    torch = _torch_or_skip()
    hq, hkv, d, page_size, num_pages = 8, 2, 128, 16, 40
    table = [[(i * 7 + 3) % num_pages for i in range(s * 12, s * 12 + 12)] for s in range(3)]
    tables = np.array(table, np.int32)
    scales = dict(k_scales=[0.5, 0.125], v_scales=[0.25, 1.0])
    for dtype in (torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(29)
        codes = getattr(torch, "float8_e4m3fn", torch.uint8) if dtype == torch.bfloat16 \
            else torch.uint8
        kc, vc = (torch.zeros((num_pages, page_size, hkv, d), dtype=torch.uint8,
                              device="cuda").view(codes) for _ in range(2))
        lo, hi = (torch.zeros((num_pages, hkv, d), dtype=torch.uint8, device="cuda").view(codes)
                  for _ in range(2))
        kc_cpu, vc_cpu = (np.zeros((num_pages, page_size, hkv, d), np.uint8) for _ in range(2))
        lo_cpu, hi_cpu = (np.zeros((num_pages, hkv, d), np.uint8) for _ in range(2))
        lens = _append_both(torch, g, dtype, (kc, vc, lo, hi), (kc_cpu, vc_cpu, lo_cpu, hi_cpu),
                            table, **scales)
        for got, want in ((kc, kc_cpu), (vc, vc_cpu), (lo, lo_cpu), (hi, hi_cpu)):
            assert np.array_equal(got.view(torch.uint8).cpu().numpy(), want), dtype
        q = torch.randn((3, 2, hq, d), generator=g).to(dtype)
        qg = q.cuda()
        quest = (dict(policy=["quest", "streaming"], quest_budget=64, quest_sink_pages=1,
                      streaming_sinks=4, streaming_window=40),
                 dict(policy="quest", quest_budget=32, window_left=100))
        for opts in (dict(), dict(window_left=40, softcap=0.9), *quest):
            bounds = "policy" in opts
            out = torch.full_like(qg, float("nan"))
            longattn.paged_decode_cuda(qg, kc, vc, out, table, lens, **scales, **opts,
                                       **(dict(kmin=lo, kmax=hi) if bounds else {}))
            torch.cuda.synchronize()
            want = longattn.paged_decode(_host(q), kc_cpu, vc_cpu, tables, lens, **scales,
                                         **opts,
                                         **(dict(kmin=lo_cpu, kmax=hi_cpu) if bounds else {}))
            err = rel_l2(_host(out), want)
            assert err < TOL[str(dtype)[6:]], (dtype, "decode", opts, err)
        cu_q = [0, 37, 38, 70]  # packed: 37, 1 and 32 new tokens of lens 152, 3 and 34
        _prefill_both(torch, g, dtype, (kc, vc), (kc_cpu, vc_cpu), (table, lens),
                      (((3, 3, hq, d), None), ((70, hq, d), cu_q)), **scales)


def test_merge_cuda_matches_cpu():
    torch = _torch_or_skip()
    b, s, h, d = 2, 33, 8, 128
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(23)
        o_a, o_b = (torch.randn((b, s, h, d), generator=g).to(dtype) for _ in range(2))
        lse_a, lse_b = (torch.randn((b, h, s), generator=g) for _ in range(2))
        lse_a[0, 1, :5] = float("-inf")
        lse_b[0, 1, 3:7] = float("-inf")  # rows 3, 4: both empty
        want_o, want_lse = longattn.merge(_host(o_a), _host(lse_a), _host(o_b), _host(lse_b))
        ag, bg, lag, lbg = (x.cuda() for x in (o_a, o_b, lse_a, lse_b))
        o_out, lse_out = torch.full_like(ag, float("nan")), torch.full_like(lag, float("nan"))
        longattn.merge_cuda(ag, lag, bg, lbg, o_out, lse_out)
        longattn.merge_cuda(ag, lag, bg, lbg, ag, lag)  # in place into a
        torch.cuda.synchronize()
        tol = TOL.get(str(dtype)[6:], 1e-6)
        for o, lse in ((o_out, lse_out), (ag, lag)):
            assert rel_l2(_host(o), want_o) < tol, dtype
            got_lse = _host(lse)
            assert np.array_equal(np.isinf(got_lse), np.isinf(want_lse))
            fin = np.isfinite(want_lse)
            assert np.allclose(got_lse[fin], want_lse[fin], rtol=1e-5, atol=1e-5), dtype


if __name__ == "__main__":
    tests = [(name, f) for name, f in sorted(globals().items()) if name.startswith("test_")]
    failed = 0
    for name, f in tests:
        try:
            f()
            print(f"test {name} ... ok")
        except Exception as e:  # noqa: BLE001 (report every failure, then the totals)
            failed += 1
            print(f"test {name} ... FAILED: {type(e).__name__}: {e}")
    passed = len(tests) - failed
    print(f"test result: {'ok' if failed == 0 else 'FAILED'}. {passed} passed; {failed} failed")
    raise SystemExit(1 if failed else 0)
