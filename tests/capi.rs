//! The C API (`include/longattn.h`, `src/capi.rs`) on the CPU: results equal the Rust API's,
//! and every bad argument (NULL pointers, bad shapes, options, lengths, dtype codes,
//! overlapping buffers) returns its status code with a message instead of crashing.

mod common;

use common::{random_vec, rel_l2, rng};
use longattn::capi::*;
use longattn::*;
use std::ffi::CStr;
use std::ptr;

fn desc(batch: usize, sq: usize, sk: usize, hq: usize, hkv: usize, d: usize) -> CDenseDesc {
    CDenseDesc {
        batch,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        seqlen_q: sq,
        seqlen_k: sk,
        cu_seqlens_q: ptr::null(),
        cu_seqlens_k: ptr::null(),
        scale: 0.0,
        softcap: 0.0,
        window_left: -1,
        window_right: -1,
        causal: 0,
        sinks: 0,
    }
}

fn cstrides(s: Strides) -> CStrides {
    CStrides {
        batch: s.batch,
        seq: s.seq,
        head: s.head,
    }
}

fn tensor<T>(data: &[T], s: Strides) -> CTensor {
    CTensor {
        data: data.as_ptr().cast(),
        len: data.len(),
        strides: cstrides(s),
    }
}

fn tensor_mut<T>(data: &mut [T], s: Strides) -> CTensorMut {
    CTensorMut {
        data: data.as_mut_ptr().cast(),
        len: data.len(),
        strides: cstrides(s),
    }
}

/// A C tensor over the device address `p` (a cudarc `device_ptr`) of `len` elements.
fn device_tensor(p: u64, len: usize, s: Strides) -> CTensor {
    CTensor {
        data: p as *const _,
        len,
        strides: cstrides(s),
    }
}

fn device_tensor_mut(p: u64, len: usize, s: Strides) -> CTensorMut {
    CTensorMut {
        data: p as *mut _,
        len,
        strides: cstrides(s),
    }
}

fn last_error() -> String {
    // SAFETY: longattn_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(longattn_last_error()) }
        .to_string_lossy()
        .into_owned()
}

struct Case {
    d: CDenseDesc,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    qs: Strides,
    ks: Strides,
}

fn case(seed: u64, d: CDenseDesc) -> Case {
    let mut r = rng(seed);
    let (qs, ks) = (
        Strides::contiguous(d.seqlen_q, d.heads_q, d.head_dim),
        Strides::contiguous(d.seqlen_k, d.heads_kv, d.head_dim),
    );
    Case {
        q: random_vec(&mut r, d.batch * d.seqlen_q * d.heads_q * d.head_dim),
        k: random_vec(&mut r, d.batch * d.seqlen_k * d.heads_kv * d.head_dim),
        v: random_vec(&mut r, d.batch * d.seqlen_k * d.heads_kv * d.head_dim),
        d,
        qs,
        ks,
    }
}

/// Runs the C entry point; returns the status, the output and the LSE.
fn run_c(c: &Case) -> (i32, Vec<f32>, Vec<f32>) {
    let (mut out_len, mut lse_len) = (0usize, 0usize);
    // SAFETY: valid descriptor and writable lengths.
    let st = unsafe { longattn_dense_sizes(&c.d, &mut out_len, &mut lse_len) };
    if st != LONGATTN_OK {
        return (st, vec![], vec![]);
    }
    let mut out = vec![f32::NAN; out_len];
    let mut lse = vec![f32::NAN; lse_len];
    // SAFETY: every buffer holds `len` f32s; out and lse are distinct allocations.
    let st = unsafe {
        longattn_dense_forward_cpu(
            &c.d,
            0,
            tensor(&c.q, c.qs),
            tensor(&c.k, c.ks),
            tensor(&c.v, c.ks),
            tensor_mut(&mut out, c.qs),
            lse.as_mut_ptr(),
            lse.len(),
        )
    };
    (st, out, lse)
}

#[test]
fn c_api_matches_the_f64_reference() {
    // Causal + window + sinks + softcap, GQA, sq != sk; then the FA2 composition of causal
    // with an unbounded-right window.
    let mut d = desc(2, 5, 9, 4, 2, 16);
    d.window_left = 3;
    d.window_right = -1;
    d.causal = 1;
    d.sinks = 1;
    d.softcap = 20.0;
    let c = case(1, d);
    let (st, out, lse) = run_c(&c);
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let opts = AttentionOptions::default()
        .with_window(Window::new(Some(3), Some(0)))
        .with_sinks(1)
        .with_softcap(20.0);
    let shape = AttentionShape {
        batch: 2,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 16,
        seqlens: SeqLens::Fixed {
            seqlen_q: 5,
            seqlen_k: 9,
        },
    };
    let attn = FlashAttention::new(&shape, &opts).unwrap();
    let (want, want_lse) = reference::dense_attention_f64(
        &attn,
        Strided::new(&c.q[..], c.qs),
        Strided::new(&c.k[..], c.ks),
        Strided::new(&c.v[..], c.ks),
    )
    .unwrap();
    let got: Vec<f64> = out.iter().map(|&x| x as f64).collect();
    let err = rel_l2(&got, &want);
    assert!(err < 1e-5, "rel L2 {err}");
    for (g, w) in lse.iter().zip(&want_lse) {
        assert!(
            (*g as f64 - w).abs() < 1e-4 || (g.is_infinite() && w.is_infinite()),
            "lse {g} vs {w}"
        );
    }
}

#[test]
fn c_api_varlen_and_bf16() {
    let cu_q = [0i32, 3, 3, 10];
    let cu_k = [0i32, 4, 9, 9];
    let mut d = desc(3, 0, 0, 2, 1, 8);
    d.cu_seqlens_q = cu_q.as_ptr();
    d.cu_seqlens_k = cu_k.as_ptr();
    d.causal = 1;
    let mut r = rng(2);
    let (qs, ks) = (Strides::contiguous(10, 2, 8), Strides::contiguous(9, 1, 8));
    let q: Vec<bf16> = random_vec(&mut r, 10 * 2 * 8);
    let k: Vec<bf16> = random_vec(&mut r, 9 * 8);
    let v: Vec<bf16> = random_vec(&mut r, 9 * 8);
    let mut out = vec![bf16::NAN; 10 * 2 * 8];
    // SAFETY: buffers hold `len` bf16s; no LSE.
    let st = unsafe {
        longattn_dense_forward_cpu(
            &d,
            2,
            tensor(&q, qs),
            tensor(&k, ks),
            tensor(&v, ks),
            tensor_mut(&mut out, qs),
            ptr::null_mut(),
            0,
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let shape = AttentionShape {
        batch: 3,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 8,
        seqlens: SeqLens::Varlen {
            cu_seqlens_q: &cu_q,
            cu_seqlens_k: &cu_k,
        },
    };
    let attn = FlashAttention::new(&shape, &AttentionOptions::causal()).unwrap();
    let (want, _) = reference::dense_attention_f64(
        &attn,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
    )
    .unwrap();
    let got: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
    let err = rel_l2(&got, &want);
    assert!(err < 1e-2, "rel L2 {err}");
    // Sequence 2 has queries but no keys: its rows are exactly 0 (poison overwritten).
    assert!(out[3 * 16..].iter().all(|x| x.to_f32() == 0.0));
}

#[test]
fn c_api_rejects_bad_arguments_with_codes() {
    let good = desc(1, 4, 4, 2, 1, 8);
    let c = case(3, good);
    let cases: Vec<(&str, CDenseDesc, i32)> = vec![
        (
            "heads_kv 0",
            CDenseDesc {
                heads_kv: 0,
                ..good
            },
            1,
        ),
        (
            "gqa ratio",
            CDenseDesc {
                heads_kv: 3,
                ..good
            },
            1,
        ),
        (
            "head_dim 0",
            CDenseDesc {
                head_dim: 0,
                ..good
            },
            1,
        ),
        (
            "window -2",
            CDenseDesc {
                window_left: -2,
                ..good
            },
            3,
        ),
        (
            "scale nan",
            CDenseDesc {
                scale: f32::NAN,
                ..good
            },
            3,
        ),
        (
            "softcap inf",
            CDenseDesc {
                softcap: f32::INFINITY,
                ..good
            },
            3,
        ),
        (
            "batch huge",
            CDenseDesc {
                batch: usize::MAX,
                ..good
            },
            1,
        ),
    ];
    for (name, d, want) in cases {
        let bad = Case {
            d,
            q: c.q.clone(),
            k: c.k.clone(),
            v: c.v.clone(),
            qs: c.qs,
            ks: c.ks,
        };
        let (st, _, _) = run_c(&bad);
        assert_eq!(st, want, "{name}: {}", last_error());
        assert!(!last_error().is_empty(), "{name}: no message");
    }
    // One-sided varlen.
    let cu = [0i32, 4];
    let d = CDenseDesc {
        cu_seqlens_q: cu.as_ptr(),
        ..good
    };
    // SAFETY: valid descriptor; NULL outputs are allowed.
    let st = unsafe { longattn_dense_sizes(&d, ptr::null_mut(), ptr::null_mut()) };
    assert_eq!(st, LONGATTN_ERR_NULL_POINTER, "{}", last_error());
    // NULL descriptor, NULL data, unknown dtype, short buffers, overlapping out.
    // SAFETY: NULL descriptor is checked before use.
    let st = unsafe { longattn_dense_sizes(ptr::null(), ptr::null_mut(), ptr::null_mut()) };
    assert_eq!(st, LONGATTN_ERR_NULL_POINTER);
    let mut out = vec![0f32; c.q.len()];
    let call = |q: CTensor, out: CTensorMut, dtype: i32| {
        // SAFETY: every non-NULL tensor holds `len` f32s.
        unsafe {
            longattn_dense_forward_cpu(
                &good,
                dtype,
                q,
                tensor(&c.k, c.ks),
                tensor(&c.v, c.ks),
                out,
                ptr::null_mut(),
                0,
            )
        }
    };
    let null_q = CTensor {
        data: ptr::null(),
        ..tensor(&c.q, c.qs)
    };
    assert_eq!(
        call(null_q, tensor_mut(&mut out, c.qs), 0),
        LONGATTN_ERR_NULL_POINTER
    );
    assert_eq!(
        call(tensor(&c.q, c.qs), tensor_mut(&mut out, c.qs), 7),
        5,
        "{}",
        last_error()
    );
    assert_eq!(
        call(tensor(&c.q[..3], c.qs), tensor_mut(&mut out, c.qs), 0),
        1,
        "{}",
        last_error()
    );
    // out aliasing q: refused before any slice is formed.
    let mut shared = c.q.clone();
    let q_view = tensor(&shared, c.qs);
    let out_view = tensor_mut(&mut shared, c.qs);
    assert_eq!(call(q_view, out_view, 0), 1, "{}", last_error());
    assert!(last_error().contains("overlaps"), "{}", last_error());
    // A good call clears the message.
    assert_eq!(call(tensor(&c.q, c.qs), tensor_mut(&mut out, c.qs), 0), 0);
    assert_eq!(last_error(), "");
}

#[test]
fn c_header_version_matches_the_crate() {
    let header = include_str!("../include/longattn.h");
    let field = |name: &str| -> String {
        let line = header
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} missing"));
        line.split_whitespace()
            .nth(2)
            .unwrap()
            .trim_matches('"')
            .to_string()
    };
    let want = env!("CARGO_PKG_VERSION");
    let parts: Vec<&str> = want.split('.').collect();
    assert_eq!(field("LONGATTN_VERSION_MAJOR"), parts[0]);
    assert_eq!(field("LONGATTN_VERSION_MINOR"), parts[1]);
    assert_eq!(field("LONGATTN_VERSION_PATCH"), parts[2]);
    assert_eq!(field("LONGATTN_VERSION_STRING"), want);
    // SAFETY: static NUL-terminated string.
    let lib = unsafe { CStr::from_ptr(longattn_version()) };
    assert_eq!(lib.to_str().unwrap(), want);
}

/// A paged problem and its dense twin: sequence `b`'s tokens gathered into contiguous K/V.
struct PagedCase {
    desc: CPagedDesc,
    _tables: (Vec<i32>, Vec<i32>),
    q: Vec<f32>,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
}

/// Geometry of a [`PagedCase`]: `[page_size, heads_kv, heads_q, head_dim, q_len,
/// max_pages_per_seq, num_pages]`.
type Geometry = [usize; 7];

fn paged_case(seed: u64) -> PagedCase {
    // Pages handed out in a scrambled order; unused entries are -1.
    let order = [7i32, 2, 9, 0, 4, 1, 8, 3, 5];
    paged_case_with(seed, [3, 2, 4, 8, 2, 3, 10], vec![7, 2, 9], &order)
}

/// A paged case of geometry `g` whose sequences hold `seqlens` tokens, pages handed out in
/// the order `order`.
fn paged_case_with(seed: u64, g: Geometry, seqlens: Vec<i32>, order: &[i32]) -> PagedCase {
    let [page_size, hkv, hq, d, q_len, max_pages, num_pages] = g;
    let mut block_table = vec![-1i32; seqlens.len() * max_pages];
    let mut next = 0;
    for (b, &n) in seqlens.iter().enumerate() {
        for p in 0..(n as usize).div_ceil(page_size) {
            block_table[b * max_pages + p] = order[next];
            next += 1;
        }
    }
    let mut r = rng(seed);
    let cache_len = num_pages * page_size * hkv * d;
    let desc = CPagedDesc {
        num_pages,
        page_size,
        heads_kv: hkv,
        head_dim: d,
        batch: seqlens.len(),
        block_table: block_table.as_ptr(),
        max_pages_per_seq: max_pages,
        seqlens_k: seqlens.as_ptr(),
        heads_q: hq,
        q_len,
        scale: 0.0,
        softcap: 0.0,
        window_left: -1,
        window_right: -1,
        sinks: 0,
    };
    PagedCase {
        desc,
        q: random_vec(&mut r, seqlens.len() * q_len * hq * d),
        k_cache: random_vec(&mut r, cache_len),
        v_cache: random_vec(&mut r, cache_len),
        _tables: (block_table, seqlens),
    }
}

/// Sequence `b`'s tokens, `[seqlens_k[b], heads_kv, head_dim]`, gathered from a paged cache.
fn gather<T: Copy>(c: &PagedCase, cache: &[T], b: usize) -> Vec<T> {
    let d = c.desc;
    let (ps, row) = (d.page_size, d.heads_kv * d.head_dim);
    let (table, seqlens) = (&c._tables.0, &c._tables.1);
    (0..seqlens[b] as usize)
        .flat_map(|t| {
            let page = table[b * d.max_pages_per_seq + t / ps] as usize;
            let off = (page * ps + t % ps) * row;
            cache[off..off + row].to_vec()
        })
        .collect()
}

/// Checks a decode output `[batch, q_len, heads_q, head_dim]` of `c.q` against the f64
/// reference of each sequence: causal (bottom-right) dense attention over its tokens
/// (`k[b]`, `v[b]`: `[seqlens_k[b], heads_kv, head_dim]`).
fn check_dense_twin(c: &PagedCase, out: &[f32], (k, v): (&Vec<Vec<f32>>, &Vec<Vec<f32>>)) {
    let d = c.desc;
    let qs = Strides::contiguous(d.q_len, d.heads_q, d.head_dim);
    for b in 0..d.batch {
        let n = c._tables.1[b] as usize;
        let shape = AttentionShape {
            batch: 1,
            heads_q: d.heads_q,
            heads_kv: d.heads_kv,
            head_dim: d.head_dim,
            seqlens: SeqLens::Fixed {
                seqlen_q: d.q_len,
                seqlen_k: n,
            },
        };
        let attn = FlashAttention::new(&shape, &AttentionOptions::causal()).unwrap();
        let rows = d.q_len * d.heads_q * d.head_dim;
        let ks = Strides::contiguous(n, d.heads_kv, d.head_dim);
        let (want, _) = reference::dense_attention_f64(
            &attn,
            Strided::new(&c.q[b * rows..(b + 1) * rows], qs),
            Strided::new(&k[b][..], ks),
            Strided::new(&v[b][..], ks),
        )
        .unwrap();
        let got: Vec<f64> = out[b * rows..(b + 1) * rows]
            .iter()
            .map(|&x| x as f64)
            .collect();
        let err = rel_l2(&got, &want);
        assert!(err < 1e-5, "sequence {b}: rel L2 {err}");
    }
}

#[test]
fn c_api_paged_decode_equals_dense_over_gathered_tokens() {
    let c = paged_case(11);
    let d = c.desc;
    let (mut cache_len, mut out_len, mut lse_len) = (0, 0, 0);
    // SAFETY: valid descriptor (tables alive in `c`), writable outputs.
    let st = unsafe { longattn_paged_sizes(&d, &mut cache_len, &mut out_len, &mut lse_len) };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    assert_eq!(cache_len, c.k_cache.len());
    let qs = Strides::contiguous(d.q_len, d.heads_q, d.head_dim);
    let mut out = vec![f32::NAN; out_len];
    let mut lse = vec![f32::NAN; lse_len];
    // SAFETY: buffers sized by longattn_paged_sizes; distinct allocations.
    let st = unsafe {
        longattn_paged_decode_cpu(
            &d,
            0,
            tensor(&c.q, qs),
            c.k_cache.as_ptr().cast(),
            c.v_cache.as_ptr().cast(),
            cache_len,
            tensor_mut(&mut out, qs),
            lse.as_mut_ptr(),
            lse.len(),
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    // Dense twin per sequence: causal (bottom-right) over the gathered tokens.
    let tokens = |cache: &[f32]| (0..d.batch).map(|b| gather(&c, cache, b)).collect();
    check_dense_twin(&c, &out, (&tokens(&c.k_cache), &tokens(&c.v_cache)));
    // Bad tables and arguments come back as codes.
    let mut bad_table = c._tables.0.clone();
    bad_table[0] = 10; // page id == num_pages
    let bad = CPagedDesc {
        block_table: bad_table.as_ptr(),
        ..d
    };
    // SAFETY: valid descriptor.
    let st =
        unsafe { longattn_paged_sizes(&bad, ptr::null_mut(), ptr::null_mut(), ptr::null_mut()) };
    assert_eq!(st, 4, "{}", last_error());
    for (name, bad, want) in [
        ("heads_q", CPagedDesc { heads_q: 3, ..d }, 1),
        ("q_len 0", CPagedDesc { q_len: 0, ..d }, 1),
        ("page_size 0", CPagedDesc { page_size: 0, ..d }, 1),
        (
            "null table",
            CPagedDesc {
                block_table: ptr::null(),
                ..d
            },
            LONGATTN_ERR_NULL_POINTER,
        ),
        (
            "overflow",
            CPagedDesc {
                max_pages_per_seq: usize::MAX,
                ..d
            },
            1,
        ),
    ] {
        // SAFETY: valid descriptor or NULL tables (checked).
        let st = unsafe {
            longattn_paged_sizes(&bad, ptr::null_mut(), ptr::null_mut(), ptr::null_mut())
        };
        assert_eq!(st, want, "{name}: {}", last_error());
    }
}

/// `longattn_dense_forward_cuda` checks its arguments before it opens a GPU: a bad
/// descriptor or a NULL buffer is refused with its own status on any machine; valid
/// arguments without a usable GPU give `NoGpu` (7) or, in a CPU-only build,
/// `CudaNotCompiled` (6). (Pointers are never dereferenced on the host.)
#[test]
fn c_api_cuda_refuses_before_touching_a_gpu() {
    let c = case(3, desc(1, 4, 4, 2, 2, 64));
    let (q, mut out) = (vec![bf16::ZERO; c.q.len()], vec![bf16::ZERO; c.q.len()]);
    let call = |d: &CDenseDesc, q: CTensor, out: CTensorMut| {
        // SAFETY: refused before any pointer is used (or, without a GPU, never used).
        unsafe {
            longattn_dense_forward_cuda(d, 2, q, q, q, out, ptr::null_mut(), 0, 0, ptr::null_mut())
        }
    };
    let bad = CDenseDesc { heads_kv: 0, ..c.d };
    assert_eq!(call(&bad, tensor(&q, c.qs), tensor_mut(&mut out, c.qs)), 1);
    let null_q = CTensor {
        data: ptr::null(),
        ..tensor(&q, c.qs)
    };
    assert_eq!(call(&c.d, null_q, tensor_mut(&mut out, c.qs)), 9);
    assert!(last_error().contains('q'), "{}", last_error());
    if longattn::device::open_gpu(0).is_err() {
        let st = call(&c.d, tensor(&q, c.qs), tensor_mut(&mut out, c.qs));
        assert!(st == 6 || st == 7, "status {st}: {}", last_error());
    }
}

/// The CUDA entry point on device buffers allocated by another library (cudarc here, as
/// PyTorch or a C++ server would) and that library's stream, against the f64 reference.
#[test]
fn c_api_cuda_matches_the_f64_reference() {
    use longattn::cudarc::driver::{DevicePtr, DevicePtrMut};
    let Some(stream) = common::gpu_stream_or_skip("c_api_cuda_matches_the_f64_reference") else {
        return;
    };
    for (n, d) in [
        desc(2, 37, 70, 4, 2, 64),
        CDenseDesc {
            causal: 1,
            window_left: 20,
            sinks: 2,
            ..desc(1, 130, 130, 2, 1, 128)
        },
        desc(1, 9, 300, 2, 2, 96),
    ]
    .into_iter()
    .enumerate()
    {
        let c = case(40 + n as u64, d);
        let to_bf16 = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
        let (q, k, v) = (to_bf16(&c.q), to_bf16(&c.k), to_bf16(&c.v));
        let dq = stream.clone_htod(&q).unwrap();
        let dk = stream.clone_htod(&k).unwrap();
        let dv = stream.clone_htod(&v).unwrap();
        let mut dout = stream.clone_htod(&vec![bf16::NAN; q.len()]).unwrap();
        let lse_len = d.batch * d.heads_q * d.seqlen_q;
        let mut dlse = stream.clone_htod(&vec![f32::NAN; lse_len]).unwrap();
        let st = {
            let (pq, _g1) = dq.device_ptr(&stream);
            let (pk, _g2) = dk.device_ptr(&stream);
            let (pv, _g3) = dv.device_ptr(&stream);
            let (po, _g4) = dout.device_ptr_mut(&stream);
            let (pl, _g5) = dlse.device_ptr_mut(&stream);
            // SAFETY: live device allocations of the stated lengths on this context and
            // stream; out and lse are distinct allocations.
            unsafe {
                longattn_dense_forward_cuda(
                    &d,
                    2,
                    device_tensor(pq, q.len(), c.qs),
                    device_tensor(pk, k.len(), c.ks),
                    device_tensor(pv, v.len(), c.ks),
                    device_tensor_mut(po, q.len(), c.qs),
                    pl as *mut f32,
                    lse_len,
                    0,
                    stream.cu_stream() as *mut _,
                )
            }
        };
        assert_eq!(st, LONGATTN_OK, "case {n}: {}", last_error());
        let out: Vec<f32> = stream
            .clone_dtoh(&dout)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        // The C API's CPU path (checked against the f64 reference above) on the same
        // bf16-rounded inputs.
        let rounded = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let c_bf16 = Case {
            q: rounded(&q),
            k: rounded(&k),
            v: rounded(&v),
            ..c
        };
        let (cpu_st, cpu_out, _) = run_c(&c_bf16);
        assert_eq!(cpu_st, LONGATTN_OK, "case {n}: {}", last_error());
        let want: Vec<f64> = cpu_out.iter().map(|&x| x as f64).collect();
        let err = rel_l2(&out.iter().map(|&x| x as f64).collect::<Vec<_>>(), &want);
        assert!(err < 2e-2, "case {n}: rel L2 {err} vs the CPU path");
        let lse = stream.clone_dtoh(&dlse).unwrap();
        assert!(lse.iter().all(|x| !x.is_nan()), "case {n}: LSE not written");
    }
}

/// `longattn_paged_decode_cuda`: arguments refused before a GPU is opened; on a GPU, the
/// same decode as the C CPU path on the same (bf16-rounded) values, on buffers and a stream
/// owned by another library.
#[test]
fn c_api_paged_decode_cuda() {
    use longattn::cudarc::driver::{DevicePtr, DevicePtrMut};
    let c = paged_case(12);
    let d = c.desc;
    let qs = Strides::contiguous(d.q_len, d.heads_q, d.head_dim);
    let to_bf16 = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
    let (q, kc, vc) = (to_bf16(&c.q), to_bf16(&c.k_cache), to_bf16(&c.v_cache));
    let mut out = vec![bf16::NAN; q.len()];
    let call = |d: &CPagedDesc, q: CTensor, k: *const bf16, out: CTensorMut, stream| {
        // SAFETY: host pointers are refused (or, without a GPU, never used); device pointers
        // below are live allocations of the stated lengths.
        unsafe {
            longattn_paged_decode_cuda(
                d,
                2,
                q,
                k.cast(),
                k.cast(),
                kc.len(),
                out,
                ptr::null_mut(),
                0,
                0,
                stream,
            )
        }
    };
    let bad = CPagedDesc { heads_q: 3, ..d };
    let st = call(
        &bad,
        tensor(&q, qs),
        kc.as_ptr(),
        tensor_mut(&mut out, qs),
        ptr::null_mut(),
    );
    assert_eq!(st, 1, "{}", last_error());
    let st = call(
        &d,
        tensor(&q, qs),
        ptr::null(),
        tensor_mut(&mut out, qs),
        ptr::null_mut(),
    );
    assert_eq!(st, 9, "{}", last_error());
    let Some(ctx) = common::gpu_or_skip("c_api_paged_decode_cuda") else {
        let (q_t, out_t) = (tensor(&q, qs), tensor_mut(&mut out, qs));
        let st = call(&d, q_t, kc.as_ptr(), out_t, ptr::null_mut());
        assert!(st == 6 || st == 7, "status {st}: {}", last_error());
        return;
    };
    let s = ctx.default_stream();
    let (dq, dk) = (s.clone_htod(&q).unwrap(), s.clone_htod(&kc).unwrap());
    let dv = s.clone_htod(&vc).unwrap();
    let mut dout = s.clone_htod(&out).unwrap();
    let st = {
        let (pq, _g1) = dq.device_ptr(&s);
        let (pk, _g2) = dk.device_ptr(&s);
        let (pv, _g3) = dv.device_ptr(&s);
        let (po, _g4) = dout.device_ptr_mut(&s);
        // SAFETY: live device allocations of the stated lengths on this context.
        unsafe {
            longattn_paged_decode_cuda(
                &d,
                2,
                device_tensor(pq, q.len(), qs),
                pk as *const _,
                pv as *const _,
                kc.len(),
                device_tensor_mut(po, q.len(), qs),
                ptr::null_mut(),
                0,
                0,
                s.cu_stream() as *mut _,
            )
        }
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let got: Vec<f64> = s
        .clone_dtoh(&dout)
        .unwrap()
        .iter()
        .map(|x| x.to_f64())
        .collect();
    let rounded = |x: &[bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    let (qr, kr, vr) = (rounded(&q), rounded(&kc), rounded(&vc));
    let mut want = vec![f32::NAN; q.len()];
    // SAFETY: host buffers of the stated lengths; distinct allocations.
    let st = unsafe {
        longattn_paged_decode_cpu(
            &d,
            0,
            tensor(&qr, qs),
            kr.as_ptr().cast(),
            vr.as_ptr().cast(),
            kr.len(),
            tensor_mut(&mut want, qs),
            ptr::null_mut(),
            0,
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let want: Vec<f64> = want.iter().map(|&x| x as f64).collect();
    let err = rel_l2(&got, &want);
    assert!(err < 2e-2, "rel L2 {err} vs the CPU path");
}

/// The FP8 C entry points: `longattn_fp8_quantize` writes the crate's e4m3 bytes, and the CPU
/// decode over them equals the Rust API over the same cache (bit for bit); bad scales, a
/// lone NULL scale array and unknown dtypes are refused with their codes; the CUDA entry
/// point refuses before touching a GPU and, with one, matches the CPU path.
#[test]
fn c_api_fp8_cache() {
    let c = paged_case(21);
    let d = c.desc;
    let n = c.k_cache.len();
    let (ks, vs) = ([0.004f32, 0.002], [0.003f32, 0.005]);
    let quantize = |src: &[f32], scales: &[f32]| {
        let row = d.heads_kv * d.head_dim;
        let mut out = vec![0u8; n];
        for (t, (src, dst)) in src.chunks(row).zip(out.chunks_mut(row)).enumerate() {
            for (h, &scale) in scales.iter().enumerate() {
                let r = h * d.head_dim..(h + 1) * d.head_dim;
                // SAFETY: head_dim floats and bytes, distinct allocations.
                let st = unsafe {
                    longattn_fp8_quantize(
                        src[r.clone()].as_ptr(),
                        d.head_dim,
                        scale,
                        dst[r].as_mut_ptr(),
                    )
                };
                assert_eq!(st, LONGATTN_OK, "token {t}: {}", last_error());
            }
        }
        out
    };
    let (k8, v8) = (quantize(&c.k_cache, &ks), quantize(&c.v_cache, &vs));
    let row = d.heads_kv * d.head_dim;
    for (i, (&x, &b)) in c.k_cache.iter().zip(&k8).enumerate() {
        assert_eq!(
            F8E4M3::from_f32(x / ks[(i % row) / d.head_dim]).to_bits(),
            b
        );
    }
    let cache = CFp8Cache {
        k_cache: k8.as_ptr().cast(),
        v_cache: v8.as_ptr().cast(),
        cache_len: n,
        k_scales: ks.as_ptr(),
        v_scales: vs.as_ptr(),
    };
    let qs = Strides::contiguous(d.q_len, d.heads_q, d.head_dim);
    let mut out = vec![f32::NAN; c.q.len()];
    let mut lse = vec![f32::NAN; d.batch * d.heads_q * d.q_len];
    // SAFETY: buffers of the stated lengths; distinct allocations.
    let st = unsafe {
        longattn_paged_decode_fp8_cpu(
            &d,
            0,
            tensor(&c.q, qs),
            cache,
            tensor_mut(&mut out, qs),
            lse.as_mut_ptr(),
            lse.len(),
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    // The Rust API over the same bytes.
    let (table, seqlens) = (&c._tables.0, &c._tables.1);
    let layout = PagedLayout {
        num_pages: d.num_pages,
        page_size: d.page_size,
        heads_kv: d.heads_kv,
        head_dim: d.head_dim,
    };
    let pt = PageTable {
        block_table: table,
        max_pages_per_seq: d.max_pages_per_seq,
        seqlens_k: seqlens,
    };
    let scales = KvScales::new(ks.to_vec(), vs.to_vec()).unwrap();
    let rcache = PagedCache::new(layout, pt)
        .unwrap()
        .with_kv_scales(scales)
        .unwrap();
    let dec = PagedDecode::new(&rcache, d.heads_q, d.q_len, &AttentionOptions::default()).unwrap();
    let as_fp8 = |b: &[u8]| b.iter().map(|&x| F8E4M3::from_bits(x)).collect::<Vec<_>>();
    let (kf, vf) = (as_fp8(&k8), as_fp8(&v8));
    let mut want = vec![f32::NAN; c.q.len()];
    let mut want_lse = vec![f32::NAN; lse.len()];
    dec.forward_cpu(
        Strided::new(&c.q[..], qs),
        KvPages {
            k: &kf[..],
            v: &vf[..],
        },
        None,
        Strided::new(&mut want[..], qs),
        Some(&mut want_lse[..]),
    )
    .unwrap();
    assert!(
        out.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert!(
        lse.iter()
            .zip(&want_lse)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );

    // Refusals: a lone NULL scale array, a non-positive scale, an unknown dtype code.
    let call = |cache: CFp8Cache, dtype: i32, out: &mut [f32]| {
        // SAFETY: as above.
        unsafe {
            longattn_paged_decode_fp8_cpu(
                &d,
                dtype,
                tensor(&c.q, qs),
                cache,
                tensor_mut(out, qs),
                ptr::null_mut(),
                0,
            )
        }
    };
    let lone = CFp8Cache {
        v_scales: ptr::null(),
        ..cache
    };
    assert_eq!(call(lone, 0, &mut out), 9, "{}", last_error());
    let zero = [0.0f32, 1.0];
    let bad_scale = CFp8Cache {
        k_scales: zero.as_ptr(),
        ..cache
    };
    assert_eq!(call(bad_scale, 0, &mut out), 3, "{}", last_error());
    assert_eq!(call(cache, 7, &mut out), 5, "{}", last_error());
    // A descriptor whose heads_kv could not be a real cache is refused before the scales
    // are read (nothing allocated for them).
    let huge = CPagedDesc {
        heads_kv: usize::MAX / 8,
        ..d
    };
    // SAFETY: refused before any scale is read.
    let st = unsafe {
        longattn_paged_decode_fp8_cpu(
            &huge,
            0,
            tensor(&c.q, qs),
            cache,
            tensor_mut(&mut out, qs),
            ptr::null_mut(),
            0,
        )
    };
    assert_eq!(st, 1, "{}", last_error());
    // SAFETY: a zero scale is refused before any pointer is read.
    let st = unsafe { longattn_fp8_quantize(c.q.as_ptr(), 4, 0.0, k8.as_ptr().cast_mut()) };
    assert_eq!(st, 3, "{}", last_error());

    // CUDA: refused before touching a GPU (host pointers are never dereferenced there).
    // SAFETY: a NULL cache pointer is refused before the GPU is opened.
    let st = unsafe {
        longattn_paged_decode_fp8_cuda(
            &d,
            2,
            tensor(&c.q, qs),
            CFp8Cache {
                k_cache: ptr::null(),
                ..cache
            },
            tensor_mut(&mut out, qs),
            ptr::null_mut(),
            0,
            0,
            ptr::null_mut(),
        )
    };
    assert_eq!(st, 9, "{}", last_error());
}

/// The paged prefill C entry points equal the Rust API bit for bit (fixed `q_len` and varlen
/// `cu_seqlens_q`), size queries agree, bad offsets and NULL pointers are refused with their
/// codes, and the CUDA entry point refuses before touching a GPU.
#[test]
fn c_api_paged_prefill() {
    let c = paged_case(31);
    let d = CPagedDesc {
        window_right: 0, // causal
        ..c.desc
    };
    let (table, seqlens) = (&c._tables.0, &c._tables.1);
    let layout = PagedLayout {
        num_pages: d.num_pages,
        page_size: d.page_size,
        heads_kv: d.heads_kv,
        head_dim: d.head_dim,
    };
    let pt = PageTable {
        block_table: table,
        max_pages_per_seq: d.max_pages_per_seq,
        seqlens_k: seqlens,
    };
    let cache = PagedCache::new(layout, pt).unwrap();
    let opts = AttentionOptions::causal();
    // Varlen rows: 2, 0, 1 (each at most its sequence's keys).
    let cu = [0i32, 2, 2, 3];
    for varlen in [false, true] {
        let cu_ptr = if varlen { cu.as_ptr() } else { ptr::null() };
        let pf = if varlen {
            PagedPrefill::new_varlen(&cache, d.heads_q, &cu, &opts).unwrap()
        } else {
            PagedPrefill::new(&cache, d.heads_q, d.q_len, &opts).unwrap()
        };
        let (mut cache_len, mut out_len, mut lse_len) = (0, 0, 0);
        // SAFETY: valid descriptor and offsets, writable outputs.
        let st = unsafe {
            longattn_paged_prefill_sizes(&d, cu_ptr, &mut cache_len, &mut out_len, &mut lse_len)
        };
        assert_eq!(st, LONGATTN_OK, "{}", last_error());
        assert_eq!((out_len, lse_len), (pf.out_len(), pf.lse_len()));
        let rows = if varlen { 3 } else { d.batch * d.q_len };
        let qs = if varlen {
            Strides::contiguous(rows, d.heads_q, d.head_dim)
        } else {
            Strides::contiguous(d.q_len, d.heads_q, d.head_dim)
        };
        let q = &c.q[..rows * d.heads_q * d.head_dim];
        let mut out = vec![f32::NAN; out_len];
        let mut lse = vec![f32::NAN; lse_len];
        // SAFETY: buffers sized by longattn_paged_prefill_sizes; distinct allocations.
        let st = unsafe {
            longattn_paged_prefill_cpu(
                &d,
                cu_ptr,
                0,
                tensor(q, qs),
                c.k_cache.as_ptr().cast(),
                c.v_cache.as_ptr().cast(),
                cache_len,
                tensor_mut(&mut out, qs),
                lse.as_mut_ptr(),
                lse.len(),
            )
        };
        assert_eq!(st, LONGATTN_OK, "varlen {varlen}: {}", last_error());
        let mut want = vec![f32::NAN; out_len];
        let mut want_lse = vec![f32::NAN; lse_len];
        pf.forward_cpu(
            Strided::new(q, qs),
            KvPages {
                k: &c.k_cache[..],
                v: &c.v_cache[..],
            },
            Strided::new(&mut want[..], qs),
            Some(&mut want_lse[..]),
        )
        .unwrap();
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same(&out, &want) && same(&lse, &want_lse),
            "varlen {varlen}"
        );
    }
    // Refused: offsets that do not start at 0, a NULL cache pointer (CPU and CUDA).
    let bad_cu = [1i32, 2, 2, 3];
    let (mut a, mut b, mut e) = (0, 0, 0);
    // SAFETY: valid descriptor and 4 offsets.
    let st = unsafe { longattn_paged_prefill_sizes(&d, bad_cu.as_ptr(), &mut a, &mut b, &mut e) };
    assert_ne!(st, LONGATTN_OK);
    let qs = Strides::contiguous(d.q_len, d.heads_q, d.head_dim);
    let mut out = vec![0.0f32; c.q.len()];
    let n = c.k_cache.len();
    // SAFETY: a NULL cache pointer is refused before any read.
    let st = unsafe {
        longattn_paged_prefill_cpu(
            &d,
            ptr::null(),
            0,
            tensor(&c.q, qs),
            ptr::null(),
            c.v_cache.as_ptr().cast(),
            n,
            tensor_mut(&mut out, qs),
            ptr::null_mut(),
            0,
        )
    };
    assert_eq!(st, 9, "{}", last_error());
    // SAFETY: as above, before the GPU is opened.
    let st = unsafe {
        longattn_paged_prefill_cuda(
            &d,
            ptr::null(),
            2,
            tensor(&c.q, qs),
            ptr::null(),
            c.v_cache.as_ptr().cast(),
            n,
            tensor_mut(&mut out, qs),
            ptr::null_mut(),
            0,
            0,
            ptr::null_mut(),
        )
    };
    assert_eq!(st, 9, "{}", last_error());
}

/// FP8 dense attention through the C API: the CPU entry equals the Rust API bit for bit and
/// the f64 reference of the same quantisation within its tolerance; NULL descales, an output
/// overlapping an input, f32 output and a zero descale are refused with their codes; the CUDA
/// entry refuses NULLs before opening a GPU and, without one, says so.
#[test]
fn c_api_dense_fp8() {
    use longattn::reference::{Fp8PRule, dense_fp8_attention_f64};
    let (b, sq, sk, hq, hkv, d) = (2usize, 37usize, 150usize, 4usize, 2usize, 64usize);
    let cd = CDenseDesc {
        causal: 1,
        ..desc(b, sq, sk, hq, hkv, d)
    };
    let (qs, ks) = (
        Strides::contiguous(sq, hq, d),
        Strides::contiguous(sk, hkv, d),
    );
    let mut r = rng(41);
    let codes = |r: &mut rand::rngs::SmallRng, n: usize, amp: f32| -> Vec<F8E4M3> {
        let x: Vec<f32> = random_vec(r, n);
        x.iter().map(|&x| F8E4M3::from_f32(x * amp)).collect()
    };
    let q = codes(&mut r, b * sq * hq * d, 8.0);
    let k = codes(&mut r, b * sk * hkv * d, 8.0);
    let v = codes(&mut r, b * sk * hkv * d, 1.0);
    let ds = [
        vec![0.3f32; b * hkv],
        vec![0.2f32; b * hkv],
        vec![1.5f32; b * hkv],
    ];
    let cdesc = |ds: &[Vec<f32>; 3]| CFp8Descales {
        q: ds[0].as_ptr(),
        k: ds[1].as_ptr(),
        v: ds[2].as_ptr(),
    };
    let run = |dtype: i32, descales: CFp8Descales, out: CTensorMut, lse: &mut [f32]| {
        // SAFETY: every buffer holds its stated length; out and lse are separate
        // allocations unless a test makes them overlap on purpose (refused before use).
        unsafe {
            longattn_dense_fp8_forward_cpu(
                &cd,
                dtype,
                tensor(&q, qs),
                tensor(&k, ks),
                tensor(&v, ks),
                descales,
                out,
                lse.as_mut_ptr(),
                lse.len(),
            )
        }
    };
    let attn = FlashAttention::new(
        &AttentionShape {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Fixed {
                seqlen_q: sq,
                seqlen_k: sk,
            },
        },
        &AttentionOptions::causal(),
    )
    .unwrap();
    let mut out = vec![bf16::NAN; attn.out_len()];
    let mut lse = vec![f32::NAN; attn.lse_len()];
    assert_eq!(
        run(2, cdesc(&ds), tensor_mut(&mut out, qs), &mut lse),
        LONGATTN_OK,
        "{}",
        last_error()
    );
    let host = Fp8Descales {
        q: &ds[0][..],
        k: &ds[1][..],
        v: &ds[2][..],
    };
    let mut want_out = vec![bf16::NAN; attn.out_len()];
    let mut want_lse = vec![f32::NAN; attn.lse_len()];
    attn.forward_cpu_fp8(
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
        host,
        Strided::new(&mut want_out[..], qs),
        Some(&mut want_lse[..]),
    )
    .unwrap();
    let bits = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out), bits(&want_out), "C and Rust outputs differ");
    assert_eq!(
        lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        want_lse.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let (reference, _) = dense_fp8_attention_f64(
        &attn,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
        host,
        Fp8PRule::TileRunningMax,
    )
    .unwrap();
    let got: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
    let err = rel_l2(&got, &reference);
    assert!(err < 3e-3, "rel L2 {err:e}");

    // NULL descales, f32 output, a zero descale, an output over q.
    let null_k = CFp8Descales {
        k: ptr::null(),
        ..cdesc(&ds)
    };
    assert_eq!(run(2, null_k, tensor_mut(&mut out, qs), &mut lse), 9);
    assert!(last_error().contains("k_descale"), "{}", last_error());
    let mut out32 = vec![f32::NAN; attn.out_len()];
    assert_eq!(run(0, cdesc(&ds), tensor_mut(&mut out32, qs), &mut lse), 5);
    let zero = [ds[0].clone(), vec![0.0; b * hkv], ds[2].clone()];
    assert_eq!(run(2, cdesc(&zero), tensor_mut(&mut out, qs), &mut lse), 3);
    let over_q = CTensorMut {
        data: q.as_ptr() as *mut _,
        len: out.len(),
        strides: cstrides(qs),
    };
    assert_eq!(run(2, cdesc(&ds), over_q, &mut lse), 1);
    assert!(last_error().contains("overlaps"), "{}", last_error());

    // The CUDA entry: NULLs refused before a GPU is opened; without one, a GPU error.
    let call_cuda = |descales: CFp8Descales, out: CTensorMut| {
        // SAFETY: refused before any pointer is used (or, without a GPU, never used).
        unsafe {
            longattn_dense_fp8_forward_cuda(
                &cd,
                2,
                tensor(&q, qs),
                tensor(&k, ks),
                tensor(&v, ks),
                descales,
                out,
                ptr::null_mut(),
                0,
                0,
                ptr::null_mut(),
            )
        }
    };
    let null_v = CFp8Descales {
        v: ptr::null(),
        ..cdesc(&ds)
    };
    assert_eq!(call_cuda(null_v, tensor_mut(&mut out, qs)), 9);
    assert!(last_error().contains("v_descale"), "{}", last_error());
    if longattn::device::open_gpu(0).is_err() {
        let st = call_cuda(cdesc(&ds), tensor_mut(&mut out, qs));
        assert!(st == 6 || st == 7, "status {st}: {}", last_error());
    }
}

// ---- Paged append, per-kv-head decode policies, LSE merge ----

/// The `longattn_dtype` code of `T`.
fn dtype_code<T: Element>() -> i32 {
    match T::DTYPE {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::F8E4M3 => unreachable!("not a q/out dtype"),
    }
}

/// `f32` bits of each value (exact for every element type; no NaN in these tests).
fn bits<T: Element>(x: &[T]) -> Vec<u32> {
    x.iter().map(|v| v.to_f32().to_bits()).collect()
}

/// The Rust cache of `c`'s geometry and block table with `seqlens` tokens.
fn rust_cache(c: &PagedCase, seqlens: &[i32], scales: Option<(&[f32], &[f32])>) -> PagedCache {
    let d = c.desc;
    let layout = PagedLayout {
        num_pages: d.num_pages,
        page_size: d.page_size,
        heads_kv: d.heads_kv,
        head_dim: d.head_dim,
    };
    let pt = PageTable {
        block_table: &c._tables.0,
        max_pages_per_seq: d.max_pages_per_seq,
        seqlens_k: seqlens,
    };
    let cache = PagedCache::new(layout, pt).unwrap();
    match scales {
        Some((k, v)) => cache
            .with_kv_scales(KvScales::new(k.to_vec(), v.to_vec()).unwrap())
            .unwrap(),
        None => cache,
    }
}

/// `cu_seqlens_new` and the packed `[total_new, heads_kv, head_dim]` rows of the tokens
/// `spans[b]` of each sequence's `tok[b]` (rows of `row` elements).
fn packed<T: Copy>(tok: &[Vec<T>], row: usize, spans: &[(usize, usize)]) -> (Vec<i32>, Vec<T>) {
    let mut cu = vec![0i32];
    let mut rows = Vec::new();
    for (t, &(lo, hi)) in tok.iter().zip(spans) {
        rows.extend_from_slice(&t[lo * row..hi * row]);
        cu.push(cu[cu.len() - 1] + (hi - lo) as i32);
    }
    (cu, rows)
}

/// The C view of a cache's buffers (`meta`: kmin, kmax).
fn kv_mut<C>(k: &mut [C], v: &mut [C], meta: Option<(&mut [C], &mut [C])>) -> CPagedKvMut {
    let (kmin, kmax, meta_len) = match meta {
        Some((lo, hi)) => (lo.as_mut_ptr().cast(), hi.as_mut_ptr().cast(), lo.len()),
        None => (ptr::null_mut(), ptr::null_mut(), 0),
    };
    CPagedKvMut {
        k_cache: k.as_mut_ptr().cast(),
        v_cache: v.as_mut_ptr().cast(),
        cache_len: k.len(),
        kmin,
        kmax,
        meta_len,
    }
}

/// Tokens per sequence in the cache after the first of the two appends of [`append_both`].
const BEFORE: [i32; 3] = [5, 0, 8];

/// A cache's `[k_cache, v_cache, kmin, kmax]`.
type CacheState<C> = [Vec<C>; 4];

/// Fills an empty cache of `c`'s geometry with each sequence's tokens (`[seqlens_k[b],
/// heads_kv, head_dim]`) in two appends (the first [`BEFORE`] tokens, then the rest, so pages
/// are both restarted and widened), through the C API and through the Rust API; with
/// `scales`, into an FP8 cache (`C` = e4m3). Returns the C state and the Rust state.
fn append_both<T: Element, C: Element>(
    c: &PagedCase,
    (k_tok, v_tok): (&[Vec<T>], &[Vec<T>]),
    scales: Option<(&[f32], &[f32])>,
) -> (CacheState<C>, CacheState<C>) {
    let d = c.desc;
    let row = d.heads_kv * d.head_dim;
    let (n, m) = (c.k_cache.len(), d.num_pages * row);
    let zero = C::from_f32(0.0);
    let fresh = || [vec![zero; n], vec![zero; n], vec![zero; m], vec![zero; m]];
    let (mut cs, mut rs) = (fresh(), fresh());
    let full = &c._tables.1;
    for (step, lens) in [&BEFORE[..], &full[..]].into_iter().enumerate() {
        let spans: Vec<(usize, usize)> = (0..d.batch)
            .map(|b| {
                (
                    if step == 0 { 0 } else { BEFORE[b] as usize },
                    lens[b] as usize,
                )
            })
            .collect();
        let ((cu, kn), (_, vn)) = (packed(k_tok, row, &spans), packed(v_tok, row, &spans));
        let s = Strides::contiguous(cu[d.batch] as usize, d.heads_kv, d.head_dim);
        let sd = CPagedDesc {
            seqlens_k: lens.as_ptr(),
            ..d
        };
        let [k, v, lo, hi] = &mut cs;
        let kv = kv_mut(k, v, Some((lo, hi)));
        let (kt, vt, code) = (tensor(&kn, s), tensor(&vn, s), dtype_code::<T>());
        // SAFETY: buffers of the stated lengths; distinct allocations.
        let st = unsafe {
            match scales {
                Some((ks, vs)) => longattn_paged_append_fp8_cpu(
                    &sd,
                    cu.as_ptr(),
                    code,
                    kt,
                    vt,
                    kv,
                    ks.as_ptr(),
                    vs.as_ptr(),
                ),
                None => longattn_paged_append_cpu(&sd, cu.as_ptr(), code, kt, vt, kv),
            }
        };
        assert_eq!(st, LONGATTN_OK, "step {step}: {}", last_error());
        let [k, v, lo, hi] = &mut rs;
        rust_cache(c, lens, scales)
            .append_cpu(
                &cu,
                Strided::new(&kn[..], s),
                Strided::new(&vn[..], s),
                KvPages { k, v },
                Some(PageMeta { kmin: lo, kmax: hi }),
            )
            .unwrap();
    }
    (cs, rs)
}

/// Append through the C API (f32, bf16, FP8 with scales): the cache and its Quest metadata
/// equal the Rust API's bit for bit, and a decode over the appended cache equals the f64
/// dense reference over the tokens.
#[test]
fn c_api_paged_append_then_decode() {
    let c = paged_case(41);
    let d = c.desc;
    let (mut cache_len, mut meta_len) = (0, 0);
    // SAFETY: valid descriptor (tables alive in `c`), writable outputs.
    let st = unsafe { longattn_paged_cache_sizes(&d, &mut cache_len, &mut meta_len) };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    assert_eq!(
        (cache_len, meta_len),
        (c.k_cache.len(), d.num_pages * d.heads_kv * d.head_dim)
    );
    let mut r = rng(42);
    let tok = |r: &mut _| -> Vec<Vec<f32>> {
        (0..d.batch)
            .map(|b| random_vec(r, c._tables.1[b] as usize * d.heads_kv * d.head_dim))
            .collect()
    };
    let (k_tok, v_tok) = (tok(&mut r), tok(&mut r));
    let (cs, rs) = append_both::<f32, f32>(&c, (&k_tok, &v_tok), None);
    for (i, (a, b)) in cs.iter().zip(&rs).enumerate() {
        assert_eq!(bits(a), bits(b), "buffer {i} (k, v, kmin, kmax)");
    }
    let qs = Strides::contiguous(d.q_len, d.heads_q, d.head_dim);
    let mut out = vec![f32::NAN; c.q.len()];
    // SAFETY: buffers of the stated lengths; distinct allocations.
    let st = unsafe {
        longattn_paged_decode_cpu(
            &d,
            0,
            tensor(&c.q, qs),
            cs[0].as_ptr().cast(),
            cs[1].as_ptr().cast(),
            cache_len,
            tensor_mut(&mut out, qs),
            ptr::null_mut(),
            0,
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    check_dense_twin(&c, &out, (&k_tok, &v_tok));
    // bf16 tokens into a bf16 cache; f32 tokens into an FP8 cache.
    let to_bf16 = |t: &Vec<Vec<f32>>| -> Vec<Vec<bf16>> {
        t.iter()
            .map(|x| x.iter().map(|&v| bf16::from_f32(v)).collect())
            .collect()
    };
    let (kb, vb) = (to_bf16(&k_tok), to_bf16(&v_tok));
    let (cs, rs) = append_both::<bf16, bf16>(&c, (&kb, &vb), None);
    for (i, (a, b)) in cs.iter().zip(&rs).enumerate() {
        assert_eq!(bits(a), bits(b), "bf16 buffer {i}");
    }
    let scales = (&[0.004f32, 0.002][..], &[0.003f32, 0.005][..]);
    let (cs, rs) = append_both::<f32, F8E4M3>(&c, (&k_tok, &v_tok), Some(scales));
    for (i, (a, b)) in cs.iter().zip(&rs).enumerate() {
        assert_eq!(bits(a), bits(b), "FP8 buffer {i}");
    }
}

/// Every bad argument of the append entry points comes back as its status with a message.
#[test]
fn c_api_paged_append_refusals() {
    let c = paged_case(43);
    let d = c.desc;
    let row = d.heads_kv * d.head_dim;
    let n = c.k_cache.len();
    let m = d.num_pages * row;
    let total = c._tables.1.iter().sum::<i32>() as usize;
    let cu = [0i32, 7, 9, 18];
    // One spare row, for the offsets that append more tokens than seqlens_k counts.
    let kn = vec![0.5f32; (total + 1) * row];
    let s = Strides::contiguous(total, d.heads_kv, d.head_dim);
    let (mut k, mut v, mut lo, mut hi) =
        (vec![0f32; n], vec![0f32; n], vec![0f32; m], vec![0f32; m]);
    let kv = kv_mut(&mut k, &mut v, Some((&mut lo, &mut hi)));
    let kt = tensor(&kn, s);
    let run = |d: *const CPagedDesc, cu: *const i32, dtype: i32, kt: CTensor, kv: CPagedKvMut| {
        // SAFETY: buffers of the stated lengths (or refused before use).
        unsafe { longattn_paged_append_cpu(d, cu, dtype, kt, kt, kv) }
    };
    assert_eq!(
        run(&d, cu.as_ptr(), 0, kt, kv),
        LONGATTN_OK,
        "{}",
        last_error()
    );
    let mut bad_table = c._tables.0.clone();
    bad_table[0] = 10; // page id == num_pages
    let mut shared = c._tables.0.clone();
    shared[d.max_pages_per_seq] = shared[0]; // sequence 1 writes sequence 0's first page
    let desc_with = |t: &Vec<i32>| CPagedDesc {
        block_table: t.as_ptr(),
        ..d
    };
    let (bad_d, shared_d) = (desc_with(&bad_table), desc_with(&shared));
    let too_many = [0i32, 7, 10, 19];
    let decreasing = [0i32, 7, 5, 18];
    let short = CTensor {
        len: total * row - 1,
        ..kt
    };
    let cases: [(
        &str,
        *const CPagedDesc,
        *const i32,
        i32,
        CTensor,
        CPagedKvMut,
        i32,
    ); 13] = [
        ("desc NULL", ptr::null(), cu.as_ptr(), 0, kt, kv, 9),
        ("cu NULL", &d, ptr::null(), 0, kt, kv, 9),
        (
            "k_new NULL",
            &d,
            cu.as_ptr(),
            0,
            CTensor {
                data: ptr::null(),
                ..kt
            },
            kv,
            9,
        ),
        (
            "cache NULL",
            &d,
            cu.as_ptr(),
            0,
            kt,
            CPagedKvMut {
                v_cache: ptr::null_mut(),
                ..kv
            },
            9,
        ),
        (
            "lone kmin",
            &d,
            cu.as_ptr(),
            0,
            kt,
            CPagedKvMut {
                kmax: ptr::null_mut(),
                ..kv
            },
            9,
        ),
        ("dtype", &d, cu.as_ptr(), 7, kt, kv, 5),
        ("short k_new", &d, cu.as_ptr(), 0, short, kv, 1),
        (
            "cache_len",
            &d,
            cu.as_ptr(),
            0,
            kt,
            CPagedKvMut {
                cache_len: n - 1,
                ..kv
            },
            1,
        ),
        (
            "meta_len",
            &d,
            cu.as_ptr(),
            0,
            kt,
            CPagedKvMut {
                meta_len: m + 1,
                ..kv
            },
            1,
        ),
        ("more than seqlens_k", &d, too_many.as_ptr(), 0, kt, kv, 4),
        ("decreasing offsets", &d, decreasing.as_ptr(), 0, kt, kv, 4),
        ("bad page id", &bad_d, cu.as_ptr(), 0, kt, kv, 4),
        ("shared page", &shared_d, cu.as_ptr(), 0, kt, kv, 4),
    ];
    for (name, dp, cup, dtype, kt, kv, want) in cases {
        assert_eq!(
            run(dp, cup, dtype, kt, kv),
            want,
            "{name}: {}",
            last_error()
        );
        assert!(!last_error().is_empty(), "{name}: no message");
    }
    // Overlaps: the caches with each other, with the new tokens, the metadata.
    let kp = kv.k_cache;
    for (name, kv2) in [
        ("v_cache = k_cache", CPagedKvMut { v_cache: kp, ..kv }),
        (
            "kmax = kmin",
            CPagedKvMut {
                kmax: kv.kmin,
                ..kv
            },
        ),
    ] {
        assert_eq!(
            run(&d, cu.as_ptr(), 0, kt, kv2),
            1,
            "{name}: {}",
            last_error()
        );
        assert!(
            last_error().contains("overlaps"),
            "{name}: {}",
            last_error()
        );
    }
    let aliased = CTensor {
        data: kp.cast_const(),
        len: n,
        strides: kt.strides,
    };
    assert_eq!(run(&d, cu.as_ptr(), 0, aliased, kv), 1, "{}", last_error());
    // Sizes: NULL, zero and overflowing geometry.
    let sizes = |d: *const CPagedDesc| {
        // SAFETY: NULL or a valid descriptor; NULL outputs are skipped.
        unsafe { longattn_paged_cache_sizes(d, ptr::null_mut(), ptr::null_mut()) }
    };
    assert_eq!(sizes(ptr::null()), 9);
    assert_eq!(
        sizes(&CPagedDesc { page_size: 0, ..d }),
        1,
        "{}",
        last_error()
    );
    let huge = CPagedDesc {
        max_pages_per_seq: usize::MAX,
        ..d
    };
    assert_eq!(sizes(&huge), 1, "{}", last_error());
    // FP8: bad and lone scales.
    let k8 = vec![0u8; n];
    let (mut k8a, mut v8a) = (k8.clone(), k8);
    let kv8 = kv_mut(&mut k8a, &mut v8a, None);
    let fp8 = |ks: *const f32, vs: *const f32| {
        // SAFETY: buffers of the stated lengths; scales NULL or heads_kv floats.
        unsafe { longattn_paged_append_fp8_cpu(&d, cu.as_ptr(), 0, kt, kt, kv8, ks, vs) }
    };
    let (good, zero) = ([0.01f32, 0.02], [0.0f32, 0.02]);
    assert_eq!(
        fp8(good.as_ptr(), good.as_ptr()),
        LONGATTN_OK,
        "{}",
        last_error()
    );
    assert_eq!(
        fp8(ptr::null(), ptr::null()),
        LONGATTN_OK,
        "{}",
        last_error()
    );
    assert_eq!(fp8(zero.as_ptr(), good.as_ptr()), 3, "{}", last_error());
    assert_eq!(fp8(good.as_ptr(), ptr::null()), 9, "{}", last_error());
}

/// A decode case for the policies: 2 sequences of 37 and 22 tokens in pages of 4, 3 kv heads
/// (GQA 2), q_len 2; the cache and its metadata written by the Rust append.
struct PolicyCase {
    c: PagedCase,
    /// The appended tokens: `cu_seqlens_new`, packed K and V, their strides.
    new: (Vec<i32>, Vec<f32>, Vec<f32>, Strides),
    k: Vec<f32>,
    v: Vec<f32>,
    kmin: Vec<f32>,
    kmax: Vec<f32>,
}

fn policy_case(seed: u64) -> PolicyCase {
    let order: Vec<i32> = (0..16).map(|p| (p * 7 + 3) % 16).collect();
    let c = paged_case_with(seed, [4, 3, 6, 16, 2, 10, 16], vec![37, 22], &order);
    let d = c.desc;
    let spans: Vec<(usize, usize)> = c._tables.1.iter().map(|&n| (0, n as usize)).collect();
    let tokens =
        |cache: &[f32]| -> Vec<Vec<f32>> { (0..d.batch).map(|b| gather(&c, cache, b)).collect() };
    let row = d.heads_kv * d.head_dim;
    let ((cu, kn), (_, vn)) = (
        packed(&tokens(&c.k_cache), row, &spans),
        packed(&tokens(&c.v_cache), row, &spans),
    );
    let s = Strides::contiguous(cu[d.batch] as usize, d.heads_kv, d.head_dim);
    let (n, m) = (c.k_cache.len(), d.num_pages * row);
    let (mut k, mut v, mut kmin, mut kmax) =
        (vec![0f32; n], vec![0f32; n], vec![0f32; m], vec![0f32; m]);
    rust_cache(&c, &c._tables.1, None)
        .append_cpu(
            &cu,
            Strided::new(&kn[..], s),
            Strided::new(&vn[..], s),
            KvPages {
                k: &mut k[..],
                v: &mut v[..],
            },
            Some(PageMeta {
                kmin: &mut kmin[..],
                kmax: &mut kmax[..],
            }),
        )
        .unwrap();
    PolicyCase {
        c,
        new: (cu, kn, vn, s),
        k,
        v,
        kmin,
        kmax,
    }
}

/// Full, streaming and Quest heads in one call.
const HEADS: [i32; 3] = [
    LONGATTN_HEAD_FULL,
    LONGATTN_HEAD_STREAMING,
    LONGATTN_HEAD_QUEST,
];

fn c_policy<C>(kmin: &[C], kmax: &[C]) -> CDecodePolicy {
    CDecodePolicy {
        heads: HEADS.as_ptr(),
        streaming_sinks: 2,
        streaming_window: 7,
        quest_token_budget: 12,
        quest_sink_pages: 1,
        kmin: kmin.as_ptr().cast(),
        kmax: kmax.as_ptr().cast(),
        meta_len: kmin.len(),
    }
}

fn rust_policy() -> SparsePolicy {
    SparsePolicy {
        heads: vec![HeadPolicy::Full, HeadPolicy::Streaming, HeadPolicy::Quest],
        streaming: StreamingConfig {
            sinks: 2,
            window: 7,
        },
        quest: QuestConfig {
            token_budget: 12,
            sink_pages: 1,
        },
    }
}

/// The Rust decode of `c` with [`rust_policy`] over `[k_cache, v_cache, kmin, kmax]` (an FP8
/// cache with `scales`): output and LSE.
fn rust_policy_decode<C: Element>(
    c: &PagedCase,
    scales: Option<(&[f32], &[f32])>,
    [k, v, kmin, kmax]: [&[C]; 4],
) -> (Vec<f32>, Vec<f32>) {
    let d = c.desc;
    let qs = Strides::contiguous(d.q_len, d.heads_q, d.head_dim);
    let cache = rust_cache(c, &c._tables.1, scales);
    let opts = AttentionOptions::default();
    let dec = PagedDecode::new(&cache, d.heads_q, d.q_len, &opts)
        .unwrap()
        .with_policy(rust_policy())
        .unwrap();
    let mut out = vec![f32::NAN; dec.out_len()];
    let mut lse = vec![f32::NAN; dec.lse_len()];
    dec.forward_cpu(
        Strided::new(&c.q[..], qs),
        KvPages { k, v },
        Some(PageMeta { kmin, kmax }),
        Strided::new(&mut out[..], qs),
        Some(&mut lse[..]),
    )
    .unwrap();
    (out, lse)
}

/// Policy decode through the C API equals the Rust `PagedDecode` with the same policy (bit
/// for bit, output and LSE), for an f32 cache and an FP8 cache (metadata as each append
/// writes it); the streaming and Quest heads differ from a full decode, the full head not.
#[test]
fn c_api_paged_decode_policy() {
    let pc = policy_case(51);
    let c = &pc.c;
    let d = c.desc;
    let qs = Strides::contiguous(d.q_len, d.heads_q, d.head_dim);
    let (mut out_len, mut lse_len) = (0, 0);
    // SAFETY: valid descriptor, writable outputs.
    let st = unsafe { longattn_paged_sizes(&d, ptr::null_mut(), &mut out_len, &mut lse_len) };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let policy = c_policy(&pc.kmin, &pc.kmax);
    let mut out = vec![f32::NAN; out_len];
    let mut lse = vec![f32::NAN; lse_len];
    // SAFETY: buffers of the stated lengths; distinct allocations.
    let st = unsafe {
        longattn_paged_decode_policy_cpu(
            &d,
            &policy,
            0,
            tensor(&c.q, qs),
            pc.k.as_ptr().cast(),
            pc.v.as_ptr().cast(),
            pc.k.len(),
            tensor_mut(&mut out, qs),
            lse.as_mut_ptr(),
            lse.len(),
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let state = [&pc.k[..], &pc.v[..], &pc.kmin[..], &pc.kmax[..]];
    let (want, want_lse) = rust_policy_decode(c, None, state);
    assert_eq!(bits(&out), bits(&want));
    assert_eq!(bits(&lse), bits(&want_lse));
    // Against a full decode: the full kv head's query heads (0, 1) agree, the others not.
    let mut full = vec![f32::NAN; out_len];
    // SAFETY: as above.
    let st = unsafe {
        longattn_paged_decode_cpu(
            &d,
            0,
            tensor(&c.q, qs),
            pc.k.as_ptr().cast(),
            pc.v.as_ptr().cast(),
            pc.k.len(),
            tensor_mut(&mut full, qs),
            ptr::null_mut(),
            0,
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let group = d.heads_q / d.heads_kv;
    for kvh in 0..d.heads_kv {
        let same = out
            .chunks(d.head_dim)
            .zip(full.chunks(d.head_dim))
            .enumerate()
            .filter(|(i, _)| (i % d.heads_q) / group == kvh)
            .all(|(_, (a, b))| bits(a) == bits(b));
        assert_eq!(same, kvh == 0, "kv head {kvh}");
    }
    // FP8: the cache and metadata written by the C FP8 append, decoded with the policy.
    let (ks, vs) = ([0.004f32, 0.002, 0.003], [0.003f32, 0.005, 0.002]);
    let (n, m) = (pc.k.len(), pc.kmin.len());
    let z = F8E4M3::from_f32(0.0);
    let (mut k8, mut v8, mut lo8, mut hi8) = (vec![z; n], vec![z; n], vec![z; m], vec![z; m]);
    let (cu, kn, vn, s) = &pc.new;
    let kv8 = kv_mut(&mut k8, &mut v8, Some((&mut lo8, &mut hi8)));
    // SAFETY: buffers of the stated lengths; distinct allocations.
    let st = unsafe {
        longattn_paged_append_fp8_cpu(
            &d,
            cu.as_ptr(),
            0,
            tensor(kn, *s),
            tensor(vn, *s),
            kv8,
            ks.as_ptr(),
            vs.as_ptr(),
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let policy8 = c_policy(&lo8, &hi8);
    let cache8 = CFp8Cache {
        k_cache: k8.as_ptr().cast(),
        v_cache: v8.as_ptr().cast(),
        cache_len: k8.len(),
        k_scales: ks.as_ptr(),
        v_scales: vs.as_ptr(),
    };
    // SAFETY: buffers of the stated lengths; distinct allocations.
    let st = unsafe {
        longattn_paged_decode_fp8_policy_cpu(
            &d,
            &policy8,
            0,
            tensor(&c.q, qs),
            cache8,
            tensor_mut(&mut out, qs),
            lse.as_mut_ptr(),
            lse.len(),
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let (want, want_lse) = rust_policy_decode(c, Some((&ks, &vs)), [&k8, &v8, &lo8, &hi8]);
    assert_eq!(bits(&out), bits(&want));
    assert_eq!(bits(&lse), bits(&want_lse));
}

/// Bad policy arguments come back as their status with a message, before any buffer is read.
#[test]
fn c_api_paged_decode_policy_refusals() {
    let pc = policy_case(53);
    let d = pc.c.desc;
    let qs = Strides::contiguous(d.q_len, d.heads_q, d.head_dim);
    let mut out = vec![0f32; pc.c.q.len()];
    let good = c_policy(&pc.kmin, &pc.kmax);
    let (q, o) = (tensor(&pc.c.q, qs), tensor_mut(&mut out, qs));
    let run = |d: &CPagedDesc, p: *const CDecodePolicy| {
        // SAFETY: buffers of the stated lengths (or refused before use).
        unsafe {
            longattn_paged_decode_policy_cpu(
                d,
                p,
                0,
                q,
                pc.k.as_ptr().cast(),
                pc.v.as_ptr().cast(),
                pc.k.len(),
                o,
                ptr::null_mut(),
                0,
            )
        }
    };
    assert_eq!(run(&d, &good), LONGATTN_OK, "{}", last_error());
    let bad_codes = [0i32, 3, 0]; // 3: page lists are Rust-only
    let full_only = [LONGATTN_HEAD_FULL; 3];
    let cases = [
        ("policy NULL", d, None, 9),
        (
            "heads NULL",
            d,
            Some(CDecodePolicy {
                heads: ptr::null(),
                ..good
            }),
            9,
        ),
        (
            "bad code",
            d,
            Some(CDecodePolicy {
                heads: bad_codes.as_ptr(),
                ..good
            }),
            3,
        ),
        (
            "lone kmin",
            d,
            Some(CDecodePolicy {
                kmax: ptr::null(),
                ..good
            }),
            9,
        ),
        (
            "Quest without metadata",
            d,
            Some(CDecodePolicy {
                kmin: ptr::null(),
                kmax: ptr::null(),
                ..good
            }),
            3,
        ),
        (
            "meta_len",
            d,
            Some(CDecodePolicy {
                meta_len: good.meta_len - 1,
                ..good
            }),
            1,
        ),
        (
            "streaming window 0",
            d,
            Some(CDecodePolicy {
                streaming_window: 0,
                ..good
            }),
            3,
        ),
        ("descriptor", CPagedDesc { heads_q: 5, ..d }, Some(good), 1),
    ];
    for (name, d, p, want) in cases {
        let p = p.as_ref().map_or(ptr::null(), |p| p as *const _);
        assert_eq!(run(&d, p), want, "{name}: {}", last_error());
        assert!(!last_error().is_empty(), "{name}: no message");
    }
    // Without a Quest head the metadata may be left out.
    let no_meta = CDecodePolicy {
        heads: full_only.as_ptr(),
        kmin: ptr::null(),
        kmax: ptr::null(),
        meta_len: 0,
        ..good
    };
    assert_eq!(run(&d, &no_meta), LONGATTN_OK, "{}", last_error());
    // The output may not overlap the metadata.
    let alias = CTensorMut {
        data: pc.kmin.as_ptr().cast_mut().cast(),
        len: pc.kmin.len().min(out.len()),
        strides: o.strides,
    };
    // SAFETY: refused before any buffer is written.
    let st = unsafe {
        longattn_paged_decode_policy_cpu(
            &d,
            &good,
            0,
            q,
            pc.k.as_ptr().cast(),
            pc.v.as_ptr().cast(),
            pc.k.len(),
            alias,
            ptr::null_mut(),
            0,
        )
    };
    assert!(
        st == 1 && last_error().contains("overlaps"),
        "{st}: {}",
        last_error()
    );
}

/// A dense problem split at key `split`: its two partial results through the C API (f32
/// outputs and LSEs), and the f64 reference over all the keys.
struct MergeCase {
    desc: CMergeDesc,
    a: (Vec<f32>, Vec<f32>),
    b: (Vec<f32>, Vec<f32>),
    want: (Vec<f64>, Vec<f64>),
}

fn merge_case(seed: u64) -> MergeCase {
    let (batch, sq, sk, hq, hkv, hd, split) = (2, 3, 10, 4, 2, 16, 4);
    let c = case(seed, desc(batch, sq, sk, hq, hkv, hd));
    let part = |lo: usize, hi: usize| -> (Vec<f32>, Vec<f32>) {
        // Keys lo..hi of each sequence: a view into the full K/V with its strides.
        let off = lo * hkv * hd;
        let view = |x: &[f32]| CTensor {
            data: x[off..].as_ptr().cast(),
            len: x.len() - off,
            strides: cstrides(c.ks),
        };
        let pd = desc(batch, sq, hi - lo, hq, hkv, hd);
        let mut o = vec![f32::NAN; c.q.len()];
        let mut lse = vec![f32::NAN; batch * hq * sq];
        // SAFETY: views within the buffers; distinct output allocations.
        let st = unsafe {
            longattn_dense_forward_cpu(
                &pd,
                0,
                tensor(&c.q, c.qs),
                view(&c.k),
                view(&c.v),
                tensor_mut(&mut o, c.qs),
                lse.as_mut_ptr(),
                lse.len(),
            )
        };
        assert_eq!(st, LONGATTN_OK, "{}", last_error());
        (o, lse)
    };
    let shape = AttentionShape {
        batch,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: hd,
        seqlens: SeqLens::Fixed {
            seqlen_q: sq,
            seqlen_k: sk,
        },
    };
    let attn = FlashAttention::new(&shape, &AttentionOptions::default()).unwrap();
    let want = reference::dense_attention_f64(
        &attn,
        Strided::new(&c.q[..], c.qs),
        Strided::new(&c.k[..], c.ks),
        Strided::new(&c.v[..], c.ks),
    )
    .unwrap();
    MergeCase {
        desc: CMergeDesc {
            batch,
            seqlen: sq,
            heads: hq,
            head_dim: hd,
        },
        a: part(0, split),
        b: part(split, sk),
        want,
    }
}

fn partial<T>((o, lse): &(Vec<T>, Vec<f32>)) -> CPartial {
    CPartial {
        o: o.as_ptr().cast(),
        o_len: o.len(),
        lse: lse.as_ptr(),
        lse_len: lse.len(),
    }
}

fn partial_mut<T>((o, lse): &mut (Vec<T>, Vec<f32>)) -> CPartialMut {
    CPartialMut {
        o: o.as_mut_ptr().cast(),
        o_len: o.len(),
        lse: lse.as_mut_ptr(),
        lse_len: lse.len(),
    }
}

/// Merging the partial results of a key split through the C API equals attention over the
/// union of the keys (f64 reference), in place or not; f16 and bf16 merges equal the Rust
/// API's bit for bit; two empty rows give 0 and -inf.
#[test]
fn c_api_merge_equals_attention_over_the_union() {
    let mc = merge_case(61);
    let (mut o_len, mut lse_len) = (0, 0);
    // SAFETY: valid descriptor, writable outputs.
    let st = unsafe { longattn_merge_sizes(&mc.desc, &mut o_len, &mut lse_len) };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    assert_eq!((o_len, lse_len), (mc.a.0.len(), mc.a.1.len()));
    let mut out = (vec![f32::NAN; o_len], vec![f32::NAN; lse_len]);
    // SAFETY: buffers of the stated lengths; distinct allocations.
    let st = unsafe {
        longattn_merge_cpu(
            &mc.desc,
            0,
            partial(&mc.a),
            partial(&mc.b),
            partial_mut(&mut out),
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let got: Vec<f64> = out.0.iter().map(|&x| x as f64).collect();
    let err = rel_l2(&got, &mc.want.0);
    assert!(err < 1e-5, "rel L2 {err}");
    common::check_lse(&out.1, &mc.want.1, 1e-4, "merged lse");
    let mut acc = mc.a.clone();
    // SAFETY: as above.
    let st = unsafe { longattn_merge_into_cpu(&mc.desc, 0, partial_mut(&mut acc), partial(&mc.b)) };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    assert_eq!((bits(&acc.0), bits(&acc.1)), (bits(&out.0), bits(&out.1)));
    // Half precision: the Rust merge on the same values.
    let shape = MergeShape {
        batch: mc.desc.batch,
        seqlen: mc.desc.seqlen,
        heads: mc.desc.heads,
        head_dim: mc.desc.head_dim,
    };
    fn half_check<T: Element>(mc: &MergeCase, shape: &MergeShape) {
        let conv = |p: &(Vec<f32>, Vec<f32>)| -> (Vec<T>, Vec<f32>) {
            (p.0.iter().map(|&x| T::from_f32(x)).collect(), p.1.clone())
        };
        let (mut a, b) = (conv(&mc.a), conv(&mc.b));
        // Row 0 of head 0 empty in both partials.
        a.1[0] = f32::NEG_INFINITY;
        let mut b = b;
        b.1[0] = f32::NEG_INFINITY;
        let n = a.0.len();
        let mut out = (vec![T::from_f32(f32::NAN); n], vec![f32::NAN; a.1.len()]);
        // SAFETY: buffers of the stated lengths; distinct allocations.
        let st = unsafe {
            longattn_merge_cpu(
                &mc_desc(shape),
                dtype_code::<T>(),
                partial(&a),
                partial(&b),
                partial_mut(&mut out),
            )
        };
        assert_eq!(st, LONGATTN_OK, "{}", last_error());
        let mut want = (vec![T::from_f32(f32::NAN); n], vec![f32::NAN; a.1.len()]);
        shape
            .merge_cpu(
                Partial {
                    o: &a.0[..],
                    lse: &a.1[..],
                },
                Partial {
                    o: &b.0[..],
                    lse: &b.1[..],
                },
                Partial {
                    o: &mut want.0[..],
                    lse: &mut want.1[..],
                },
            )
            .unwrap();
        assert_eq!((bits(&out.0), bits(&out.1)), (bits(&want.0), bits(&want.1)));
        assert!(
            out.1[0] == f32::NEG_INFINITY
                && out.0[..shape.head_dim].iter().all(|x| x.to_f32() == 0.0)
        );
        // In place.
        // SAFETY: as above.
        let st = unsafe {
            longattn_merge_into_cpu(
                &mc_desc(shape),
                dtype_code::<T>(),
                partial_mut(&mut a),
                partial(&b),
            )
        };
        assert_eq!(st, LONGATTN_OK, "{}", last_error());
        assert_eq!((bits(&a.0), bits(&a.1)), (bits(&want.0), bits(&want.1)));
    }
    half_check::<f16>(&mc, &shape);
    half_check::<bf16>(&mc, &shape);
}

fn mc_desc(s: &MergeShape) -> CMergeDesc {
    CMergeDesc {
        batch: s.batch,
        seqlen: s.seqlen,
        heads: s.heads,
        head_dim: s.head_dim,
    }
}

/// Every bad merge argument comes back as its status with a message.
#[test]
fn c_api_merge_refusals() {
    let mc = merge_case(63);
    let d = mc.desc;
    let mut out = (vec![0f32; mc.a.0.len()], vec![0f32; mc.a.1.len()]);
    let (a, b, o) = (partial(&mc.a), partial(&mc.b), partial_mut(&mut out));
    let run = |d: *const CMergeDesc, dtype: i32, a: CPartial, o: CPartialMut| {
        // SAFETY: buffers of the stated lengths (or refused before use).
        unsafe { longattn_merge_cpu(d, dtype, a, b, o) }
    };
    assert_eq!(run(&d, 0, a, o), LONGATTN_OK, "{}", last_error());
    let a_o = CPartialMut {
        o: a.o.cast_mut(),
        ..o
    };
    let lse_on_o = CPartialMut {
        lse: o.o.cast(),
        ..o
    };
    let cases = [
        ("desc NULL", None, 0, a, o, 9),
        (
            "a.o NULL",
            Some(d),
            0,
            CPartial {
                o: ptr::null(),
                ..a
            },
            o,
            9,
        ),
        (
            "out.lse NULL",
            Some(d),
            0,
            a,
            CPartialMut {
                lse: ptr::null_mut(),
                ..o
            },
            9,
        ),
        ("dtype", Some(d), 9, a, o, 5),
        (
            "a.o_len",
            Some(d),
            0,
            CPartial {
                o_len: a.o_len - 1,
                ..a
            },
            o,
            1,
        ),
        (
            "out.lse_len",
            Some(d),
            0,
            a,
            CPartialMut { lse_len: 0, ..o },
            1,
        ),
        (
            "head_dim 0",
            Some(CMergeDesc { head_dim: 0, ..d }),
            0,
            a,
            o,
            1,
        ),
        (
            "overflow",
            Some(CMergeDesc {
                batch: usize::MAX,
                seqlen: usize::MAX,
                ..d
            }),
            0,
            a,
            o,
            1,
        ),
        (
            "huge dim",
            Some(CMergeDesc {
                seqlen: 1 << 40,
                ..d
            }),
            0,
            a,
            o,
            1,
        ),
        ("out.o = a.o", Some(d), 0, a, a_o, 1),
        ("out.lse on out.o", Some(d), 0, a, lse_on_o, 1),
    ];
    for (name, d, dtype, a, o, want) in cases {
        let dp = d.as_ref().map_or(ptr::null(), |d| d as *const _);
        assert_eq!(run(dp, dtype, a, o), want, "{name}: {}", last_error());
        assert!(!last_error().is_empty(), "{name}: no message");
    }
    // In place: acc may not overlap part.
    // SAFETY: refused before use.
    let st = unsafe { longattn_merge_into_cpu(&d, 0, a_o, a) };
    assert!(
        st == 1 && last_error().contains("overlaps"),
        "{st}: {}",
        last_error()
    );
    // SAFETY: NULL descriptor refused; NULL outputs skipped.
    let st = unsafe { longattn_merge_sizes(ptr::null(), ptr::null_mut(), ptr::null_mut()) };
    assert_eq!(st, 9);
}

/// The CUDA entry points of append, merge and policy decode: arguments refused before a GPU
/// is opened (host pointers, never used); valid ones without a GPU give `NoGpu` (7) or
/// `CudaNotCompiled` (6); on a GPU (not yet run there), the same cache and metadata bits as
/// the C CPU append, and the results of the C CPU policy decode and merge.
#[test]
fn c_api_append_merge_policy_cuda() {
    use longattn::cudarc::driver::{DevicePtr, DevicePtrMut};
    let pc = policy_case(71);
    let d = pc.c.desc;
    let qs = Strides::contiguous(d.q_len, d.heads_q, d.head_dim);
    let to_bf16 = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
    let (cu, kn, vn, s) = &pc.new;
    let (s, cu) = (*s, cu.as_ptr());
    let (q, kn, vn) = (to_bf16(&pc.c.q), to_bf16(kn), to_bf16(vn));
    let (n, m, z) = (pc.k.len(), pc.kmin.len(), bf16::ZERO);
    // The C CPU paths: append then policy decode (bf16), and a merge (f32).
    let (mut k, mut v, mut lo, mut hi) = (vec![z; n], vec![z; n], vec![z; m], vec![z; m]);
    let kv = kv_mut(&mut k, &mut v, Some((&mut lo, &mut hi)));
    let (kt, vt) = (tensor(&kn, s), tensor(&vn, s));
    // SAFETY: buffers of the stated lengths; distinct allocations.
    let st = unsafe { longattn_paged_append_cpu(&d, cu, 2, kt, vt, kv) };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let policy = c_policy(&lo, &hi);
    let mut want = vec![bf16::NAN; q.len()];
    let (kp, vp) = (k.as_ptr().cast(), v.as_ptr().cast());
    // SAFETY: as above.
    let st = unsafe {
        longattn_paged_decode_policy_cpu(
            &d,
            &policy,
            2,
            tensor(&q, qs),
            kp,
            vp,
            n,
            tensor_mut(&mut want, qs),
            ptr::null_mut(),
            0,
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let mc = merge_case(72);
    let mut merged = (vec![f32::NAN; mc.a.0.len()], vec![f32::NAN; mc.a.1.len()]);
    let (pa, pb) = (partial(&mc.a), partial(&mc.b));
    // SAFETY: as above.
    let st = unsafe { longattn_merge_cpu(&mc.desc, 0, pa, pb, partial_mut(&mut merged)) };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());

    // Host pointers given to the CUDA entry points: refused before use, or no GPU.
    let (mut k2, mut v2, mut lo2, mut hi2) = (vec![z; n], vec![z; n], vec![z; m], vec![z; m]);
    let kv = kv_mut(&mut k2, &mut v2, Some((&mut lo2, &mut hi2)));
    let mut out = vec![bf16::ZERO; q.len()];
    let o = tensor_mut(&mut out, qs);
    let mut scratch = (vec![0f32; mc.a.0.len()], vec![0f32; mc.a.1.len()]);
    let po = partial_mut(&mut scratch);
    let (ks, bad) = ([0.01f32; 3], [0.0f32; 3]);
    let fp8 = CFp8Cache {
        k_cache: kp,
        v_cache: vp,
        cache_len: n,
        k_scales: ks.as_ptr(),
        v_scales: ks.as_ptr(),
    };
    let null = ptr::null_mut();
    let calls = |d: &CPagedDesc,
                 p: &CDecodePolicy,
                 kt: CTensor,
                 kv: CPagedKvMut,
                 scales: *const f32,
                 md: &CMergeDesc,
                 pa: CPartial|
     -> [i32; 6] {
        // SAFETY: host pointers: refused before they are used, or (no GPU) never used.
        unsafe {
            [
                longattn_paged_append_cuda(d, cu, 2, kt, kt, kv, 0, null),
                longattn_paged_append_fp8_cuda(d, cu, 2, kt, kt, kv, scales, scales, 0, null),
                longattn_paged_decode_policy_cuda(
                    d,
                    p,
                    2,
                    kt,
                    kp,
                    vp,
                    n,
                    o,
                    null.cast(),
                    0,
                    0,
                    null,
                ),
                longattn_paged_decode_fp8_policy_cuda(d, p, 2, kt, fp8, o, null.cast(), 0, 0, null),
                longattn_merge_cuda(md, 0, pa, pb, po, 0, null),
                longattn_merge_into_cuda(md, 0, po, pa, 0, null),
            ]
        }
    };
    let bad_desc = CPagedDesc { page_size: 0, ..d };
    let bad_merge = CMergeDesc {
        head_dim: 0,
        ..mc.desc
    };
    let st = calls(&bad_desc, &policy, kt, kv, ks.as_ptr(), &bad_merge, pa);
    assert_eq!(st, [1; 6], "bad descriptors: {}", last_error());
    let null_kt = CTensor {
        data: ptr::null(),
        ..kt
    };
    let null_a = CPartial {
        lse: ptr::null(),
        ..pa
    };
    let st = calls(&d, &policy, null_kt, kv, ks.as_ptr(), &mc.desc, null_a);
    assert_eq!(st, [9; 6], "NULL buffers: {}", last_error());
    let lone = CPagedKvMut {
        kmax: null.cast(),
        ..kv
    };
    let bad_code = [0i32, 7, 0];
    let bad_policy = CDecodePolicy {
        heads: bad_code.as_ptr(),
        ..policy
    };
    let st = calls(&d, &bad_policy, kt, lone, bad.as_ptr(), &mc.desc, pa);
    assert_eq!(
        st[..4],
        [9, 3, 3, 3],
        "lone kmin, bad scales, bad policy: {}",
        last_error()
    );
    let Some(ctx) = common::gpu_or_skip("c_api_append_merge_policy_cuda") else {
        let st = calls(&d, &policy, kt, kv, ks.as_ptr(), &mc.desc, pa);
        assert!(
            st.iter().all(|&s| s == 6 || s == 7),
            "{st:?}: {}",
            last_error()
        );
        return;
    };

    let gs = ctx.default_stream();
    let stream = gs.cu_stream() as *mut std::ffi::c_void;
    let (dkn, dvn, dq) = (
        gs.clone_htod(&kn).unwrap(),
        gs.clone_htod(&vn).unwrap(),
        gs.clone_htod(&q).unwrap(),
    );
    let mut dcache: Vec<_> = [n, n, m, m]
        .iter()
        .map(|&l| gs.alloc_zeros::<bf16>(l).unwrap())
        .collect();
    let st = {
        let (pkn, _g1) = dkn.device_ptr(&gs);
        let (pvn, _g2) = dvn.device_ptr(&gs);
        let [dk, dv, dlo, dhi] = &mut dcache[..] else {
            unreachable!()
        };
        let (pk, _g3) = dk.device_ptr_mut(&gs);
        let (pv, _g4) = dv.device_ptr_mut(&gs);
        let (plo, _g5) = dlo.device_ptr_mut(&gs);
        let (phi, _g6) = dhi.device_ptr_mut(&gs);
        let kv = CPagedKvMut {
            k_cache: pk as *mut _,
            v_cache: pv as *mut _,
            cache_len: n,
            kmin: plo as *mut _,
            kmax: phi as *mut _,
            meta_len: m,
        };
        let (kt, vt) = (
            device_tensor(pkn, kn.len(), s),
            device_tensor(pvn, vn.len(), s),
        );
        // SAFETY: live device allocations of the stated lengths on this context.
        unsafe { longattn_paged_append_cuda(&d, cu, 2, kt, vt, kv, 0, stream) }
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    for (name, dev, host) in [
        ("k", 0, &k),
        ("v", 1, &v),
        ("kmin", 2, &lo),
        ("kmax", 3, &hi),
    ] {
        let got = gs.clone_dtoh(&dcache[dev]).unwrap();
        assert_eq!(bits(&got), bits(host), "GPU append: {name}");
    }
    let mut dout = gs.alloc_zeros::<bf16>(q.len()).unwrap();
    let st = {
        let (pq, _g1) = dq.device_ptr(&gs);
        let (pk, _g2) = dcache[0].device_ptr(&gs);
        let (pv, _g3) = dcache[1].device_ptr(&gs);
        let (plo, _g4) = dcache[2].device_ptr(&gs);
        let (phi, _g5) = dcache[3].device_ptr(&gs);
        let (pout, _g6) = dout.device_ptr_mut(&gs);
        let p = CDecodePolicy {
            kmin: plo as *const _,
            kmax: phi as *const _,
            ..policy
        };
        // SAFETY: live device allocations of the stated lengths on this context.
        unsafe {
            longattn_paged_decode_policy_cuda(
                &d,
                &p,
                2,
                device_tensor(pq, q.len(), qs),
                pk as *const _,
                pv as *const _,
                n,
                device_tensor_mut(pout, q.len(), qs),
                ptr::null_mut(),
                0,
                0,
                stream,
            )
        }
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let to_f64 = |x: &[bf16]| x.iter().map(|v| v.to_f64()).collect::<Vec<_>>();
    let err = rel_l2(&to_f64(&gs.clone_dtoh(&dout).unwrap()), &to_f64(&want));
    assert!(
        err < 2e-2,
        "GPU policy decode: rel L2 {err} vs the CPU path"
    );
    let up = |x: &Vec<f32>| gs.clone_htod(x).unwrap();
    let (dao, dal, dbo, dbl) = (up(&mc.a.0), up(&mc.a.1), up(&mc.b.0), up(&mc.b.1));
    let (mut doo, mut dol) = (up(&scratch.0), up(&scratch.1));
    let st = {
        let dev = |p: u64, l: &Vec<f32>| (p as *const std::ffi::c_void, l.len());
        let (pao, _g1) = dao.device_ptr(&gs);
        let (pal, _g2) = dal.device_ptr(&gs);
        let (pbo, _g3) = dbo.device_ptr(&gs);
        let (pbl, _g4) = dbl.device_ptr(&gs);
        let (poo, _g5) = doo.device_ptr_mut(&gs);
        let (pol, _g6) = dol.device_ptr_mut(&gs);
        let part = |(o, ol): (*const std::ffi::c_void, usize),
                    (l, ll): (*const std::ffi::c_void, usize)| CPartial {
            o,
            o_len: ol,
            lse: l.cast(),
            lse_len: ll,
        };
        let out = CPartialMut {
            o: poo as *mut _,
            o_len: scratch.0.len(),
            lse: pol as *mut f32,
            lse_len: scratch.1.len(),
        };
        let a = part(dev(pao, &mc.a.0), dev(pal, &mc.a.1));
        let b = part(dev(pbo, &mc.b.0), dev(pbl, &mc.b.1));
        // SAFETY: live device allocations of the stated lengths on this context.
        unsafe { longattn_merge_cuda(&mc.desc, 0, a, b, out, 0, stream) }
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let f64s = |x: Vec<f32>| x.into_iter().map(f64::from).collect::<Vec<_>>();
    let err = rel_l2(&f64s(gs.clone_dtoh(&doo).unwrap()), &f64s(merged.0.clone()));
    assert!(err < 1e-5, "GPU merge: rel L2 {err} vs the CPU path");
    let lse: Vec<f64> = f64s(merged.1.clone());
    common::check_lse(&gs.clone_dtoh(&dol).unwrap(), &lse, 1e-4, "GPU merge lse");
}

// ---- Neighborhood attention, block-sparse prefill ----

/// A C grid dim.
fn na_dim(
    length: usize,
    kernel: usize,
    dilation: usize,
    stride: usize,
    causal: bool,
) -> CNeighborhoodDim {
    CNeighborhoodDim {
        length,
        kernel,
        dilation,
        stride,
        causal: causal as i32,
    }
}

/// A C neighborhood descriptor of `dims` (rank = their count).
fn na_desc(
    batch: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    dims: &[CNeighborhoodDim],
) -> CNeighborhoodDesc {
    let mut all = [na_dim(0, 0, 0, 0, false); 3];
    all[..dims.len()].copy_from_slice(dims);
    CNeighborhoodDesc {
        batch,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        rank: dims.len(),
        dims: all,
        scale: 0.0,
        softcap: 0.0,
    }
}

/// The Rust problem the C descriptor means (dilation and stride 0 read as 1).
fn rust_na(c: &CNeighborhoodDesc) -> NeighborhoodAttention {
    let dims: Vec<NeighborhoodDim> = c.dims[..c.rank]
        .iter()
        .map(|d| {
            NeighborhoodDim::new(d.length, d.kernel)
                .with_dilation(d.dilation.max(1))
                .with_stride(d.stride.max(1))
                .with_causal(d.causal != 0)
        })
        .collect();
    let mut opts = AttentionOptions::default();
    if c.scale != 0.0 {
        opts = opts.with_scale(c.scale);
    }
    if c.softcap != 0.0 {
        opts = opts.with_softcap(c.softcap);
    }
    let shape = NeighborhoodShape {
        batch: c.batch,
        heads_q: c.heads_q,
        heads_kv: c.heads_kv,
        head_dim: c.head_dim,
        dims: &dims,
    };
    NeighborhoodAttention::new(&shape, &opts).unwrap()
}

/// Random q, k, v of a neighborhood problem (contiguous) and their strides.
fn na_inputs<T: Element>(seed: u64, c: &CNeighborhoodDesc) -> ([Vec<T>; 3], Strides, Strides) {
    let tokens: usize = c.dims[..c.rank].iter().map(|d| d.length).product();
    let mut r = rng(seed);
    let nq = c.batch * tokens * c.heads_q * c.head_dim;
    let nk = c.batch * tokens * c.heads_kv * c.head_dim;
    (
        [
            random_vec(&mut r, nq),
            random_vec(&mut r, nk),
            random_vec(&mut r, nk),
        ],
        Strides::contiguous(tokens, c.heads_q, c.head_dim),
        Strides::contiguous(tokens, c.heads_kv, c.head_dim),
    )
}

/// A C entry's output and LSE in `T` (`out` with strides `qs`): bit for bit what the Rust
/// API writes (`rust` into fresh buffers), and within `tol` (LSE: 1e-4) of the f64 reference.
fn check_c_output<T: Element>(
    (out, lse): (&[T], &[f32]),
    qs: Strides,
    (ref_out, ref_lse): (Vec<f64>, Vec<f64>),
    tol: f64,
    rust: impl FnOnce(Strided<&mut [T]>, &mut [f32]) -> longattn::Result<()>,
) {
    let (mut want, mut want_lse) = (vec![T::from_f32(0.0); out.len()], vec![0f32; lse.len()]);
    rust(Strided::new(&mut want[..], qs), &mut want_lse).unwrap();
    let dtype = T::DTYPE;
    assert_eq!(bits(out), bits(&want), "{dtype:?}: out vs the Rust API");
    assert_eq!(bits(lse), bits(&want_lse), "{dtype:?}: lse vs the Rust API");
    let err = rel_l2(&common::to_f64(out), &ref_out);
    assert!(err < tol, "{dtype:?}: rel L2 {err} vs the f64 reference");
    common::check_lse(lse, &ref_lse, 1e-4, "lse vs the f64 reference");
}

/// The C neighborhood entry, the Rust API and the f64 reference on one problem in `T`: the
/// C output and LSE equal the Rust API's bit for bit and the reference within `tol`.
fn check_na_c<T: Element>(seed: u64, c: &CNeighborhoodDesc, tol: f64) {
    let ([q, k, v], qs, ks) = na_inputs::<T>(seed, c);
    let (mut out_len, mut lse_len) = (0, 0);
    // SAFETY: valid descriptor and writable lengths.
    let st = unsafe { longattn_neighborhood_sizes(c, &mut out_len, &mut lse_len) };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let mut out = vec![T::from_f32(f32::NAN); out_len];
    let mut lse = vec![f32::NAN; lse_len];
    // SAFETY: buffers of the stated lengths of `T`; distinct allocations.
    let st = unsafe {
        longattn_neighborhood_forward_cpu(
            c,
            dtype_code::<T>(),
            tensor(&q, qs),
            tensor(&k, ks),
            tensor(&v, ks),
            tensor_mut(&mut out, qs),
            lse.as_mut_ptr(),
            lse.len(),
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let na = rust_na(c);
    let (qv, kv, vv) = (
        || Strided::new(&q[..], qs),
        || Strided::new(&k[..], ks),
        || Strided::new(&v[..], ks),
    );
    let reference = reference::neighborhood_attention_f64(&na, qv(), kv(), vv()).unwrap();
    check_c_output((&out, &lse), qs, reference, tol, |o, l| {
        na.forward_cpu(qv(), kv(), vv(), o, Some(l))
    });
}

#[test]
fn c_api_neighborhood_matches_rust_and_reference() {
    // 1-D dilated with GQA; 2-D with a causal dim, a strided dim, softcap and scale; 3-D
    // with dilation; odd lengths throughout.
    let one = na_desc(2, 4, 2, 8, &[na_dim(11, 5, 2, 0, false)]);
    let two = CNeighborhoodDesc {
        scale: 0.3,
        softcap: 15.0,
        ..na_desc(
            1,
            3,
            1,
            16,
            &[na_dim(5, 3, 0, 1, true), na_dim(7, 5, 1, 2, false)],
        )
    };
    let three = na_desc(
        1,
        2,
        2,
        8,
        &[
            na_dim(4, 3, 1, 1, false),
            na_dim(3, 3, 0, 0, false),
            na_dim(6, 3, 2, 0, false),
        ],
    );
    for (n, c) in [one, two, three].iter().enumerate() {
        let seed = 90 + n as u64;
        check_na_c::<f32>(seed, c, 1e-5);
        check_na_c::<f16>(seed, c, 4e-3);
        check_na_c::<bf16>(seed, c, 2e-2);
    }
    // kernel = length on every dim, no dilation, no causal dim: the dense entry's
    // non-causal attention over the flattened grid.
    let full = na_desc(
        1,
        2,
        1,
        8,
        &[na_dim(3, 3, 1, 1, false), na_dim(5, 5, 1, 1, false)],
    );
    let ([q, k, v], qs, ks) = na_inputs::<f32>(95, &full);
    let mut out = vec![f32::NAN; q.len()];
    // SAFETY: buffers of the stated lengths; no LSE.
    let st = unsafe {
        longattn_neighborhood_forward_cpu(
            &full,
            0,
            tensor(&q, qs),
            tensor(&k, ks),
            tensor(&v, ks),
            tensor_mut(&mut out, qs),
            ptr::null_mut(),
            0,
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let dense = Case {
        d: desc(1, 15, 15, 2, 1, 8),
        q,
        k,
        v,
        qs,
        ks,
    };
    let (st, want, _) = run_c(&dense);
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let err = rel_l2(&common::to_f64(&out), &common::to_f64(&want));
    assert!(
        err < 1e-6,
        "full-kernel neighborhood vs dense: rel L2 {err}"
    );
}

#[test]
fn c_api_neighborhood_refusals() {
    let good = na_desc(
        1,
        2,
        1,
        8,
        &[na_dim(6, 3, 1, 1, false), na_dim(5, 3, 1, 1, true)],
    );
    let ([q, k, v], qs, ks) = na_inputs::<f32>(96, &good);
    let sizes = |c: &CNeighborhoodDesc| {
        let (mut o, mut l) = (0, 0);
        // SAFETY: NULL or valid descriptor; writable lengths.
        unsafe { longattn_neighborhood_sizes(c, &mut o, &mut l) }
    };
    let dim = good.dims[0];
    let with_dim0 = |d: CNeighborhoodDim| {
        let mut c = good;
        c.dims[0] = d;
        c
    };
    let cases: Vec<(&str, CNeighborhoodDesc, i32)> = vec![
        ("rank 0", CNeighborhoodDesc { rank: 0, ..good }, 1),
        ("rank 4", CNeighborhoodDesc { rank: 4, ..good }, 5),
        (
            "rank huge",
            CNeighborhoodDesc {
                rank: usize::MAX,
                ..good
            },
            5,
        ),
        (
            "length 0",
            with_dim0(CNeighborhoodDim { length: 0, ..dim }),
            1,
        ),
        (
            "length huge",
            with_dim0(CNeighborhoodDim {
                length: usize::MAX,
                ..dim
            }),
            1,
        ),
        (
            "kernel 0",
            with_dim0(CNeighborhoodDim { kernel: 0, ..dim }),
            3,
        ),
        (
            "kernel > length",
            with_dim0(CNeighborhoodDim { kernel: 7, ..dim }),
            3,
        ),
        (
            "kernel * dilation > length",
            with_dim0(CNeighborhoodDim { dilation: 3, ..dim }),
            3,
        ),
        (
            "kernel * dilation overflows",
            with_dim0(CNeighborhoodDim {
                dilation: usize::MAX,
                ..dim
            }),
            3,
        ),
        (
            "stride > kernel",
            with_dim0(CNeighborhoodDim { stride: 4, ..dim }),
            3,
        ),
        (
            "stride on a causal dim",
            with_dim0(CNeighborhoodDim {
                stride: 2,
                causal: 1,
                ..dim
            }),
            3,
        ),
        (
            "heads_kv 0",
            CNeighborhoodDesc {
                heads_kv: 0,
                ..good
            },
            1,
        ),
        (
            "gqa ratio",
            CNeighborhoodDesc {
                heads_kv: 3,
                ..good
            },
            1,
        ),
        (
            "head_dim 0",
            CNeighborhoodDesc {
                head_dim: 0,
                ..good
            },
            1,
        ),
        (
            "batch huge",
            CNeighborhoodDesc {
                batch: usize::MAX,
                ..good
            },
            1,
        ),
        (
            "scale nan",
            CNeighborhoodDesc {
                scale: f32::NAN,
                ..good
            },
            3,
        ),
        (
            "softcap -1",
            CNeighborhoodDesc {
                softcap: -1.0,
                ..good
            },
            3,
        ),
        (
            "grid overflows",
            na_desc(1, 1, 1, 8, &[na_dim(i32::MAX as usize, 1, 1, 1, false); 3]),
            1,
        ),
    ];
    for (name, c, want) in cases {
        assert_eq!(sizes(&c), want, "{name}: {}", last_error());
        assert!(!last_error().is_empty(), "{name}: no message");
    }
    // SAFETY: NULL descriptor is checked before use.
    let st = unsafe { longattn_neighborhood_sizes(ptr::null(), ptr::null_mut(), ptr::null_mut()) };
    assert_eq!(st, LONGATTN_ERR_NULL_POINTER);
    assert_eq!(sizes(&good), LONGATTN_OK);
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; 2 * 30];
    let call =
        |c: *const CNeighborhoodDesc, dtype: i32, q: CTensor, out: CTensorMut, lse: &mut [f32]| {
            // SAFETY: every non-NULL buffer holds `len` f32s (or is refused first).
            unsafe {
                longattn_neighborhood_forward_cpu(
                    c,
                    dtype,
                    q,
                    tensor(&k, ks),
                    tensor(&v, ks),
                    out,
                    lse.as_mut_ptr(),
                    lse.len(),
                )
            }
        };
    let null_q = CTensor {
        data: ptr::null(),
        ..tensor(&q, qs)
    };
    assert_eq!(
        call(
            ptr::null(),
            0,
            tensor(&q, qs),
            tensor_mut(&mut out, qs),
            &mut lse
        ),
        9
    );
    assert_eq!(
        call(&good, 0, null_q, tensor_mut(&mut out, qs), &mut lse),
        9
    );
    assert!(last_error().contains('q'), "{}", last_error());
    let null_out = CTensorMut {
        data: ptr::null_mut(),
        ..tensor_mut(&mut out, qs)
    };
    assert_eq!(call(&good, 0, tensor(&q, qs), null_out, &mut lse), 9);
    assert_eq!(
        call(&good, 9, tensor(&q, qs), tensor_mut(&mut out, qs), &mut lse),
        5
    );
    let short = call(
        &good,
        0,
        tensor(&q[..7], qs),
        tensor_mut(&mut out, qs),
        &mut lse,
    );
    assert_eq!(short, 1, "{}", last_error());
    let short_lse = call(
        &good,
        0,
        tensor(&q, qs),
        tensor_mut(&mut out, qs),
        &mut lse[..5],
    );
    assert_eq!(short_lse, 1, "{}", last_error());
    let huge = CTensor {
        len: usize::MAX,
        ..tensor(&q, qs)
    };
    assert_eq!(call(&good, 0, huge, tensor_mut(&mut out, qs), &mut lse), 1);
    let mut shared = q.clone();
    let q_view = tensor(&shared, qs);
    let out_view = tensor_mut(&mut shared, qs);
    assert_eq!(
        call(&good, 0, q_view, out_view, &mut lse),
        1,
        "{}",
        last_error()
    );
    assert!(last_error().contains("overlaps"), "{}", last_error());
    assert_eq!(
        call(&good, 0, tensor(&q, qs), tensor_mut(&mut out, qs), &mut lse),
        0
    );
    assert_eq!(last_error(), "");
}

/// A C block mask over the CSR arrays (which must outlive it).
fn c_mask(
    dims: BlockMaskDims,
    offsets: &[i32],
    indices: &[i32],
    full: Option<&[u8]>,
) -> CBlockMask {
    CBlockMask {
        batch: dims.batch,
        heads: dims.heads,
        num_q_blocks: dims.num_q_blocks,
        num_k_blocks: dims.num_k_blocks,
        block_m: dims.block_m,
        block_n: dims.block_n,
        offsets: offsets.as_ptr(),
        indices: indices.as_ptr(),
        full: full.map_or(ptr::null(), |f| f.as_ptr()),
        nnz: indices.len(),
    }
}

/// A random block mask of `dims`: each block listed with probability 1/2, a third of those
/// full.
fn random_mask(seed: u64, dims: BlockMaskDims) -> BlockMask {
    use rand::Rng;
    let mut r = rng(seed);
    BlockMask::from_lists(dims, |_| {
        (0..dims.num_k_blocks)
            .filter_map(|kb| {
                let kind = match r.random_range(0..6) {
                    0 => BlockKind::Full,
                    1 | 2 => BlockKind::Partial,
                    _ => return None,
                };
                Some((kb, kind))
            })
            .collect()
    })
    .unwrap()
}

/// The Rust dense problem of a fixed-length C descriptor.
fn rust_dense(d: &CDenseDesc) -> FlashAttention {
    let window = Window::from_flash(d.window_left, d.window_right).unwrap();
    let mut opts = AttentionOptions::default()
        .with_window(window)
        .with_causal(d.causal != 0)
        .with_sinks(d.sinks);
    if d.softcap != 0.0 {
        opts = opts.with_softcap(d.softcap);
    }
    let shape = AttentionShape {
        batch: d.batch,
        heads_q: d.heads_q,
        heads_kv: d.heads_kv,
        head_dim: d.head_dim,
        seqlens: SeqLens::Fixed {
            seqlen_q: d.seqlen_q,
            seqlen_k: d.seqlen_k,
        },
    };
    FlashAttention::new(&shape, &opts).unwrap()
}

/// The C block-sparse entry on `mask` in `T`: returns the status, output and LSE.
fn run_bs_c<T: Element>(
    c: &Case,
    mask: &CBlockMask,
    inputs: &[Vec<T>; 3],
) -> (i32, Vec<T>, Vec<f32>) {
    let (mut out_len, mut lse_len) = (0, 0);
    // SAFETY: valid descriptor and writable lengths.
    let st = unsafe { longattn_dense_sizes(&c.d, &mut out_len, &mut lse_len) };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let mut out = vec![T::from_f32(f32::NAN); out_len];
    let mut lse = vec![f32::NAN; lse_len];
    let [q, k, v] = inputs;
    // SAFETY: buffers of the stated lengths of `T`; the mask's arrays are alive.
    let st = unsafe {
        longattn_block_sparse_forward_cpu(
            &c.d,
            mask,
            dtype_code::<T>(),
            tensor(q, c.qs),
            tensor(k, c.ks),
            tensor(v, c.ks),
            tensor_mut(&mut out, c.qs),
            lse.as_mut_ptr(),
            lse.len(),
        )
    };
    (st, out, lse)
}

/// The C block-sparse entry vs the Rust API (bit for bit) and the f64 reference.
fn check_bs_c<T: Element>(c: &Case, mask: &BlockMask, tol: f64) {
    let inputs = [&c.q, &c.k, &c.v].map(|x| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>());
    let cm = c_mask(
        mask.dims(),
        mask.offsets(),
        mask.indices(),
        Some(mask.full_flags()),
    );
    let (st, out, lse) = run_bs_c(c, &cm, &inputs);
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let bs = BlockSparseAttention::new(rust_dense(&c.d), mask.clone()).unwrap();
    let [q, k, v] = &inputs;
    let (qv, kv, vv) = (
        || Strided::new(&q[..], c.qs),
        || Strided::new(&k[..], c.ks),
        || Strided::new(&v[..], c.ks),
    );
    let reference = reference::block_sparse_attention_f64(&bs, qv(), kv(), vv()).unwrap();
    check_c_output((&out, &lse), c.qs, reference, tol, |o, l| {
        bs.forward_cpu(qv(), kv(), vv(), o, Some(l))
    });
}

#[test]
fn c_api_block_sparse_matches_rust_and_reference() {
    // Odd lengths (short last blocks), GQA, causal + window + sinks + softcap intersected
    // with per-(batch, head) lists; then one broadcast mask.
    let d = CDenseDesc {
        causal: 1,
        window_left: 20,
        sinks: 1,
        softcap: 10.0,
        ..desc(2, 37, 53, 4, 2, 16)
    };
    let c = case(97, d);
    let dims = BlockMaskDims::for_lengths(2, 4, 37, 53, 8, 16).unwrap();
    let mask = random_mask(98, dims);
    check_bs_c::<f32>(&c, &mask, 1e-5);
    check_bs_c::<f16>(&c, &mask, 4e-3);
    check_bs_c::<bf16>(&c, &mask, 2e-2);
    let broadcast = random_mask(99, BlockMaskDims::for_lengths(1, 1, 37, 53, 16, 8).unwrap());
    check_bs_c::<f32>(&c, &broadcast, 1e-5);

    // Every block listed as partial (full = NULL) with causal set: the dense causal entry.
    let d = CDenseDesc {
        causal: 1,
        ..desc(1, 29, 41, 2, 1, 8)
    };
    let c = case(100, d);
    let dims = BlockMaskDims::for_lengths(1, 1, 29, 41, 8, 8).unwrap();
    let dense_mask = BlockMask::dense(dims, BlockKind::Partial).unwrap();
    let cm = c_mask(dims, dense_mask.offsets(), dense_mask.indices(), None);
    let inputs = [c.q.clone(), c.k.clone(), c.v.clone()];
    let (st, out, lse) = run_bs_c(&c, &cm, &inputs);
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let (st, want, want_lse) = run_c(&c);
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let err = rel_l2(&common::to_f64(&out), &common::to_f64(&want));
    assert!(
        err < 1e-6,
        "all-partial causal vs dense causal: rel L2 {err}"
    );
    common::check_lse(&lse, &common::to_f64(&want_lse), 1e-5, "all-partial lse");
}

#[test]
fn c_api_block_sparse_refusals() {
    let d = CDenseDesc {
        causal: 1,
        ..desc(1, 20, 20, 2, 1, 8)
    };
    let c = case(101, d);
    let dims = BlockMaskDims::for_lengths(1, 2, 20, 20, 8, 8).unwrap(); // 3 x 3 blocks
    // Lists: 3 per head, each [0..=qb] (lower triangle), head 1 like head 0.
    let offsets = [0i32, 1, 3, 6, 7, 9, 12];
    let indices = [0i32, 0, 1, 0, 1, 2, 0, 0, 1, 0, 1, 2];
    let full = [1u8, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0];
    let good = c_mask(dims, &offsets, &indices, Some(&full));
    let inputs = [c.q.clone(), c.k.clone(), c.v.clone()];
    let run = |m: &CBlockMask| run_bs_c(&c, m, &inputs).0;
    assert_eq!(run(&good), LONGATTN_OK, "{}", last_error());
    let with = |offsets: &[i32], indices: &[i32]| CBlockMask {
        offsets: offsets.as_ptr(),
        indices: indices.as_ptr(),
        nnz: indices.len(),
        full: ptr::null(),
        ..good
    };
    let mut o = offsets;
    o[0] = 1;
    let first_not_zero = with(&o, &indices);
    let mut o = offsets;
    o[2] = 0;
    let decreasing = with(&o, &indices);
    let last_off = with(&offsets, &indices[..11]);
    let mut i = indices;
    i[5] = 3;
    let out_of_range = with(&offsets, &i);
    let mut i = indices;
    i[5] = -1;
    let negative = with(&offsets, &i);
    let mut i = indices;
    (i[4], i[5]) = (2, 1);
    let unsorted = with(&offsets, &i);
    let mut i = indices;
    i[5] = 1;
    let duplicate = with(&offsets, &i);
    // Dims that do not match the problem, with valid (empty) lists of their own count.
    let empty = [0i32; 10];
    let heads3 = CBlockMask {
        heads: 3,
        ..with(&empty, &[])
    };
    let q_blocks2 = CBlockMask {
        num_q_blocks: 2,
        ..with(&empty[..5], &[])
    };
    let cases: Vec<(&str, CBlockMask, i32, &str)> = vec![
        ("offsets[0] != 0", first_not_zero, 4, "offsets[0]"),
        ("offsets decrease", decreasing, 4, "decrease"),
        ("last offset != nnz", last_off, 4, "last offset"),
        ("index out of range", out_of_range, 4, "outside"),
        ("negative index", negative, 4, "outside"),
        ("unsorted list", unsorted, 4, "not sorted"),
        ("duplicate index", duplicate, 4, "twice"),
        ("heads mismatch", heads3, 1, "heads"),
        ("num_q_blocks mismatch", q_blocks2, 1, "num_q_blocks"),
        (
            "num_k_blocks mismatch",
            CBlockMask {
                num_k_blocks: 4,
                ..good
            },
            1,
            "num_k_blocks",
        ),
        (
            "num_k_blocks too small",
            CBlockMask {
                num_k_blocks: 2,
                ..good
            },
            4,
            "outside",
        ),
        ("block_m 0", CBlockMask { block_m: 0, ..good }, 3, "block_m"),
        ("batch 0", CBlockMask { batch: 0, ..good }, 3, "batch"),
        (
            "lists overflow",
            CBlockMask {
                num_q_blocks: usize::MAX,
                ..good
            },
            1,
            "overflows",
        ),
        (
            "lists above i32",
            CBlockMask {
                num_q_blocks: 1 << 31,
                ..good
            },
            1,
            "overflows",
        ),
        (
            "nnz huge",
            CBlockMask {
                nnz: usize::MAX,
                ..good
            },
            1,
            "too large",
        ),
        (
            "NULL offsets",
            CBlockMask {
                offsets: ptr::null(),
                ..good
            },
            9,
            "offsets",
        ),
        (
            "NULL indices",
            CBlockMask {
                indices: ptr::null(),
                ..good
            },
            9,
            "indices",
        ),
    ];
    for (name, m, want, msg) in cases {
        assert_eq!(run(&m), want, "{name}: {}", last_error());
        assert!(last_error().contains(msg), "{name}: {}", last_error());
    }
    // NULL mask, a bad descriptor, a bad dtype, overlapping out.
    let call = |d: &CDenseDesc, m: *const CBlockMask, dtype: i32, out: CTensorMut| {
        // SAFETY: every non-NULL buffer holds `len` f32s (or is refused first).
        unsafe {
            longattn_block_sparse_forward_cpu(
                d,
                m,
                dtype,
                tensor(&c.q, c.qs),
                tensor(&c.k, c.ks),
                tensor(&c.v, c.ks),
                out,
                ptr::null_mut(),
                0,
            )
        }
    };
    let mut out = vec![0f32; c.q.len()];
    assert_eq!(call(&c.d, ptr::null(), 0, tensor_mut(&mut out, c.qs)), 9);
    assert!(last_error().contains("mask"), "{}", last_error());
    let bad = CDenseDesc { heads_kv: 0, ..c.d };
    assert_eq!(call(&bad, &good, 0, tensor_mut(&mut out, c.qs)), 1);
    assert_eq!(call(&c.d, &good, 3, tensor_mut(&mut out, c.qs)), 5);
    let mut shared = c.k.clone();
    let out_over_k = CTensorMut {
        len: c.q.len().min(shared.len()),
        ..tensor_mut(&mut shared, c.qs)
    };
    // SAFETY: as above; `out` overlaps `k` and is refused before any slice is formed.
    let st = unsafe {
        longattn_block_sparse_forward_cpu(
            &c.d,
            &good,
            0,
            tensor(&c.q, c.qs),
            tensor(&shared, c.ks),
            tensor(&c.v, c.ks),
            out_over_k,
            ptr::null_mut(),
            0,
        )
    };
    assert_eq!(st, 1, "{}", last_error());
    assert!(last_error().contains("overlaps"), "{}", last_error());
}

/// The C MoBA entry vs the Rust API's `moba_attention` + `forward_cpu` (bit for bit) and the
/// f64 reference on the same selection.
fn check_moba_c<T: Element>(c: &Case, config: CMobaConfig, tol: f64) {
    let [q, k, v] =
        [&c.q, &c.k, &c.v].map(|x| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>());
    let mut out = vec![T::from_f32(f32::NAN); q.len()];
    let lse_len = c.d.batch * c.d.heads_q * c.d.seqlen_q;
    let mut lse = vec![f32::NAN; lse_len];
    // SAFETY: buffers of the stated lengths of `T`; distinct allocations.
    let st = unsafe {
        longattn_moba_forward_cpu(
            &c.d,
            config,
            dtype_code::<T>(),
            tensor(&q, c.qs),
            tensor(&k, c.ks),
            tensor(&v, c.ks),
            tensor_mut(&mut out, c.qs),
            lse.as_mut_ptr(),
            lse.len(),
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let cfg = MobaConfig {
        block_n: config.block_n,
        top_k: config.top_k,
    };
    let (qv, kv, vv) = (
        || Strided::new(&q[..], c.qs),
        || Strided::new(&k[..], c.ks),
        || Strided::new(&v[..], c.ks),
    );
    let bs = block_sparse::moba::moba_attention(&rust_dense(&c.d), &cfg, 64, qv(), kv()).unwrap();
    let reference = reference::block_sparse_attention_f64(&bs, qv(), kv(), vv()).unwrap();
    check_c_output((&out, &lse), c.qs, reference, tol, |o, l| {
        bs.forward_cpu(qv(), kv(), vv(), o, Some(l))
    });
}

#[test]
fn c_api_moba_matches_rust_and_reference() {
    let d = CDenseDesc {
        causal: 1,
        ..desc(2, 37, 53, 4, 2, 16)
    };
    let c = case(105, d);
    let config = CMobaConfig {
        block_n: 8,
        top_k: 3,
    };
    check_moba_c::<f32>(&c, config, 1e-5);
    check_moba_c::<bf16>(&c, config, 2e-2);
    // top_k above the block count: every earlier block (dense causal attention).
    let all = CMobaConfig {
        block_n: 16,
        top_k: 100,
    };
    check_moba_c::<f16>(&c, all, 4e-3);
    // Refusals: a zero knob, a bad descriptor, NULL buffers.
    let mut out = vec![0f32; c.q.len()];
    let mut call = |d: &CDenseDesc, config: CMobaConfig, q: CTensor| {
        // SAFETY: every non-NULL buffer holds `len` f32s (or is refused first).
        unsafe {
            longattn_moba_forward_cpu(
                d,
                config,
                0,
                q,
                tensor(&c.k, c.ks),
                tensor(&c.v, c.ks),
                tensor_mut(&mut out, c.qs),
                ptr::null_mut(),
                0,
            )
        }
    };
    let q = tensor(&c.q, c.qs);
    for (name, cfg, want) in [
        ("top_k 0", CMobaConfig { top_k: 0, ..config }, 3),
        (
            "block_n 0",
            CMobaConfig {
                block_n: 0,
                ..config
            },
            3,
        ),
    ] {
        assert_eq!(call(&c.d, cfg, q), want, "{name}: {}", last_error());
        assert!(
            last_error().contains(name.split(' ').next().unwrap()),
            "{name}: {}",
            last_error()
        );
    }
    let bad = CDenseDesc { heads_kv: 3, ..c.d };
    assert_eq!(call(&bad, config, q), 1, "{}", last_error());
    let null_q = CTensor {
        data: ptr::null(),
        ..q
    };
    assert_eq!(call(&c.d, config, null_q), 9, "{}", last_error());
    assert_eq!(
        call(&c.d, config, tensor(&c.q[..5], c.qs)),
        1,
        "{}",
        last_error()
    );
}

/// The neighborhood, block-sparse and MoBA CUDA entries: arguments refused before a GPU is
/// opened (host pointers, never used); valid ones without a GPU give `NoGpu` (7) or
/// `CudaNotCompiled` (6); on a GPU (not yet run there), the results of the C CPU entries on
/// the same bf16 values (MoBA: a finite result; its f32 gating may break a near-tie unlike
/// the CPU's f64 gating, `tests/block_sparse_gpu.rs` checks its numerics).
#[test]
fn c_api_neighborhood_block_sparse_moba_cuda() {
    use longattn::cudarc::driver::{DevicePtr, DevicePtrMut};
    let na = na_desc(
        1,
        2,
        1,
        64,
        &[na_dim(9, 3, 1, 1, false), na_dim(10, 5, 2, 1, true)],
    );
    let ([nq, nk, nv], nqs, nks) = na_inputs::<bf16>(102, &na);
    let d = CDenseDesc {
        causal: 1,
        ..desc(1, 150, 190, 2, 1, 64)
    };
    let dims = BlockMaskDims::for_lengths(1, 2, 150, 190, 64, 64).unwrap();
    let mask = random_mask(103, dims);
    let cm = c_mask(
        dims,
        mask.offsets(),
        mask.indices(),
        Some(mask.full_flags()),
    );
    let c = case(104, d);
    let to_bf16 = |x: &[f32]| x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>();
    let (bq, bk, bv) = (to_bf16(&c.q), to_bf16(&c.k), to_bf16(&c.v));
    let null: *mut std::ffi::c_void = ptr::null_mut();
    let moba = CMobaConfig {
        block_n: 64,
        top_k: 2,
    };
    let calls = |na_d: &CNeighborhoodDesc,
                 (d, m, mc): (&CDenseDesc, &CBlockMask, CMobaConfig),
                 q: [CTensor; 2]| {
        let (mut o1, mut o2) = (vec![bf16::ZERO; nq.len()], vec![bf16::ZERO; bq.len()]);
        // SAFETY: host pointers: refused before they are used, or (no GPU) never used.
        unsafe {
            [
                longattn_neighborhood_forward_cuda(
                    na_d,
                    2,
                    q[0],
                    tensor(&nk, nks),
                    tensor(&nv, nks),
                    tensor_mut(&mut o1, nqs),
                    null.cast(),
                    0,
                    0,
                    null,
                ),
                longattn_block_sparse_forward_cuda(
                    d,
                    m,
                    2,
                    q[1],
                    tensor(&bk, c.ks),
                    tensor(&bv, c.ks),
                    tensor_mut(&mut o2, c.qs),
                    null.cast(),
                    0,
                    0,
                    null,
                ),
                longattn_moba_forward_cuda(
                    d,
                    mc,
                    2,
                    q[1],
                    tensor(&bk, c.ks),
                    tensor(&bv, c.ks),
                    tensor_mut(&mut o2, c.qs),
                    null.cast(),
                    0,
                    0,
                    null,
                ),
            ]
        }
    };
    let good_q = [tensor(&nq, nqs), tensor(&bq, c.qs)];
    let bad_na = CNeighborhoodDesc { rank: 0, ..na };
    let bad_mask = CBlockMask { block_n: 0, ..cm };
    let bad_moba = CMobaConfig { top_k: 0, ..moba };
    assert_eq!(
        calls(&bad_na, (&d, &bad_mask, bad_moba), good_q),
        [1, 3, 3],
        "{}",
        last_error()
    );
    let null_q = good_q.map(|t| CTensor {
        data: ptr::null(),
        ..t
    });
    let good = (&d, &cm, moba);
    assert_eq!(calls(&na, good, null_q), [9; 3], "{}", last_error());
    let Some(stream) = common::gpu_stream_or_skip("c_api_neighborhood_block_sparse_moba_cuda")
    else {
        let st = calls(&na, good, good_q);
        assert!(
            st.iter().all(|&s| s == 6 || s == 7),
            "{st:?}: {}",
            last_error()
        );
        return;
    };
    // The C CPU entries on the same bf16 values.
    let mut na_want = vec![bf16::NAN; nq.len()];
    // SAFETY: host buffers of the stated lengths.
    let st = unsafe {
        longattn_neighborhood_forward_cpu(
            &na,
            2,
            tensor(&nq, nqs),
            tensor(&nk, nks),
            tensor(&nv, nks),
            tensor_mut(&mut na_want, nqs),
            null.cast(),
            0,
        )
    };
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let (st, bs_want, _) = run_bs_c(&c, &cm, &[bq.clone(), bk.clone(), bv.clone()]);
    assert_eq!(st, LONGATTN_OK, "{}", last_error());
    let s = stream.cu_stream() as *mut std::ffi::c_void;
    for (name, (q, k, v), (qs, ks), want) in [
        ("neighborhood", (&nq, &nk, &nv), (nqs, nks), Some(&na_want)),
        (
            "block-sparse",
            (&bq, &bk, &bv),
            (c.qs, c.ks),
            Some(&bs_want),
        ),
        ("moba", (&bq, &bk, &bv), (c.qs, c.ks), None),
    ] {
        let (dq, dk, dv) = (
            stream.clone_htod(q).unwrap(),
            stream.clone_htod(k).unwrap(),
            stream.clone_htod(v).unwrap(),
        );
        let mut dout = stream.alloc_zeros::<bf16>(q.len()).unwrap();
        let st = {
            let (pq, _g1) = dq.device_ptr(&stream);
            let (pk, _g2) = dk.device_ptr(&stream);
            let (pv, _g3) = dv.device_ptr(&stream);
            let (po, _g4) = dout.device_ptr_mut(&stream);
            let (tq, tk, tv, to) = (
                device_tensor(pq, q.len(), qs),
                device_tensor(pk, k.len(), ks),
                device_tensor(pv, v.len(), ks),
                device_tensor_mut(po, q.len(), qs),
            );
            // SAFETY: live device allocations of the stated lengths on this context.
            unsafe {
                match name {
                    "neighborhood" => longattn_neighborhood_forward_cuda(
                        &na,
                        2,
                        tq,
                        tk,
                        tv,
                        to,
                        null.cast(),
                        0,
                        0,
                        s,
                    ),
                    "block-sparse" => longattn_block_sparse_forward_cuda(
                        &d,
                        &cm,
                        2,
                        tq,
                        tk,
                        tv,
                        to,
                        null.cast(),
                        0,
                        0,
                        s,
                    ),
                    _ => longattn_moba_forward_cuda(
                        &d,
                        moba,
                        2,
                        tq,
                        tk,
                        tv,
                        to,
                        null.cast(),
                        0,
                        0,
                        s,
                    ),
                }
            }
        };
        assert_eq!(st, LONGATTN_OK, "{name}: {}", last_error());
        let got = stream.clone_dtoh(&dout).unwrap();
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{name}: output not finite"
        );
        if let Some(want) = want {
            let err = rel_l2(&common::to_f64(&got), &common::to_f64(want));
            assert!(err < 2e-2, "{name}: rel L2 {err} vs the C CPU entry");
        }
    }
}

#[test]
fn c_header_neighborhood_dims_match_the_crate() {
    let header = include_str!("../include/longattn.h");
    let line = header
        .lines()
        .find(|l| l.starts_with("#define LONGATTN_MAX_NEIGHBORHOOD_DIMS "))
        .expect("LONGATTN_MAX_NEIGHBORHOOD_DIMS missing");
    let n: usize = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_eq!(n, longattn::neighborhood::MAX_NEIGHBORHOOD_DIMS);
}
