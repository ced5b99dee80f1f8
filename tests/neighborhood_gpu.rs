//! GPU neighborhood attention (`forward_gpu_portable`, the portable kernel in
//! `kernels/neighborhood.cu`; `forward_gpu_fused`; `forward_gpu`, which picks one;
//! `forward_gpu_hopper`, on compute capability 9.0 only, else a SKIP line) against
//! the f64 reference over a sweep: ranks 1/2/3, odd and even kernels, kernel == length,
//! dilation > 1 with lengths it does not divide, causal per dim, stride, GQA, softcap, grids
//! that are not multiples of any tile, head dims 8 to 256,
//! f16 and bf16, padded strides. Outputs and LSE are NaN-poisoned before each run. Without
//! a GPU every test prints a `SKIP (no GPU)` line; with `LONGATTN_REQUIRE_GPU=1` a missing
//! GPU fails instead.

mod common;

use common::*;
use longattn::cudarc::driver::{CudaStream, DeviceRepr};
use longattn::reference::neighborhood_attention_f64;
use longattn::*;
use std::sync::Arc;

#[derive(Debug, Clone)]
struct Case {
    dims: Vec<NeighborhoodDim>,
    batch: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    softcap: Option<f32>,
    /// Extra elements per token row (a multiple of 8): non-contiguous rows.
    row_pad: usize,
}

fn case(dims: Vec<NeighborhoodDim>, d: usize) -> Case {
    Case {
        dims,
        batch: 1,
        hq: 2,
        hkv: 2,
        d,
        softcap: None,
        row_pad: 0,
    }
}

impl Case {
    /// The case's shape (`batch` sequences over the grid `dims`).
    fn shape(&self) -> NeighborhoodShape<'_> {
        NeighborhoodShape {
            batch: self.batch,
            heads_q: self.hq,
            heads_kv: self.hkv,
            head_dim: self.d,
            dims: &self.dims,
        }
    }

    /// The problem (with the case's softcap), the strides of q/out and of k/v (rows padded by
    /// `row_pad`), and q, k, v drawn in that order from `rng(seed)`.
    fn inputs<T: Element>(
        &self,
        seed: u64,
    ) -> (
        NeighborhoodAttention,
        Strides,
        Strides,
        Vec<T>,
        Vec<T>,
        Vec<T>,
    ) {
        let mut opts = AttentionOptions::default();
        if let Some(cap) = self.softcap {
            opts = opts.with_softcap(cap);
        }
        let attn = NeighborhoodAttention::new(&self.shape(), &opts).unwrap();
        let n = attn.tokens();
        let (qs, ks) = (
            strides(n, self.hq, self.d, self.row_pad),
            strides(n, self.hkv, self.d, self.row_pad),
        );
        let mut r = rng(seed);
        let q: Vec<T> = random_vec(&mut r, self.batch * qs.batch as usize);
        let k: Vec<T> = random_vec(&mut r, self.batch * ks.batch as usize);
        let v: Vec<T> = random_vec(&mut r, self.batch * ks.batch as usize);
        (attn, qs, ks, q, k, v)
    }
}

fn strides(n: usize, heads: usize, d: usize, pad: usize) -> Strides {
    let row = heads * d + pad;
    Strides {
        batch: (n * row) as i64,
        seq: row as i64,
        head: d as i64,
    }
}

/// Which entry point a GPU run takes.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    /// `forward_gpu`: the fused kernel where it runs, else the portable one.
    Auto,
    /// `forward_gpu_portable`.
    Portable,
    /// `forward_gpu_fused`.
    Fused,
    /// `forward_gpu_hopper` (compute capability 9.0 only).
    Hopper,
    /// `plan_gpu` then `NeighborhoodGpuPlan::forward` (what `forward_gpu` picks, schedule
    /// uploaded once).
    Plan,
}

/// Runs `c` on the GPU through `kernel`
/// and the f64 reference; returns the relative error.
fn run_case<T: Element + DeviceRepr>(
    stream: &Arc<CudaStream>,
    seed: u64,
    c: &Case,
    kernel: Kernel,
) -> f64 {
    let (attn, qs, ks, q, k, v) = c.inputs::<T>(seed);
    let n = attn.tokens();
    let (want, want_lse) = neighborhood_attention_f64(
        &attn,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
    )
    .unwrap();

    let dq = stream.clone_htod(&q).unwrap();
    let dk = stream.clone_htod(&k).unwrap();
    let dv = stream.clone_htod(&v).unwrap();
    // Poisoned: every element the kernel should write is NaN before the run (padding too,
    // which must stay NaN).
    let mut dout = stream
        .clone_htod(&vec![T::from_f32(f32::NAN); c.batch * qs.batch as usize])
        .unwrap();
    let mut dlse = stream.clone_htod(&vec![f32::NAN; attn.lse_len()]).unwrap();
    let (gq, gk, gv) = (
        Strided::new(&dq, qs),
        Strided::new(&dk, ks),
        Strided::new(&dv, ks),
    );
    let gout = Strided::new(&mut dout, qs);
    match kernel {
        Kernel::Fused => attn.forward_gpu_fused(stream, gq, gk, gv, gout, Some(&mut dlse)),
        Kernel::Hopper => attn.forward_gpu_hopper(stream, gq, gk, gv, gout, Some(&mut dlse)),
        Kernel::Portable => attn.forward_gpu_portable(stream, gq, gk, gv, gout, Some(&mut dlse)),
        Kernel::Auto => attn.forward_gpu(stream, gq, gk, gv, gout, Some(&mut dlse)),
        Kernel::Plan => {
            let plan = attn.plan_gpu(stream).unwrap();
            assert_eq!(plan.uses_fused(), [64, 128].contains(&c.d), "{c:?}");
            plan.forward(stream, gq, gk, gv, gout, Some(&mut dlse))
        }
    }
    .unwrap();
    let out = stream.clone_dtoh(&dout).unwrap();
    let lse = stream.clone_dtoh(&dlse).unwrap();
    // Gather the written rows into the reference's contiguous layout.
    let mut got = vec![0.0f64; attn.out_len()];
    let mut pad_written = 0;
    for b in 0..c.batch {
        for t in 0..n {
            let row = b * qs.batch as usize + t * qs.seq as usize;
            for h in 0..c.hq {
                for x in 0..c.d {
                    got[((b * n + t) * c.hq + h) * c.d + x] = out[row + h * c.d + x].to_f64();
                }
            }
            pad_written += out[row + c.hq * c.d..row + qs.seq as usize]
                .iter()
                .filter(|x| !x.to_f64().is_nan())
                .count();
        }
    }
    assert_eq!(pad_written, 0, "{c:?}: wrote into the row padding");
    let nan = got.iter().filter(|x| x.is_nan()).count();
    assert_eq!(
        nan,
        0,
        "{c:?} {kernel:?} {}: {nan} outputs unwritten or NaN",
        T::DTYPE
    );
    let err = rel_l2(&got, &want);
    assert!(
        err < tolerance::<T>(),
        "{c:?} {kernel:?} {}: rel err {err}",
        T::DTYPE
    );
    check_lse(
        &lse,
        &want_lse,
        lse_tol(&want_lse),
        &format!("{c:?} {kernel:?}"),
    );
    err
}

fn sweep() -> Vec<Case> {
    let nd = NeighborhoodDim::new;
    let mut cases = vec![
        // 1-D: odd/even kernels, kernel == length, dilation not dividing the length, causal,
        // stride.
        case(vec![nd(100, 7)], 64),
        case(vec![nd(77, 8)], 32),
        case(vec![nd(64, 64)], 128),
        case(vec![nd(50, 6).with_dilation(3)], 64),
        case(vec![nd(45, 9).with_causal(true)], 128),
        case(vec![nd(61, 7).with_stride(3)], 32),
        // 2-D.
        case(vec![nd(13, 5), nd(17, 4)], 64),
        case(
            vec![nd(11, 3).with_dilation(2), nd(14, 4).with_dilation(3)],
            128,
        ),
        case(vec![nd(12, 5).with_causal(true), nd(10, 3)], 32),
        case(vec![nd(15, 5).with_stride(2), nd(9, 9)], 64),
        case(vec![nd(8, 8), nd(9, 9)], 32),
        // 3-D.
        case(vec![nd(5, 3), nd(6, 3), nd(7, 4)], 64),
        case(
            vec![
                nd(6, 2).with_causal(true),
                nd(9, 3).with_dilation(2),
                nd(10, 5).with_stride(5),
            ],
            128,
        ),
        case(
            vec![
                nd(4, 4),
                nd(7, 2).with_causal(true),
                nd(11, 3).with_dilation(3),
            ],
            32,
        ),
    ];
    // GQA, softcap, batch > 1, padded rows, every lanes-per-key width (d 8..256).
    let mut gqa = case(vec![nd(9, 3), nd(10, 4).with_dilation(2)], 64);
    (gqa.batch, gqa.hq, gqa.hkv) = (2, 4, 2);
    cases.push(gqa);
    let mut cap = case(vec![nd(30, 5).with_causal(true)], 128);
    cap.softcap = Some(5.0);
    cap.hq = 4;
    cap.hkv = 1;
    cases.push(cap);
    for d in [8, 16, 24, 40, 96, 136, 256] {
        let mut c = case(vec![nd(7, 3), nd(6, 4)], d);
        c.row_pad = 8;
        cases.push(c);
    }
    cases
}

/// Problems with interior key tiles for the fused kernel (kernels larger than its 64-row
/// query tile) and several query tiles per grid.
fn fused_extra() -> Vec<Case> {
    let nd = NeighborhoodDim::new;
    vec![
        case(vec![nd(40, 31), nd(37, 29)], 64),
        case(vec![nd(300, 200)], 128),
        case(vec![nd(6, 5), nd(20, 17), nd(19, 16)], 128),
    ]
}

/// Runs without a GPU: every case of the sweeps is a valid problem, and the CPU path agrees
/// with the f64 reference on it (so a GPU failure points at the GPU path).
#[test]
fn sweep_cases_are_valid_problems() {
    for (i, c) in sweep()
        .iter()
        .chain(&fused_extra())
        .chain(&hopper_extra())
        .enumerate()
    {
        let (attn, qs, ks, q, k, v) = c.inputs::<f32>(7000 + i as u64);
        let n = attn.tokens();
        let (want, _) = neighborhood_attention_f64(
            &attn,
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
            Strided::new(&v[..], ks),
        )
        .unwrap();
        let os = Strides::contiguous(n, c.hq, c.d);
        let mut out = vec![0.0f32; attn.out_len()];
        attn.forward_cpu(
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
            Strided::new(&v[..], ks),
            Strided::new(&mut out[..], os),
            None,
        )
        .unwrap();
        let err = rel_l2(&to_f64(&out), &want);
        assert!(err < 1e-5, "{c:?}: CPU rel err {err}");
    }
}

#[test]
fn gpu_neighborhood_matches_reference_bf16() {
    let Some(stream) = gpu_stream_or_skip("gpu_neighborhood_matches_reference_bf16") else {
        return;
    };
    let mut worst: f64 = 0.0;
    for (i, c) in sweep().iter().enumerate() {
        worst = worst.max(run_case::<bf16>(
            &stream,
            100 + i as u64,
            c,
            Kernel::Portable,
        ));
        // What forward_gpu picks (fused at d64/128) on the same problem, one-shot and planned.
        worst = worst.max(run_case::<bf16>(&stream, 300 + i as u64, c, Kernel::Auto));
        worst = worst.max(run_case::<bf16>(&stream, 700 + i as u64, c, Kernel::Plan));
    }
    eprintln!("neighborhood gpu bf16: worst rel err {worst:.2e}");
}

#[test]
fn gpu_neighborhood_matches_reference_f16() {
    let Some(stream) = gpu_stream_or_skip("gpu_neighborhood_matches_reference_f16") else {
        return;
    };
    let mut worst: f64 = 0.0;
    for (i, c) in sweep().iter().enumerate() {
        worst = worst.max(run_case::<f16>(
            &stream,
            500 + i as u64,
            c,
            Kernel::Portable,
        ));
    }
    eprintln!("neighborhood gpu f16: worst rel err {worst:.2e}");
}

/// The fused tensor-core kernel (head_dim 64 and 128) on the same sweep plus
/// [`fused_extra`].
#[test]
fn gpu_neighborhood_fused_matches_reference() {
    let Some(stream) = gpu_stream_or_skip("gpu_neighborhood_fused_matches_reference") else {
        return;
    };
    let mut cases: Vec<Case> = sweep()
        .into_iter()
        .filter(|c| c.d == 64 || c.d == 128)
        .collect();
    cases.extend(fused_extra());
    let mut worst: f64 = 0.0;
    for (i, c) in cases.iter().enumerate() {
        worst = worst.max(run_case::<bf16>(&stream, 900 + i as u64, c, Kernel::Fused));
        worst = worst.max(run_case::<f16>(&stream, 1900 + i as u64, c, Kernel::Fused));
    }
    eprintln!("neighborhood gpu fused: worst rel err {worst:.2e}");
}

/// Problems for the Hopper kernel (`forward_gpu_hopper`, 128-row query boxes, 128-key
/// boxes): several blocks per grid, boxes past the grid's end, interior key boxes (kernels
/// larger than the boxes), dilation up to 8 in 2-D/3-D (2 in 1-D) with lengths it does not
/// divide, causal and strided dims, kernel == length, GQA, softcap, batch > 1 (a 3-D batch
/// runs one launch per element), padded rows.
fn hopper_extra() -> Vec<Case> {
    let nd = NeighborhoodDim::new;
    let mut cases = vec![
        case(vec![nd(1000, 300)], 64),
        case(vec![nd(301, 7).with_dilation(2)], 128),
        case(vec![nd(257, 257)], 64),
        case(vec![nd(500, 200).with_causal(true)], 128),
        case(vec![nd(333, 65).with_stride(16)], 64),
        case(vec![nd(40, 31), nd(37, 29)], 64),
        case(vec![nd(45, 13), nd(50, 13)], 128),
        case(
            vec![nd(70, 5).with_dilation(8), nd(33, 4).with_dilation(5)],
            64,
        ),
        case(
            vec![nd(30, 7).with_causal(true), nd(41, 9).with_stride(3)],
            128,
        ),
        case(vec![nd(6, 5), nd(20, 17), nd(19, 16)], 128),
        case(
            vec![
                nd(9, 3).with_causal(true),
                nd(21, 6).with_dilation(2),
                nd(18, 5),
            ],
            64,
        ),
    ];
    let mut gqa = case(vec![nd(33, 9), nd(35, 7).with_dilation(2)], 128);
    (gqa.batch, gqa.hq, gqa.hkv, gqa.row_pad) = (2, 4, 2, 8);
    cases.push(gqa);
    let mut batch3 = case(vec![nd(5, 3), nd(12, 5), nd(13, 8)], 64);
    (batch3.batch, batch3.hq, batch3.hkv) = (3, 4, 1);
    batch3.softcap = Some(4.0);
    cases.push(batch3);
    let mut cap = case(vec![nd(400, 129)], 128);
    cap.softcap = Some(5.0);
    cases.push(cap);
    cases
}

/// The Hopper kernel (head_dim 64 and 128, not yet verified on a GPU) on the sweep (cases
/// it refuses on the host, e.g. 1-D dilation 3, must be refused with `Error::Unsupported`)
/// plus [`hopper_extra`], bf16 and f16.
#[test]
fn gpu_neighborhood_hopper_matches_reference() {
    let Some(ctx) = gpu_or_skip("gpu_neighborhood_hopper_matches_reference") else {
        return;
    };
    if !is_hopper() {
        println!("SKIP gpu_neighborhood_hopper_matches_reference: not compute capability 9.0");
        return;
    }
    let stream = ctx.default_stream();
    let mut cases: Vec<Case> = sweep()
        .into_iter()
        .filter(|c| c.d == 64 || c.d == 128)
        .collect();
    cases.extend(hopper_extra());
    let mut worst: f64 = 0.0;
    let mut refused = 0;
    for (i, c) in cases.iter().enumerate() {
        let attn = NeighborhoodAttention::new(&c.shape(), &AttentionOptions::default()).unwrap();
        match longattn::neighborhood::schedule::HopperTiles::new(&attn) {
            Err(Error::Unsupported(_)) => {
                refused += 1;
                continue;
            }
            other => {
                other.unwrap();
            }
        }
        worst = worst.max(run_case::<bf16>(
            &stream,
            3100 + i as u64,
            c,
            Kernel::Hopper,
        ));
        worst = worst.max(run_case::<f16>(&stream, 4100 + i as u64, c, Kernel::Hopper));
    }
    assert!(
        refused <= 1,
        "only the 1-D dilation-3 case is refused ({refused})"
    );
    eprintln!("neighborhood gpu hopper: worst rel err {worst:.2e}");
}

#[test]
fn gpu_neighborhood_refuses_what_it_cannot_run() {
    let Some(stream) = gpu_stream_or_skip("gpu_neighborhood_refuses_what_it_cannot_run") else {
        return;
    };
    let dims = [NeighborhoodDim::new(8, 3)];
    let attn = |d| {
        NeighborhoodAttention::new(
            &NeighborhoodShape {
                batch: 1,
                heads_q: 1,
                heads_kv: 1,
                head_dim: d,
                dims: &dims,
            },
            &AttentionOptions::default(),
        )
        .unwrap()
    };
    // f32 and head_dim 12 are CPU-only; a misaligned stride is refused before the launch.
    let a = attn(16);
    let buf32 = stream.alloc_zeros::<f32>(a.out_len()).unwrap();
    let mut out32 = stream.alloc_zeros::<f32>(a.out_len()).unwrap();
    let s = Strides::contiguous(8, 1, 16);
    assert!(
        a.forward_gpu(
            &stream,
            Strided::new(&buf32, s),
            Strided::new(&buf32, s),
            Strided::new(&buf32, s),
            Strided::new(&mut out32, s),
            None,
        )
        .is_err()
    );
    let a12 = attn(12);
    let s12 = Strides::contiguous(8, 1, 12);
    let b12 = stream.alloc_zeros::<bf16>(a12.out_len()).unwrap();
    let mut o12 = stream.alloc_zeros::<bf16>(a12.out_len()).unwrap();
    assert!(
        a12.forward_gpu(
            &stream,
            Strided::new(&b12, s12),
            Strided::new(&b12, s12),
            Strided::new(&b12, s12),
            Strided::new(&mut o12, s12),
            None,
        )
        .is_err()
    );
    let odd = Strides {
        batch: 8 * 20,
        seq: 20,
        head: 16,
    };
    let b = stream.alloc_zeros::<bf16>(8 * 20).unwrap();
    let mut o = stream.alloc_zeros::<bf16>(8 * 20).unwrap();
    assert!(
        a.forward_gpu(
            &stream,
            Strided::new(&b, odd),
            Strided::new(&b, odd),
            Strided::new(&b, odd),
            Strided::new(&mut o, odd),
            None,
        )
        .is_err()
    );
}

/// A plan (fused kernel, schedule on the device) captured once in a CUDA graph and replayed
/// over fresh inputs: no upload or allocation happens inside `NeighborhoodGpuPlan::forward`.
#[test]
fn gpu_neighborhood_plan_replays_in_a_cuda_graph() {
    let Some(ctx) = gpu_or_skip("gpu_neighborhood_plan_replays_in_a_cuda_graph") else {
        return;
    };
    let stream = capture_stream(&ctx);
    let nd = NeighborhoodDim::new;
    let dims = [nd(37, 7).with_causal(true), nd(70, 13).with_dilation(2)];
    let (hq, hkv, d) = (4usize, 2usize, 64usize);
    let shape = NeighborhoodShape {
        batch: 2,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        dims: &dims,
    };
    let attn = NeighborhoodAttention::new(&shape, &AttentionOptions::default()).unwrap();
    let n = attn.tokens();
    let (qs, ks) = (strides(n, hq, d, 0), strides(n, hkv, d, 0));
    let (nq, nk) = (2 * qs.batch as usize, 2 * ks.batch as usize);
    let mut dq = stream.alloc_zeros::<bf16>(nq).unwrap();
    let mut dk = stream.alloc_zeros::<bf16>(nk).unwrap();
    let mut dv = stream.alloc_zeros::<bf16>(nk).unwrap();
    let mut dout = stream.alloc_zeros::<bf16>(nq).unwrap();
    let plan = attn.plan_gpu(&stream).unwrap();
    assert!(plan.uses_fused());
    let graph = capture_graph(&stream, || {
        plan.forward(
            &stream,
            Strided::new(&dq, qs),
            Strided::new(&dk, ks),
            Strided::new(&dv, ks),
            Strided::new(&mut dout, qs),
            None,
        )
        .unwrap();
    });
    for round in 0..3u64 {
        let mut r = rng(200 + round);
        let (q, k, v): (Vec<bf16>, Vec<bf16>, Vec<bf16>) = (
            random_vec(&mut r, nq),
            random_vec(&mut r, nk),
            random_vec(&mut r, nk),
        );
        stream.memcpy_htod(&q, &mut dq).unwrap();
        stream.memcpy_htod(&k, &mut dk).unwrap();
        stream.memcpy_htod(&v, &mut dv).unwrap();
        stream.memcpy_htod(&vec![bf16::NAN; nq], &mut dout).unwrap();
        graph.launch().unwrap();
        let out = stream.clone_dtoh(&dout).unwrap();
        let (want, _) = neighborhood_attention_f64(
            &attn,
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
            Strided::new(&v[..], ks),
        )
        .unwrap();
        let err = rel_l2(&to_f64(&out), &want);
        assert!(err < tolerance::<bf16>(), "replay {round}: rel L2 {err}");
    }
}
