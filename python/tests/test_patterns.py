"""The block-sparse pattern constructors (``longformer_mask`` ...) against numpy predicates
written from docs/semantics.md "Patterns", and ``block_sparse`` under their masks against
an f64 reference of attention under "pattern AND element mask", element by element."""

import numpy as np
import pytest

import longattn
from test_cpu import RTOL, attend, rand, rel_l2, visible


def passage_of(passages, kb):
    """Index of the passage (consecutive blocks, ``passages[p]`` of them) holding block kb."""
    return int(np.searchsorted(np.cumsum(passages), kb, side="right"))


def draw(seed, h, qb, nk, r):
    return set(longattn.bigbird_random_blocks(seed, h, qb, nk, r))


# (name, constructor(seqlen_q, seqlen_k, num_k_blocks, **keywords) -> mask, heads of the
# mask, predicate(head, qb' = query block position, kb, num_k_blocks) -> listed). The
# predicates are semantics.md's, one line each.
PATTERNS = [
    ("longformer w1 g1", lambda sq, sk, nk, **o: longattn.longformer_mask(sq, sk, 1, 1, **o), 1,
     lambda h, qb, kb, nk: abs(qb - kb) <= 1 or kb < 1 or qb < 1),
    ("longformer w0 g2", lambda sq, sk, nk, **o: longattn.longformer_mask(sq, sk, 0, 2, **o), 1,
     lambda h, qb, kb, nk: abs(qb - kb) <= 0 or kb < 2 or qb < 2),
    ("bigbird w1 g1 r2 per head",
     lambda sq, sk, nk, **o: longattn.bigbird_mask(sq, sk, 1, 1, 2, heads=4, seed=5, **o), 4,
     lambda h, qb, kb, nk: abs(qb - kb) <= 1 or kb < 1 or qb < 1 or kb in draw(5, h, qb, nk, 2)),
    ("bigbird w0 g0 r3 broadcast",
     lambda sq, sk, nk, **o: longattn.bigbird_mask(sq, sk, 0, 0, 3, seed=1, **o), 1,
     lambda h, qb, kb, nk: abs(qb - kb) <= 0 or kb in draw(1, 0, qb, nk, 3)),
    ("strided s2", lambda sq, sk, nk, **o: longattn.sparse_transformer_strided_mask(sq, sk, 2, **o),
     1, lambda h, qb, kb, nk: kb <= qb and (qb - kb < 2 or (qb - kb) % 2 == 0)),
    ("strided s3", lambda sq, sk, nk, **o: longattn.sparse_transformer_strided_mask(sq, sk, 3, **o),
     1, lambda h, qb, kb, nk: kb <= qb and (qb - kb < 3 or (qb - kb) % 3 == 0)),
    ("fixed s3 c1",
     lambda sq, sk, nk, **o: longattn.sparse_transformer_fixed_mask(sq, sk, 3, 1, **o), 1,
     lambda h, qb, kb, nk: kb <= qb and (kb // 3 == qb // 3 or kb % 3 >= 3 - 1)),
    ("fixed s2 c0",
     lambda sq, sk, nk, **o: longattn.sparse_transformer_fixed_mask(sq, sk, 2, 0, **o), 1,
     lambda h, qb, kb, nk: kb <= qb and (kb // 2 == qb // 2 or kb % 2 >= 2 - 0)),
    ("passages 1 2 rest",
     lambda sq, sk, nk, **o: longattn.block_attention_mask(sq, sk, [1, 2, nk - 3], **o), 1,
     lambda h, qb, kb, nk: passage_of([1, 2, nk - 3], qb) in (2, passage_of([1, 2, nk - 3], kb))),
    ("passages of 2",
     lambda sq, sk, nk, **o: longattn.block_attention_mask(sq, sk, [2] * (nk // 2), **o), 1,
     lambda h, qb, kb, nk: passage_of([2] * (nk // 2), qb) in (nk // 2 - 1, kb // 2)),
    ("windows 1 2 3 5",
     lambda sq, sk, nk, **o: longattn.per_head_windows_mask(sq, sk, [1, 2, 3, 5], **o), 4,
     lambda h, qb, kb, nk: 0 <= qb - kb < [1, 2, 3, 5][h]),
    ("streaming sink1 w2",
     lambda sq, sk, nk, **o: longattn.streaming_heads_mask(sq, sk, [True, False, True, True], 1,
                                                           2, **o), 4,
     lambda h, qb, kb, nk: kb <= qb and (h == 1 or kb < 1 or 0 <= qb - kb < 2)),
    ("streaming sink0 w1",
     lambda sq, sk, nk, **o: longattn.streaming_heads_mask(sq, sk, [False, True, False, True],
                                                           0, 1, heads=4, **o), 4,
     lambda h, qb, kb, nk: kb <= qb and (h % 2 == 0 or kb < 0 or 0 <= qb - kb < 1)),
]
# seqlen_q, seqlen_k, block: odd lengths (short last blocks), seqlen_q < seqlen_k by 2 blocks.
LENGTHS = [(21, 29, 4), (10, 10, 3)]
ELEMENT_MASKS = [  # causal, window, sinks
    (False, None, 0),
    (True, None, 0),
    (True, (5, -1), 2),
    (False, (6, 3), 0),
    (False, (4, 2), 3),
]
CASES = [pytest.param(p, n, m, id=f"{p[0]}-{n[0]}x{n[1]}-{m}") for p in PATTERNS
         for n in LENGTHS for m in ELEMENT_MASKS]


def listed(pattern, sq, sk, block):
    """The pattern's block predicate as a bool array (mask heads, query blocks, key blocks),
    query block qb at key block position qb + (sk - sq) // block."""
    _, _, heads, pred = pattern
    nq, nk, shift = -(-sq // block), -(-sk // block), (sk - sq) // block
    return np.array([[[pred(h, qb + shift, kb, nk) for kb in range(nk)] for qb in range(nq)]
                     for h in range(heads)], bool)


def build(pattern, sq, sk, block, element_mask):
    causal, window, sinks = element_mask
    return pattern[1](sq, sk, -(-sk // block), block=block, causal=causal, window=window,
                      sinks=sinks)


def element(sq, sk, element_mask):
    causal, window, sinks = element_mask
    left, right = window or (-1, -1)
    return visible(sq, sk, left, right, causal, sinks)


@pytest.mark.parametrize("pattern, lengths, element_mask", CASES)
def test_pattern_lists_are_the_predicate_and_the_element_mask(pattern, lengths, element_mask):
    sq, sk, block = lengths
    mask = build(pattern, sq, sk, block, element_mask)
    pairs = listed(pattern, sq, sk, block)
    heads, nq, nk = pairs.shape
    elem = element(sq, sk, element_mask)
    offsets, indices, full = [0], [], []
    for h in range(heads):
        for qb in range(nq):
            for kb in range(nk):
                blk = elem[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block]
                if pairs[h, qb, kb] and blk.any():  # a block the mask hides is dropped
                    indices.append(kb)
                    full.append(bool(blk.all()))  # full exactly when every element shows
            offsets.append(len(indices))
    causal, window, sinks = element_mask
    assert mask["offsets"].dtype == np.int32 and mask["indices"].dtype == np.int32
    assert mask["full"].dtype == np.bool_
    assert mask["offsets"].tolist() == offsets
    assert mask["indices"].tolist() == indices
    assert mask["full"].tolist() == full
    assert {k: v for k, v in mask.items() if k not in ("offsets", "indices", "full")} == {
        "block_m": block, "block_n": block, "mask_batch": 1, "mask_heads": heads,
        "causal": causal, "window": window, "sinks": sinks}


@pytest.mark.parametrize("pattern, lengths, element_mask", CASES)
def test_block_sparse_under_a_pattern_is_attention_under_pattern_and_mask(pattern, lengths,
                                                                          element_mask):
    sq, sk, block = lengths
    b, hq, hkv, d = 2, 4, 2, 8
    rng = np.random.default_rng(sq)
    q, k, v = rand(rng, b, sq, hq, d), rand(rng, b, sk, hkv, d), rand(rng, b, sk, hkv, d)
    mask = build(pattern, sq, sk, block, element_mask)
    got = longattn.block_sparse(q, k, v, **mask, scale=0.3, softcap=2.0)
    # Element (i, j) of head h: the pattern lists (i's query block, j's key block), AND the
    # element mask shows (i, j).
    pairs = listed(pattern, sq, sk, block)
    rows, keys = np.arange(sq)[:, None] // block, np.arange(sk)[None, :] // block
    elem = element(sq, sk, element_mask)
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    want = np.zeros_like(q64)
    for h in range(hq):
        allowed = pairs[h if len(pairs) > 1 else 0][rows, keys] & elem
        g = h // (hq // hkv)
        for bi in range(b):
            want[bi, :, h] = attend(q64[bi, :, h], k64[bi, :, g], v64[bi, :, g], allowed, 0.3,
                                    2.0)
    assert rel_l2(got, want) < RTOL


def test_bigbird_random_blocks_are_distinct_seeded_draws():
    for nk, count in [(9, 3), (9, 0), (4, 4), (4, 9), (1, 1)]:
        got = longattn.bigbird_random_blocks(7, 1, 2, nk, count)
        assert got == sorted(set(got)) and len(got) == min(count, nk)
        assert all(0 <= kb < nk for kb in got)
        assert got == longattn.bigbird_random_blocks(7, 1, 2, nk, count)
    draws = {tuple(longattn.bigbird_random_blocks(s, h, qb, 64, 4))
             for s in range(2) for h in range(2) for qb in range(2)}
    assert len(draws) == 8  # the seed, head and query block each change the draw
    # Per head when heads > 1; one draw for every head otherwise.
    per_head = longattn.bigbird_mask(8, 8, 0, 0, 2, heads=2, seed=3, block=1)
    lists = np.split(per_head["indices"], per_head["offsets"][1:-1])
    assert lists[8].tolist() == sorted({0} | draw(3, 1, 0, 8, 2))
    assert lists[0].tolist() == sorted({0} | draw(3, 0, 0, 8, 2))


def test_a_pattern_mask_splats_into_block_sparse_cuda():
    # Every key is a keyword of block_sparse_cuda: the call gets past the arguments to the
    # CUDA check (not compiled, or no device 10**6), a ValueError, not a TypeError.
    class Iface:
        def __init__(self, shape):
            self.__cuda_array_interface__ = {"data": (0, False), "shape": shape,
                                             "typestr": "<f2", "version": 3}

    h = Iface((1, 128, 2, 64))
    mask = longattn.per_head_windows_mask(128, 128, [1, 2], block=64, causal=True)
    with pytest.raises(ValueError, match="longattn"):
        longattn.block_sparse_cuda(h, h, h, h, **mask, device=10**6)
    x = np.zeros((1, 128, 2, 64), np.float32)
    with pytest.raises(TypeError):  # the element-mask keywords the mask holds stay its own
        longattn.block_sparse(x, x, x, **mask, causal=False)


def test_bad_pattern_arguments_raise_value_error():
    m = longattn
    bad = [
        (lambda: m.sparse_transformer_strided_mask(8, 8, 0, block=2), "stride"),
        (lambda: m.sparse_transformer_fixed_mask(8, 8, 0, 1, block=2), "stride"),
        (lambda: m.per_head_windows_mask(8, 8, [1, 2], heads=3, block=2), "windows per head"),
        (lambda: m.per_head_windows_mask(8, 8, [1, 0], block=2), "window"),
        (lambda: m.streaming_heads_mask(8, 8, [True], 1, 1, heads=2, block=2), "streaming"),
        (lambda: m.block_attention_mask(8, 8, [1, 2], block=2), "passages"),  # 3 of 4 blocks
        (lambda: m.block_attention_mask(8, 8, [2, 0, 2], block=2), "passages"),
        (lambda: m.longformer_mask(9, 8, 1, 1, block=1), "seqlen_k - seqlen_q"),  # sq > sk
        (lambda: m.longformer_mask(5, 8, 1, 1, block=2), "seqlen_k - seqlen_q"),  # 3 keys
        (lambda: m.longformer_mask(8, 8, 1, 1, block=0), "block"),
        (lambda: m.bigbird_mask(8, 8, 1, 1, 1, heads=0, block=2), "heads"),
        (lambda: m.longformer_mask(8, 8, 1, 1, block=2, window=(-2, 0)), "window"),
        (lambda: m.bigbird_random_blocks(0, 0, 0, 2**32, 2**31), "BigBird"),
    ]
    for call, what in bad:
        with pytest.raises(ValueError, match=what):
            call()
    # A broadcast pattern of any head count, and one head of a per-head one, build.
    assert m.longformer_mask(8, 8, 1, 1, block=2)["mask_heads"] == 1
    assert m.per_head_windows_mask(8, 8, [3], block=2)["mask_heads"] == 1
