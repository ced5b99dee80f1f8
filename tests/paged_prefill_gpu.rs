//! The Hopper paged prefill (`PagedPrefillKernel::Hopper`, kernels/paged_prefill_wgmma.cu:
//! wgmma + TMA copies of whole pages; compiled only, NOT YET RUN ON A GPU) against the f64
//! reference of dense attention over the gathered tokens (`paged_prefill_f64`). Skipped
//! without a GPU (fails under LONGATTN_REQUIRE_GPU=1); on a GPU that is not compute
//! capability 9.0 the tests check that the kernel is refused with `Error::Unsupported`.
//!
//! Caches come from the shared fixture (`common/paged.rs`: pages in a random order, K/V
//! written through `append_cpu`); every slot that holds no token (the last page's slots past
//! `seqlens_k`, unused pages) is then set to NaN, so a V row past the sequence that reached
//! P V, or a page read that should not happen, poisons the output. Outputs and LSE start as
//! NaN: every element must be written.

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use longattn::reference::paged::paged_prefill_f64;
use longattn::{
    AttentionOptions, Element, Error, F8E4M3, KvPages, KvScales, PagedPrefill, PagedPrefillKernel,
    Strided, Strides, Window, bf16, f16,
};
use std::sync::Arc;

mod common;
use common::paged::*;
use common::*;

/// GPU 0's stream when it is a Hopper (compute capability 9.0); otherwise None, after a SKIP
/// line (no GPU) or, on another GPU, after checking that the Hopper kernel is refused.
fn hopper_stream(test: &str) -> Option<Arc<CudaStream>> {
    let ctx = gpu_or_skip(test)?;
    let s = ctx.default_stream();
    if ctx.compute_capability().ok() == Some((9, 0)) {
        return Some(s);
    }
    // Elsewhere the launcher refuses it (sm_90a code runs on compute capability 9.0 only).
    let sc = scenario::<bf16>(&[40], 16, 1, 64, 5);
    let pf = PagedPrefill::new(&sc.cache, 1, 8, &AttentionOptions::causal())
        .unwrap()
        .with_kernel(PagedPrefillKernel::Hopper);
    let r = run(&s, &pf, &sc, &vec![bf16::ZERO; pf.out_len()], false);
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("compute capability")),
        "{r:?}"
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIP (not compute capability 9.0; the Hopper kernel was refused as it must be) {test}"
    );
    None
}

fn up<T: DeviceRepr>(s: &Arc<CudaStream>, x: &[T]) -> CudaSlice<T> {
    s.clone_htod(x).unwrap()
}

/// Sets every slot of the scenario's cache that holds no token to NaN.
fn poison_unused_slots<T: Element>(sc: &mut Scenario<T>) {
    let c = sc.cache.clone();
    let (ps, row) = (c.page_size(), c.heads_kv() * c.head_dim());
    let mut used = vec![false; c.layout().num_pages * ps];
    for b in 0..c.batch() {
        for t in 0..c.seqlen(b).unwrap() {
            let page = c.block_table()[b * c.max_pages_per_seq() + t / ps] as usize;
            used[page * ps + t % ps] = true;
        }
    }
    for (slot, _) in used.iter().enumerate().filter(|(_, u)| !**u) {
        for x in &mut sc.k_cache[slot * row..(slot + 1) * row] {
            *x = T::from_f32(f32::NAN);
        }
        for x in &mut sc.v_cache[slot * row..(slot + 1) * row] {
            *x = T::from_f32(f32::NAN);
        }
    }
}

/// Runs `pf` on the GPU (one-shot or through a plan) into NaN-poisoned output and LSE.
fn run<T: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    pf: &PagedPrefill,
    sc: &Scenario<T>,
    q: &[T],
    planned: bool,
) -> longattn::Result<(Vec<T>, Vec<f32>)> {
    let st = Strides::contiguous(pf.total_q(), pf.heads_q(), pf.cache().head_dim());
    let st = if pf.cu_seqlens_q().is_some() {
        st
    } else {
        q_strides(pf.q_len(), pf.heads_q(), pf.cache().head_dim())
    };
    let qd = up(s, q);
    let kd = up(s, &sc.k_cache);
    let vd = up(s, &sc.v_cache);
    let mut od = up(s, &vec![T::from_f32(f32::NAN); pf.out_len()]);
    let mut ld = up(s, &vec![f32::NAN; pf.lse_len()]);
    let (gq, kv, gout) = (
        Strided::new(&qd, st),
        KvPages { k: &kd, v: &vd },
        Strided::new(&mut od, st),
    );
    if planned {
        pf.plan_gpu(s)?.forward(s, gq, kv, gout, Some(&mut ld))?;
    } else {
        pf.forward_gpu(s, gq, kv, gout, Some(&mut ld))?;
    }
    Ok((s.clone_dtoh(&od).unwrap(), s.clone_dtoh(&ld).unwrap()))
}

/// Checks one problem against the f64 reference: no NaN (the poison), relative L2 error and
/// LSE within bf16/f16 tolerance.
fn check<T: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    pf: &PagedPrefill,
    sc: &Scenario<T>,
    q: &[T],
    planned: bool,
    what: &str,
) {
    let (out, lse) = run(s, pf, sc, q, planned).unwrap();
    assert!(
        out.iter().all(|x| !x.to_f32().is_nan()),
        "{what}: NaN in the output (unwritten, or poison read)"
    );
    assert!(lse.iter().all(|x| !x.is_nan()), "{what}: NaN in the LSE");
    let st = Strides::contiguous(pf.total_q(), pf.heads_q(), pf.cache().head_dim());
    let st = if pf.cu_seqlens_q().is_some() {
        st
    } else {
        q_strides(pf.q_len(), pf.heads_q(), pf.cache().head_dim())
    };
    let (want, want_lse) = paged_prefill_f64(pf, Strided::new(q, st), sc.kv()).unwrap();
    let err = rel_l2(&to_f64(&out), &want);
    assert!(err < 2e-2, "{what}: rel err {err}");
    check_lse(&lse, &want_lse, 2e-2, what);
}

/// Fixed q_len sweep: page sizes, GQA and head dims (64, 128 with 128-key tiles; 256 with
/// 64-key tiles), q_len 1, 77 (not a multiple of anything) and 200 (two query tiles, the
/// second partial); sequences of 0 keys, fewer keys than q_len, exactly q_len, and longer
/// prefixes (none a multiple of the key tile, so every sequence ends in a tail tile).
fn sweep<T: Element + DeviceRepr>(s: &Arc<CudaStream>, page_sizes: &[usize], q_lens: &[usize]) {
    for &ps in page_sizes {
        for (hkv, ratio, d) in [(2, 1, 128), (1, 4, 64), (2, 2, 256)] {
            for &q_len in q_lens {
                let hq = hkv * ratio;
                let seqlens = [0, q_len / 2, q_len, q_len + 45, q_len + 300];
                let seed = 9000 + ps as u64 + d as u64 * 3 + q_len as u64 * 5;
                let mut sc = scenario::<T>(&seqlens, ps, hkv, d, seed);
                poison_unused_slots(&mut sc);
                let q: Vec<T> = random_vec(&mut rng(seed + 1), seqlens.len() * q_len * hq * d);
                for (name, opts) in prefill_masks((150, 3)) {
                    let pf = PagedPrefill::new(&sc.cache, hq, q_len, &opts)
                        .unwrap()
                        .with_kernel(PagedPrefillKernel::Hopper);
                    let planned = ps == 16;
                    let what = format!(
                        "hopper ps {ps} hkv {hkv} hq {hq} d {d} q_len {q_len} {name} plan {planned}"
                    );
                    check(s, &pf, &sc, &q, planned, &what);
                }
            }
        }
    }
}

/// Varlen: counts 0, 9, 64, 1 and 130 (more than a query tile) over sequences of 3, 5, 100,
/// 64 and 400 keys (some shorter than their counts), one-shot and planned.
fn varlen_sweep<T: Element + DeviceRepr>(s: &Arc<CudaStream>, page_sizes: &[usize]) {
    let seqlens = [3usize, 5, 100, 64, 400];
    let lens = [0usize, 9, 64, 1, 130];
    let cu = cu_seqlens(&lens);
    let total = cu[lens.len()] as usize;
    for &ps in page_sizes {
        for (hkv, ratio, d) in [(2, 1, 128), (1, 4, 64), (2, 2, 256)] {
            let hq = hkv * ratio;
            let seed = 9500 + ps as u64 + d as u64;
            let mut sc = scenario::<T>(&seqlens, ps, hkv, d, seed);
            poison_unused_slots(&mut sc);
            let q: Vec<T> = random_vec(&mut rng(seed + 1), total * hq * d);
            for (name, opts) in prefill_masks((150, 3)) {
                let pf = PagedPrefill::new_varlen(&sc.cache, hq, &cu, &opts)
                    .unwrap()
                    .with_kernel(PagedPrefillKernel::Hopper);
                for planned in [false, true] {
                    let what = format!("hopper varlen ps {ps} hq {hq} d {d} {name} plan {planned}");
                    check(s, &pf, &sc, &q, planned, &what);
                }
            }
        }
    }
}

#[test]
fn gpu_hopper_prefill_matches_reference_bf16() {
    let Some(s) = hopper_stream("gpu_hopper_prefill_matches_reference_bf16") else {
        return;
    };
    sweep::<bf16>(&s, &[16, 64, 128, 256], &[1, 77, 200]);
}

#[test]
fn gpu_hopper_prefill_matches_reference_f16() {
    let Some(s) = hopper_stream("gpu_hopper_prefill_matches_reference_f16") else {
        return;
    };
    sweep::<f16>(&s, &[32, 256], &[77]);
}

#[test]
fn gpu_hopper_prefill_varlen_matches_reference() {
    let Some(s) = hopper_stream("gpu_hopper_prefill_varlen_matches_reference") else {
        return;
    };
    varlen_sweep::<bf16>(&s, &[16, 64, 128, 256]);
    varlen_sweep::<f16>(&s, &[64]);
}

/// Long sequences: many key tiles (the ring wraps several times), a chunk of 300 rows at the
/// end of 2000 keys and one of 129 rows at the end of 1000, page sizes below, at and above
/// the key tile, pages past each sequence poisoned.
#[test]
fn gpu_hopper_prefill_long_sequences() {
    let Some(s) = hopper_stream("gpu_hopper_prefill_long_sequences") else {
        return;
    };
    for ps in [16, 128, 512] {
        for (hkv, hq, d) in [(1, 2, 128), (2, 4, 256)] {
            let seqlens = [2000usize, 1000];
            let seed = 9900 + ps as u64 + d as u64;
            let mut sc = scenario::<bf16>(&seqlens, ps, hkv, d, seed);
            poison_unused_slots(&mut sc);
            let lens = [300usize, 129];
            let cu = cu_seqlens(&lens);
            let q: Vec<bf16> = random_vec(&mut rng(seed + 1), 429 * hq * d);
            for (name, opts) in [
                ("causal", AttentionOptions::causal()),
                (
                    "causal window 500 + sinks 4",
                    AttentionOptions::causal()
                        .with_window(Window::causal_tokens(500).unwrap())
                        .with_sinks(4),
                ),
            ] {
                let pf = PagedPrefill::new_varlen(&sc.cache, hq, &cu, &opts)
                    .unwrap()
                    .with_kernel(PagedPrefillKernel::Hopper);
                check(
                    &s,
                    &pf,
                    &sc,
                    &q,
                    false,
                    &format!("long ps {ps} d {d} {name}"),
                );
            }
        }
    }
}

/// What the Hopper kernel does not take is refused before any device work, with the
/// tensor-core kernel serving the same problem.
#[test]
fn gpu_hopper_prefill_refuses_what_it_does_not_take() {
    let Some(s) = gpu_stream_or_skip("gpu_hopper_prefill_refuses_what_it_does_not_take") else {
        return;
    };
    // Page sizes that are not powers of two from 16.
    for ps in [8, 24] {
        let sc = scenario::<bf16>(&[50, 7], ps, 1, 64, 11);
        let pf = PagedPrefill::new(&sc.cache, 2, 9, &AttentionOptions::causal()).unwrap();
        let q: Vec<bf16> = random_vec(&mut rng(12), pf.out_len());
        let hopper = pf.clone().with_kernel(PagedPrefillKernel::Hopper);
        for planned in [false, true] {
            let r = run(&s, &hopper, &sc, &q, planned);
            assert!(
                matches!(&r, Err(Error::Unsupported(m)) if m.contains("powers of two")),
                "ps {ps}: {r:?}"
            );
        }
        check(&s, &pf, &sc, &q, false, &format!("tensor core ps {ps}"));
    }
    // An FP8 cache.
    let scales = KvScales::uniform(1, 0.01, 0.01).unwrap();
    let sc = scenario_with::<bf16, F8E4M3>(&[50], 16, 1, 64, 13, Some(scales));
    let pf = PagedPrefill::new(&sc.cache, 1, 9, &AttentionOptions::causal())
        .unwrap()
        .with_kernel(PagedPrefillKernel::Hopper);
    let qd = up(&s, &vec![bf16::ZERO; pf.out_len()]);
    let (kd, vd) = (up(&s, &sc.k_cache), up(&s, &sc.v_cache));
    let mut od = up(&s, &vec![bf16::ZERO; pf.out_len()]);
    let st = q_strides(9, 1, 64);
    let r = pf.forward_gpu(
        &s,
        Strided::new(&qd, st),
        KvPages { k: &kd, v: &vd },
        Strided::new(&mut od, st),
        None,
    );
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("caches of q's dtype")),
        "{r:?}"
    );
}
