//! The main job: runs every implemented kernel family on the best device (GPU when present,
//! else the CPU path), checks each result against the f64 reference and prints a table: one
//! line per case, then one line per family, then a legend.
//!
//! `cargo run --release --example tour`

use longattn::cudarc::driver::sys::CUevent_flags;
use longattn::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use longattn::reference::{dense_attention_f64, neighborhood_attention_f64};
use longattn::*;
use std::sync::Arc;
use std::time::Instant;

struct Row {
    family: &'static str,
    shape: String,
    options: String,
    dtype: &'static str,
    device: String,
    max_err: f64,
    rel_err: f64,
    /// Where a GPU kernel ran and the CPU path ran too: the GPU result's relative L2 error
    /// against the CPU result.
    vs_cpu: Option<f64>,
    ms: f64,
}

const TOLERANCE: f64 = 2e-2;

/// Whether a row passes: its error against the f64 reference and, where the GPU and the CPU
/// path both ran, the GPU result's difference from the CPU result are below `TOLERANCE` (a
/// NaN error fails).
fn passes(r: &Row) -> bool {
    r.rel_err < TOLERANCE && r.vs_cpu.is_none_or(|e| e < TOLERANCE)
}

mod support;

/// Where a case ran, said plainly: "GPU <name> (sm_XY)" or "CPU (N threads)".
fn where_run(device: &Device) -> String {
    match device {
        Device::Cpu => device.describe(),
        Device::Cuda(_) => format!("GPU {}", device.describe()),
    }
}

/// Prints `rows` as a table whose columns are as wide as their widest cell; `right` marks the
/// right-aligned (numeric) columns.
fn print_table(header: &[&str], rows: &[Vec<String>], right: &[bool]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .zip(right)
            .map(|((cell, &w), &r)| {
                if r {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|&w| "-".repeat(w)).collect());
    for r in rows {
        line(r.clone());
    }
}

fn random(n: usize, seed: u64) -> Vec<bf16> {
    support::uniform(n, seed)
}

fn errors(got: &[f64], want: &[f64]) -> (f64, f64) {
    let mut max = 0.0f64;
    let (mut num, mut den) = (0.0, 0.0);
    for (g, w) in got.iter().zip(want) {
        let e = if g.is_nan() {
            f64::INFINITY
        } else {
            (g - w).abs()
        };
        max = max.max(e);
        num += e * e;
        den += w * w;
    }
    (max, (num / den.max(f64::MIN_POSITIVE)).sqrt())
}

fn to_f64(x: &[bf16]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// The relative L2 error of a GPU result against the CPU path's result.
fn gpu_vs_cpu(gpu: &[bf16], cpu: &[bf16]) -> f64 {
    errors(&to_f64(gpu), &to_f64(cpu)).1
}

/// `batch` sequences of `sq` query and `sk` key tokens, `hq` / `hkv` heads of `d` channels.
fn fixed_shape(
    b: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
) -> AttentionShape<'static> {
    AttentionShape {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        seqlens: SeqLens::Fixed {
            seqlen_q: sq,
            seqlen_k: sk,
        },
    }
}

fn dense_case(
    device: &Device,
    (b, sq, sk, hq, hkv, d): (usize, usize, usize, usize, usize, usize),
    opts: AttentionOptions,
    label: &str,
) -> Result<Row> {
    let shape = fixed_shape(b, sq, sk, hq, hkv, d);
    let attn = FlashAttention::new(&shape, &opts)?;
    let qs = Strides::contiguous(sq, hq, d);
    let ks = Strides::contiguous(sk, hkv, d);
    let q = random(b * sq * hq * d, 1);
    let k = random(b * sk * hkv * d, 2);
    let v = random(b * sk * hkv * d, 3);
    let (want, _) = dense_attention_f64(
        &attn,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
    )?;
    let (out, ms) = match device {
        Device::Cpu => {
            let mut out = vec![bf16::from_f32(f32::NAN); attn.out_len()];
            let t = Instant::now();
            attn.forward_cpu(
                Strided::new(&q[..], qs),
                Strided::new(&k[..], ks),
                Strided::new(&v[..], ks),
                Strided::new(&mut out[..], qs),
                None,
            )?;
            (out, t.elapsed().as_secs_f64() * 1e3)
        }
        Device::Cuda(ctx) => {
            let stream = ctx.default_stream();
            let (dq, dk, dv) = (
                stream.clone_htod(&q)?,
                stream.clone_htod(&k)?,
                stream.clone_htod(&v)?,
            );
            let mut dout = stream.clone_htod(&vec![bf16::from_f32(f32::NAN); attn.out_len()])?;
            let run = |dout: &mut longattn::cudarc::driver::CudaSlice<bf16>| {
                attn.forward_gpu(
                    &stream,
                    Strided::new(&dq, qs),
                    Strided::new(&dk, ks),
                    Strided::new(&dv, ks),
                    Strided::new(dout, qs),
                    None,
                )
            };
            run(&mut dout)?;
            let out = stream.clone_dtoh(&dout)?;
            let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            let reps = 10;
            for _ in 0..reps {
                run(&mut dout)?;
            }
            let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            end.synchronize()?;
            (out, start.elapsed_ms(&end)? as f64 / reps as f64)
        }
    };
    let got: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
    let (max_err, rel_err) = errors(&got, &want);
    Ok(Row {
        family: "dense",
        dtype: "bf16",
        shape: format!("b{b} sq{sq} sk{sk} h{hq}/{hkv} d{d}"),
        options: label.to_string(),
        device: where_run(device),
        max_err,
        rel_err,
        vs_cpu: None,
        ms,
    })
}

/// Dense FP8 (e4m3 q/k/v with FlashAttention-3 descales, bf16 out): the CPU path against
/// the f64 reference of the same quantisation (docs/semantics.md, "FP8 dense forward"); on a
/// Hopper GPU the opt-in FP8 kernel too, checked against the CPU path (elsewhere the CPU
/// row alone: the kernel is Hopper-only).
fn dense_fp8_case(device: &Device) -> Result<Row> {
    use longattn::reference::{Fp8PRule, dense_fp8_attention_f64};
    let (b, sq, sk, hq, hkv, d) = (1usize, 384usize, 640usize, 8usize, 2usize, 128usize);
    let shape = fixed_shape(b, sq, sk, hq, hkv, d);
    let attn = FlashAttention::new(&shape, &AttentionOptions::causal())?;
    let (qs, ks) = (
        Strides::contiguous(sq, hq, d),
        Strides::contiguous(sk, hkv, d),
    );
    // Codes of values in [-8, 8) (q, k) and [-1, 1) (v): the bf16 randoms scaled, rounded.
    let codes = |n, seed, amp: f32| -> Vec<F8E4M3> {
        random(n, seed)
            .iter()
            .map(|x| F8E4M3::from_f32(x.to_f32() * amp))
            .collect()
    };
    let (q, k, v) = (
        codes(b * sq * hq * d, 61, 8.0),
        codes(b * sk * hkv * d, 62, 8.0),
        codes(b * sk * hkv * d, 63, 1.0),
    );
    let n = b * hkv;
    let descales = [vec![0.25f32; n], vec![0.2f32; n], vec![1.5f32; n]];
    let host = |i: usize| &descales[i][..];
    let host_descales = || Fp8Descales {
        q: host(0),
        k: host(1),
        v: host(2),
    };
    let mut cpu_out = vec![bf16::NAN; attn.out_len()];
    let t = Instant::now();
    attn.forward_cpu_fp8(
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
        host_descales(),
        Strided::new(&mut cpu_out[..], qs),
        None,
    )?;
    let mut ms = t.elapsed().as_secs_f64() * 1e3;
    let mut ran = where_run(&Device::Cpu);
    let (out, vs_cpu) = match device {
        Device::Cuda(ctx) => {
            let st = ctx.default_stream();
            let t = Instant::now();
            let (dq, dk, dv) = (st.clone_htod(&q)?, st.clone_htod(&k)?, st.clone_htod(&v)?);
            let [qd, kd, vd] = [
                st.clone_htod(&descales[0])?,
                st.clone_htod(&descales[1])?,
                st.clone_htod(&descales[2])?,
            ];
            let mut dout = st.clone_htod(&vec![bf16::NAN; cpu_out.len()])?;
            match attn.forward_gpu_fp8(
                &st,
                Strided::new(&dq, qs),
                Strided::new(&dk, ks),
                Strided::new(&dv, ks),
                Fp8Descales {
                    q: &qd,
                    k: &kd,
                    v: &vd,
                },
                Strided::new(&mut dout, qs),
                None,
            ) {
                Ok(()) => {
                    let out = st.clone_dtoh(&dout)?;
                    ms = t.elapsed().as_secs_f64() * 1e3;
                    ran = where_run(device);
                    let vs = gpu_vs_cpu(&out, &cpu_out);
                    (out, Some(vs))
                }
                // Not a Hopper card: the CPU row stands.
                Err(Error::Unsupported(_)) => (cpu_out, None),
                Err(e) => return Err(e),
            }
        }
        Device::Cpu => (cpu_out, None),
    };
    let (want, _) = dense_fp8_attention_f64(
        &attn,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
        host_descales(),
        Fp8PRule::TileRunningMax,
    )?;
    let (max_err, rel_err) = errors(&to_f64(&out), &want);
    Ok(Row {
        family: "dense",
        dtype: "e4m3/bf16",
        shape: format!("b{b} sq{sq} sk{sk} h{hq}/{hkv} d{d}"),
        options: "FP8 e4m3 q/k/v, causal, GQA 4:1".into(),
        device: ran,
        max_err,
        rel_err,
        vs_cpu,
        ms,
    })
}

fn merge_case(device: &Device) -> Result<Row> {
    // Split the keys of one problem in two, attend to each half, merge, compare with the
    // unsplit f64 reference.
    let (b, sq, sk, h, d) = (2, 64, 256, 4, 64);
    let full = |seqlen_k| AttentionShape {
        batch: b,
        heads_q: h,
        heads_kv: h,
        head_dim: d,
        seqlens: SeqLens::Fixed {
            seqlen_q: sq,
            seqlen_k,
        },
    };
    let opts = AttentionOptions::default();
    let q: Vec<f32> = random(b * sq * h * d, 4)
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let k: Vec<f32> = random(b * sk * h * d, 5)
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let v: Vec<f32> = random(b * sk * h * d, 6)
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let qs = Strides::contiguous(sq, h, d);
    let ks = Strides::contiguous(sk, h, d);
    let whole = FlashAttention::new(&full(sk), &opts)?;
    let (want, _) = dense_attention_f64(
        &whole,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
    )?;
    let half = FlashAttention::new(&full(sk / 2), &opts)?;
    let hs = Strides {
        batch: ks.batch,
        ..Strides::contiguous(sk / 2, h, d)
    };
    let shape = MergeShape {
        batch: b,
        seqlen: sq,
        heads: h,
        head_dim: d,
    };
    let mut parts = Vec::new();
    for off in [0, sk / 2 * h * d] {
        let mut o = vec![0.0f32; half.out_len()];
        let mut l = vec![0.0f32; half.lse_len()];
        half.forward_cpu(
            Strided::new(&q[..], qs),
            Strided::new(&k[off..], hs),
            Strided::new(&v[off..], hs),
            Strided::new(&mut o[..], qs),
            Some(&mut l),
        )?;
        parts.push((o, l));
    }
    let mut out = vec![f32::NAN; shape.o_len()];
    let mut lse = vec![f32::NAN; shape.lse_len()];
    let t = Instant::now();
    match device {
        Device::Cpu => shape.merge_cpu(
            Partial {
                o: &parts[0].0[..],
                lse: &parts[0].1[..],
            },
            Partial {
                o: &parts[1].0[..],
                lse: &parts[1].1[..],
            },
            Partial {
                o: &mut out[..],
                lse: &mut lse[..],
            },
        )?,
        Device::Cuda(ctx) => {
            let s = ctx.default_stream();
            let (ao, al) = (s.clone_htod(&parts[0].0)?, s.clone_htod(&parts[0].1)?);
            let (bo, bl) = (s.clone_htod(&parts[1].0)?, s.clone_htod(&parts[1].1)?);
            let mut oo = s.clone_htod(&out)?;
            let mut ol = s.clone_htod(&lse)?;
            shape.merge_gpu(
                &s,
                Partial { o: &ao, lse: &al },
                Partial { o: &bo, lse: &bl },
                Partial {
                    o: &mut oo,
                    lse: &mut ol,
                },
            )?;
            out = s.clone_dtoh(&oo)?;
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let got: Vec<f64> = out.iter().map(|&x| x as f64).collect();
    let (max_err, rel_err) = errors(&got, &want);
    Ok(Row {
        family: "merge",
        dtype: "f32",
        shape: format!("b{b} s{sq} h{h} d{d}, keys split {}+{}", sk / 2, sk / 2),
        options: "split-KV merge (f32)".into(),
        device: where_run(device),
        max_err,
        rel_err,
        vs_cpu: None,
        ms,
    })
}

/// K, V, kmin and kmax of `cache` (element type `C`) on the device, filled by the GPU append
/// kernel from the host tokens `new = (k, v): [total, heads_kv, head_dim]`.
fn device_cache<C: Element + DeviceRepr + ValidAsZeroBits>(
    s: &Arc<CudaStream>,
    cache: &PagedCache,
    cu_new: &[i32],
    (k_new, v_new): (&[bf16], &[bf16]),
    kv_strides: Strides,
) -> Result<[CudaSlice<C>; 4]> {
    let layout = cache.layout();
    let mut k = s.alloc_zeros::<C>(layout.cache_len())?;
    let mut v = s.alloc_zeros::<C>(layout.cache_len())?;
    let mut kmin = s.alloc_zeros::<C>(layout.meta_len())?;
    let mut kmax = s.alloc_zeros::<C>(layout.meta_len())?;
    let (kn, vn) = (s.clone_htod(k_new)?, s.clone_htod(v_new)?);
    cache.append_gpu(
        s,
        cu_new,
        Strided::new(&kn, kv_strides),
        Strided::new(&vn, kv_strides),
        KvPages {
            k: &mut k,
            v: &mut v,
        },
        Some(PageMeta {
            kmin: &mut kmin,
            kmax: &mut kmax,
        }),
    )?;
    Ok([k, v, kmin, kmax])
}

/// Paged decode over a cache filled by the append kernel (pages scattered by a
/// permutation): a full decode checked against dense attention over the same tokens laid out
/// contiguously, and a mixed-policy decode (kv head 0 streaming, kv head 1 Quest top-B)
/// checked against the f64 paged reference restricted to the CPU's Quest selection.
fn paged_cases(device: &Device) -> Result<Vec<Row>> {
    use longattn::reference::paged::{decode_visible, paged_decode_f64};
    let (page_size, hkv, hq, d) = (16usize, 2usize, 8usize, 64usize);
    let lens = [1500usize, 333];
    let layout = PagedLayout {
        num_pages: 128,
        page_size,
        heads_kv: hkv,
        head_dim: d,
    };
    let max_pages = lens
        .iter()
        .map(|l| l.div_ceil(page_size))
        .max()
        .unwrap_or(0);
    // Page ids handed out in a scrambled order (17 is coprime with 128).
    let mut next = 0usize;
    let mut block_table = vec![-1i32; lens.len() * max_pages];
    for (b, len) in lens.iter().enumerate() {
        for lp in 0..len.div_ceil(page_size) {
            block_table[b * max_pages + lp] = ((next * 17) % layout.num_pages) as i32;
            next += 1;
        }
    }
    let seqlens: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let cache = PagedCache::new(
        layout,
        PageTable {
            block_table: &block_table,
            max_pages_per_seq: max_pages,
            seqlens_k: &seqlens,
        },
    )?;
    let total: usize = lens.iter().sum();
    let cu_new = [0, lens[0] as i32, total as i32];
    let kv_strides = Strides {
        batch: 0,
        seq: (hkv * d) as i64,
        head: d as i64,
    };
    let k_new = random(total * hkv * d, 7);
    let v_new = random(total * hkv * d, 8);
    let q = random(lens.len() * hq * d, 9);
    let q_strides = Strides::contiguous(1, hq, d);
    // Host cache and metadata: the reference's input (and the CPU path's).
    let mut k_cache = vec![bf16::ZERO; layout.cache_len()];
    let mut v_cache = vec![bf16::ZERO; layout.cache_len()];
    let mut kmin = vec![bf16::ZERO; layout.meta_len()];
    let mut kmax = vec![bf16::ZERO; layout.meta_len()];
    cache.append_cpu(
        &cu_new,
        Strided::new(&k_new[..], kv_strides),
        Strided::new(&v_new[..], kv_strides),
        KvPages {
            k: &mut k_cache[..],
            v: &mut v_cache[..],
        },
        Some(PageMeta {
            kmin: &mut kmin[..],
            kmax: &mut kmax[..],
        }),
    )?;

    let full = PagedDecode::new(&cache, hq, 1, &AttentionOptions::causal())?;
    let policy = SparsePolicy {
        heads: vec![HeadPolicy::Streaming, HeadPolicy::Quest],
        streaming: StreamingConfig {
            sinks: 4,
            window: 256,
        },
        quest: QuestConfig {
            token_budget: 256,
            sink_pages: 1,
        },
    };
    let mixed = full.clone().with_policy(policy)?;

    // Oracles.
    let dense = FlashAttention::new(
        &AttentionShape {
            batch: lens.len(),
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Varlen {
                cu_seqlens_q: &[0, 1, 2],
                cu_seqlens_k: &cu_new,
            },
        },
        &AttentionOptions::causal(),
    )?;
    let packed_q = Strides {
        batch: 0,
        ..q_strides
    };
    let (want_full, _) = dense_attention_f64(
        &dense,
        Strided::new(&q[..], packed_q),
        Strided::new(&k_new[..], kv_strides),
        Strided::new(&v_new[..], kv_strides),
    )?;
    let selection = mixed.select_cpu(
        Strided::new(&q[..], q_strides),
        PageMeta {
            kmin: &kmin[..],
            kmax: &kmax[..],
        },
    )?;
    let (want_mixed, _) = paged_decode_f64(
        &mixed,
        Strided::new(&q[..], q_strides),
        KvPages {
            k: &k_cache[..],
            v: &v_cache[..],
        },
        decode_visible(&mixed, Some(&selection.pages)),
    )?;

    let mut rows = Vec::new();
    for (decode, want, label) in [
        (&full, &want_full, "full decode, causal"),
        (&mixed, &want_mixed, "streaming + Quest 256 tok"),
    ] {
        let t = Instant::now();
        let out = match device {
            Device::Cpu => {
                let mut out = vec![bf16::from_f32(f32::NAN); decode.out_len()];
                decode.forward_cpu(
                    Strided::new(&q[..], q_strides),
                    KvPages {
                        k: &k_cache[..],
                        v: &v_cache[..],
                    },
                    Some(PageMeta {
                        kmin: &kmin[..],
                        kmax: &kmax[..],
                    }),
                    Strided::new(&mut out[..], q_strides),
                    None,
                )?;
                out
            }
            Device::Cuda(ctx) => {
                let s = ctx.default_stream();
                // The device cache is filled by the GPU append kernel.
                let [dk, dv, dmin, dmax] =
                    device_cache::<bf16>(&s, &cache, &cu_new, (&k_new, &v_new), kv_strides)?;
                let dq = s.clone_htod(&q)?;
                let mut dout = s.clone_htod(&vec![bf16::from_f32(f32::NAN); decode.out_len()])?;
                decode.forward_gpu(
                    &s,
                    Strided::new(&dq, q_strides),
                    KvPages { k: &dk, v: &dv },
                    Some(PageMeta {
                        kmin: &dmin,
                        kmax: &dmax,
                    }),
                    Strided::new(&mut dout, q_strides),
                    None,
                )?;
                s.clone_dtoh(&dout)?
            }
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let got: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
        let (max_err, rel_err) = errors(&got, want);
        rows.push(Row {
            family: "paged",
            dtype: "bf16",
            shape: format!("b2 sk{lens:?} h{hq}/{hkv} d{d} page{page_size}"),
            options: label.to_string(),
            device: where_run(device),
            max_err,
            rel_err,
            vs_cpu: None,
            ms,
        });
    }

    // The same tokens appended into an FP8 e4m3 cache (per-kv-head scales: the largest |x|
    // of the source, < 1, maps to 448): a full decode checked against the f64 reference of
    // the dequantised cache; on a GPU the FP8 append and decode kernels (not yet verified on
    // a GPU), checked against the CPU path too.
    let fp8_cache =
        cache
            .clone()
            .with_kv_scales(KvScales::uniform(hkv, 1.0 / 448.0, 1.0 / 448.0)?)?;
    let mut k8 = vec![F8E4M3::default(); layout.cache_len()];
    let mut v8 = vec![F8E4M3::default(); layout.cache_len()];
    fp8_cache.append_cpu(
        &cu_new,
        Strided::new(&k_new[..], kv_strides),
        Strided::new(&v_new[..], kv_strides),
        KvPages {
            k: &mut k8[..],
            v: &mut v8[..],
        },
        None,
    )?;
    let fp8_full = PagedDecode::new(&fp8_cache, hq, 1, &AttentionOptions::causal())?;
    let (want_fp8, _) = paged_decode_f64(
        &fp8_full,
        Strided::new(&q[..], q_strides),
        KvPages {
            k: &k8[..],
            v: &v8[..],
        },
        decode_visible(&fp8_full, None),
    )?;
    let t = Instant::now();
    let mut cpu_out = vec![bf16::NAN; fp8_full.out_len()];
    fp8_full.forward_cpu(
        Strided::new(&q[..], q_strides),
        KvPages {
            k: &k8[..],
            v: &v8[..],
        },
        None,
        Strided::new(&mut cpu_out[..], q_strides),
        None,
    )?;
    let mut ms = t.elapsed().as_secs_f64() * 1e3;
    let (out, vs_cpu) = match device {
        Device::Cpu => (cpu_out, None),
        Device::Cuda(ctx) => {
            let s = ctx.default_stream();
            let t = Instant::now();
            let [dk, dv, ..] =
                device_cache::<F8E4M3>(&s, &fp8_cache, &cu_new, (&k_new, &v_new), kv_strides)?;
            let dq = s.clone_htod(&q)?;
            let mut dout = s.clone_htod(&vec![bf16::NAN; fp8_full.out_len()])?;
            fp8_full.forward_gpu(
                &s,
                Strided::new(&dq, q_strides),
                KvPages { k: &dk, v: &dv },
                None,
                Strided::new(&mut dout, q_strides),
                None,
            )?;
            let out = s.clone_dtoh(&dout)?;
            ms = t.elapsed().as_secs_f64() * 1e3;
            let vs = gpu_vs_cpu(&out, &cpu_out);
            (out, Some(vs))
        }
    };
    let (max_err, rel_err) = errors(&to_f64(&out), &want_fp8);
    rows.push(Row {
        family: "paged",
        dtype: "bf16/e4m3",
        shape: format!("b2 sk{lens:?} h{hq}/{hkv} d{d} page{page_size}"),
        options: "full decode, FP8 e4m3 cache".into(),
        device: where_run(device),
        max_err,
        rel_err,
        vs_cpu,
        ms,
    });

    // Paged prefill (chunked prefill over the cache): the last 64 appended tokens of each
    // sequence as queries, causal bottom-right; on a GPU the opt-in prefill kernel, checked
    // against the CPU path too.
    let q_len = 64;
    let prefill = PagedPrefill::new(&cache, hq, q_len, &AttentionOptions::causal())?;
    let pq = random(lens.len() * q_len * hq * d, 10);
    let pq_strides = Strides::contiguous(q_len, hq, d);
    let kv = || KvPages {
        k: &k_cache[..],
        v: &v_cache[..],
    };
    let mut cpu_out = vec![bf16::NAN; prefill.out_len()];
    let t = Instant::now();
    prefill.forward_cpu(
        Strided::new(&pq[..], pq_strides),
        kv(),
        Strided::new(&mut cpu_out[..], pq_strides),
        None,
    )?;
    let mut ms = t.elapsed().as_secs_f64() * 1e3;
    let (out, vs_cpu) = match device {
        Device::Cpu => (cpu_out, None),
        Device::Cuda(ctx) => {
            let s = ctx.default_stream();
            let t = Instant::now();
            let dq = s.clone_htod(&pq)?;
            let (dk, dv) = (s.clone_htod(&k_cache)?, s.clone_htod(&v_cache)?);
            let mut dout = s.clone_htod(&vec![bf16::NAN; prefill.out_len()])?;
            prefill.forward_gpu(
                &s,
                Strided::new(&dq, pq_strides),
                KvPages { k: &dk, v: &dv },
                Strided::new(&mut dout, pq_strides),
                None,
            )?;
            let out = s.clone_dtoh(&dout)?;
            ms = t.elapsed().as_secs_f64() * 1e3;
            let vs = gpu_vs_cpu(&out, &cpu_out);
            (out, Some(vs))
        }
    };
    let (want, _) = longattn::reference::paged::paged_prefill_f64(
        &prefill,
        Strided::new(&pq[..], pq_strides),
        kv(),
    )?;
    let (max_err, rel_err) = errors(&to_f64(&out), &want);
    rows.push(Row {
        family: "paged",
        dtype: "bf16",
        shape: format!("b2 sk{lens:?} q{q_len} h{hq}/{hkv} d{d} page{page_size}"),
        options: "prefill, causal".into(),
        device: where_run(device),
        max_err,
        rel_err,
        vs_cpu,
        ms,
    });
    Ok(rows)
}

/// Block-sparse prefill with a BigBird mask (window + global + random blocks) intersected
/// with causal: on a GPU the opt-in tensor-core kernel, checked against the CPU path too.
fn block_sparse_case(device: &Device) -> Result<Row> {
    use longattn::block_sparse::patterns::{self, PatternShape};
    let (b, s, hq, hkv, d, block) = (1, 1024, 4, 2, 64, 128);
    let opts = AttentionOptions::causal();
    let shape = fixed_shape(b, s, s, hq, hkv, d);
    let mask = patterns::bigbird(
        &PatternShape {
            heads: hq,
            seqlen_q: s,
            seqlen_k: s,
            block,
            mask: opts.effective_mask(),
        },
        1,
        1,
        2,
        7,
    )
    .map_err(Error::from)?;
    let density = mask.density();
    let bs = BlockSparseAttention::new(FlashAttention::new(&shape, &opts)?, mask)
        .map_err(Error::from)?;
    let (qs, ks) = (
        Strides::contiguous(s, hq, d),
        Strides::contiguous(s, hkv, d),
    );
    let (q, k, v) = (
        random(b * s * hq * d, 51),
        random(b * s * hkv * d, 52),
        random(b * s * hkv * d, 53),
    );
    let mut cpu_out = vec![bf16::NAN; b * s * hq * d];
    let t = Instant::now();
    bs.forward_cpu(
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
        Strided::new(&mut cpu_out[..], qs),
        None,
    )?;
    let mut ms = t.elapsed().as_secs_f64() * 1e3;
    let (out, vs_cpu) = match device {
        Device::Cpu => (cpu_out, None),
        Device::Cuda(ctx) => {
            let st = ctx.default_stream();
            let t = Instant::now();
            let (dq, dk, dv) = (st.clone_htod(&q)?, st.clone_htod(&k)?, st.clone_htod(&v)?);
            let mut dout = st.clone_htod(&vec![bf16::NAN; cpu_out.len()])?;
            bs.forward_gpu(
                &st,
                Strided::new(&dq, qs),
                Strided::new(&dk, ks),
                Strided::new(&dv, ks),
                Strided::new(&mut dout, qs),
                None,
            )?;
            let out = st.clone_dtoh(&dout)?;
            ms = t.elapsed().as_secs_f64() * 1e3;
            let vs = gpu_vs_cpu(&out, &cpu_out);
            (out, Some(vs))
        }
    };
    let (want, _) = longattn::reference::block_sparse_attention_f64(
        &bs,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
    )?;
    let (max_err, rel_err) = errors(&to_f64(&out), &want);
    Ok(Row {
        family: "blocksparse",
        dtype: "bf16",
        shape: format!("b{b} s{s} h{hq}/{hkv} d{d} block{block}"),
        options: format!("BigBird w1 g1 r2 + causal, density {:.0}%", density * 100.0),
        device: where_run(device),
        max_err,
        rel_err,
        vs_cpu,
        ms,
    })
}

/// Ring attention of a sequence sharded over 4 ranks, every rank's rows checked against the
/// f64 reference of single-device attention over the whole sequence: the CPU path over
/// simulated ranks, and on a GPU the opt-in in-process ring (every rank on that GPU),
/// checked against the CPU path too.
fn ring_case(
    device: &Device,
    sharding: Sharding,
    opts: AttentionOptions,
    label: &str,
) -> Result<Row> {
    let (b, s, hq, hkv, d, world) = (1, 1024, 8, 2, 64, 4);
    let (q, k, v) = (
        random(b * s * hq * d, 31),
        random(b * s * hkv * d, 32),
        random(b * s * hkv * d, 33),
    );
    let dense = FlashAttention::new(&fixed_shape(b, s, s, hq, hkv, d), &opts)?;
    let (qs, ks) = (
        Strides::contiguous(s, hq, d),
        Strides::contiguous(s, hkv, d),
    );
    let (want, _) = dense_attention_f64(
        &dense,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
    )?;
    let layout = RingLayout::new(s, world, sharding)?;
    let shape = RingShape {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
    };
    let ring = RingAttention::new(layout, shape, &opts)?;
    let pos: Vec<Vec<usize>> = (0..world).map(|r| layout.positions(r)).collect();
    let qsh = layout.shard(&q, b, hq * d)?;
    let ksh = layout.shard(&k, b, hkv * d)?;
    let vsh = layout.shard(&v, b, hkv * d)?;
    let mut osh: Vec<Vec<bf16>> = (0..world)
        .map(|r| vec![bf16::NAN; ring.out_len(r)])
        .collect();
    let st = |r: usize, h: usize| Strides::contiguous(pos[r].len(), h, d);
    let t = Instant::now();
    ring.forward_cpu(
        &(0..world)
            .map(|r| Strided::new(&qsh[r][..], st(r, hq)))
            .collect::<Vec<_>>(),
        &(0..world)
            .map(|r| Strided::new(&ksh[r][..], st(r, hkv)))
            .collect::<Vec<_>>(),
        &(0..world)
            .map(|r| Strided::new(&vsh[r][..], st(r, hkv)))
            .collect::<Vec<_>>(),
        &mut osh
            .iter_mut()
            .enumerate()
            .map(|(r, o)| Strided::new(&mut o[..], st(r, hq)))
            .collect::<Vec<_>>(),
        None,
    )?;
    let mut ms = t.elapsed().as_secs_f64() * 1e3;
    let cpu_out = layout.unshard(&osh, b, hq * d)?;
    let (out, vs_cpu, how) = match device {
        Device::Cpu => (cpu_out, None, "simulated ranks"),
        Device::Cuda(ctx) => {
            let stream = ctx.default_stream();
            let t = Instant::now();
            let up = |x: &Vec<Vec<bf16>>| -> Result<Vec<_>> {
                Ok(x.iter()
                    .map(|sh| stream.clone_htod(sh))
                    .collect::<std::result::Result<Vec<_>, _>>()?)
            };
            let (dq, dk, dv) = (up(&qsh)?, up(&ksh)?, up(&vsh)?);
            let mut dout = (0..world)
                .map(|r| stream.clone_htod(&vec![bf16::NAN; ring.out_len(r)]))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            {
                let mut ranks: Vec<longattn::ring::RankBuffers<'_, bf16>> = dout
                    .iter_mut()
                    .enumerate()
                    .map(|(r, o)| longattn::ring::RankBuffers {
                        q: Strided::new(&dq[r], st(r, hq)),
                        k: &dk[r],
                        v: &dv[r],
                        out: Strided::new(o, st(r, hq)),
                        lse: None,
                    })
                    .collect();
                ring.forward_gpu_in_process(&stream, &mut ranks)?;
            }
            let outs = dout
                .iter()
                .map(|o| stream.clone_dtoh(o))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            ms = t.elapsed().as_secs_f64() * 1e3;
            let out = layout.unshard(&outs, b, hq * d)?;
            let vs = gpu_vs_cpu(&out, &cpu_out);
            (out, Some(vs), "in-process GPU ring")
        }
    };
    let (max_err, rel_err) = errors(&to_f64(&out), &want);
    let sch = ring.schedule();
    let computed = sch.compute.iter().flatten().filter(|&&c| c).count();
    let sent = sch.send.iter().flatten().filter(|&&c| c).count();
    Ok(Row {
        family: "ring",
        dtype: "bf16",
        shape: format!(
            "s{s} h{hq}/{hkv} d{d} {world} ranks {sharding:?} imb {:.2}",
            sch.imbalance()
        ),
        options: format!(
            "{label}; {computed}/{} steps {sent}/{} sends; {how}",
            world * world,
            world * (world - 1)
        ),
        device: where_run(device),
        max_err,
        rel_err,
        vs_cpu,
        ms,
    })
}

/// Neighborhood attention on a 2-D or 3-D grid, checked against the f64 reference
/// (`reference::neighborhood_attention_f64`): the CPU path, and on a GPU both opt-in kernels
/// (the portable one and the fused tensor-core one, one row each), checked against the CPU
/// path too.
fn neighborhood_cases(device: &Device, dims: &[NeighborhoodDim], label: &str) -> Result<Vec<Row>> {
    let (b, hq, hkv, d) = (1, 4, 2, 64);
    let na = NeighborhoodAttention::new(
        &NeighborhoodShape {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            dims,
        },
        &AttentionOptions::default(),
    )?;
    let n = na.tokens();
    let (q, k, v) = (
        random(n * hq * d, 41),
        random(n * hkv * d, 42),
        random(n * hkv * d, 43),
    );
    let mut cpu_out = vec![bf16::NAN; na.out_len()];
    let (qs, ks) = (
        Strides::contiguous(n, hq, d),
        Strides::contiguous(n, hkv, d),
    );
    let t = Instant::now();
    na.forward_cpu(
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
        Strided::new(&mut cpu_out[..], qs),
        None,
    )?;
    let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
    let (want, _) = neighborhood_attention_f64(
        &na,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
    )?;
    let grid: Vec<String> = dims.iter().map(|x| x.length.to_string()).collect();
    let row = |out: &[bf16], options: String, vs_cpu: Option<f64>, ms: f64| {
        let (max_err, rel_err) = errors(&to_f64(out), &want);
        Row {
            family: "natten",
            dtype: "bf16",
            shape: format!("b{b} grid {} h{hq}/{hkv} d{d}", grid.join("x")),
            options,
            device: where_run(device),
            max_err,
            rel_err,
            vs_cpu,
            ms,
        }
    };
    let Device::Cuda(ctx) = device else {
        return Ok(vec![row(&cpu_out, label.into(), None, cpu_ms)]);
    };
    let st = ctx.default_stream();
    let mut rows = Vec::new();
    for (fused, kernel) in [(false, "portable kernel"), (true, "fused mma kernel")] {
        let t = Instant::now();
        let (dq, dk, dv) = (st.clone_htod(&q)?, st.clone_htod(&k)?, st.clone_htod(&v)?);
        let mut dout = st.clone_htod(&vec![bf16::NAN; na.out_len()])?;
        let (gq, gk, gv) = (
            Strided::new(&dq, qs),
            Strided::new(&dk, ks),
            Strided::new(&dv, ks),
        );
        let gout = Strided::new(&mut dout, qs);
        if fused {
            na.forward_gpu_fused(&st, gq, gk, gv, gout, None)?;
        } else {
            na.forward_gpu_portable(&st, gq, gk, gv, gout, None)?;
        }
        let out = st.clone_dtoh(&dout)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let vs = gpu_vs_cpu(&out, &cpu_out);
        rows.push(row(&out, format!("{label}; {kernel}"), Some(vs), ms));
    }
    Ok(rows)
}

fn main() -> Result<()> {
    let device = Device::best()?;
    match &device {
        Device::Cuda(_) => println!("longattn tour: GPU {}", device.describe()),
        Device::Cpu if !longattn::device::cuda_compiled() => println!(
            "longattn tour: CPU only, {} (built without nvcc: no GPU kernels compiled in)",
            device.describe()
        ),
        Device::Cpu => println!(
            "longattn tour: CPU, {} (no usable GPU found: the GPU kernels did not run)",
            device.describe()
        ),
    }
    let causal = AttentionOptions::causal();
    let cases: Vec<(_, AttentionOptions, &str)> = vec![
        ((1, 512, 512, 4, 4, 64), AttentionOptions::default(), "full"),
        ((1, 512, 512, 8, 2, 128), causal, "causal, GQA 4:1"),
        ((2, 300, 700, 4, 4, 64), causal, "causal sq!=sk"),
        (
            (1, 1024, 1024, 4, 4, 64),
            AttentionOptions::default()
                .with_window(Window::causal_tokens(128).unwrap())
                .with_sinks(4),
            "window 128 + 4 sinks",
        ),
        (
            (1, 256, 256, 2, 1, 256),
            causal.with_softcap(30.0),
            "causal softcap 30, MQA",
        ),
        (
            (1, 64, 64, 4, 4, 96),
            AttentionOptions::default().with_window(Window::new(Some(8), Some(8))),
            "window (8, 8)",
        ),
    ];
    let mut rows = Vec::new();
    for (dims, opts, label) in cases {
        rows.push(dense_case(&device, dims, opts, label)?);
    }
    rows.push(dense_fp8_case(&device)?);
    rows.push(merge_case(&device)?);
    rows.extend(paged_cases(&device)?);
    rows.push(block_sparse_case(&device)?);
    rows.push(ring_case(&device, Sharding::Zigzag, causal, "causal")?);
    rows.push(ring_case(
        &device,
        Sharding::Contiguous,
        AttentionOptions::default()
            .with_window(Window::causal_tokens(200).unwrap())
            .with_sinks(4),
        "W200+4 sinks",
    )?);
    rows.extend(neighborhood_cases(
        &device,
        &[
            NeighborhoodDim::new(32, 7),
            NeighborhoodDim::new(24, 5).with_dilation(2),
        ],
        "k 7x5, dilation 1x2",
    )?);
    rows.extend(neighborhood_cases(
        &device,
        &[
            NeighborhoodDim::new(8, 3).with_causal(true),
            NeighborhoodDim::new(12, 5),
            NeighborhoodDim::new(10, 4).with_stride(2),
        ],
        "3-D k 3x5x4, causal x, stride z 2",
    )?);
    println!();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.family.to_string(),
                r.shape.clone(),
                r.options.clone(),
                r.dtype.to_string(),
                r.device.clone(),
                format!("{:.2e}", r.max_err),
                format!("{:.2e}", r.rel_err),
                r.vs_cpu.map_or("-".into(), |e| format!("{e:.2e}")),
                format!("{:.3}", r.ms),
                if passes(r) { "ok" } else { "FAIL" }.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "family",
            "shape",
            "options",
            "dtype",
            "ran on",
            "max abs err",
            "rel L2 err",
            "GPU vs CPU",
            "time ms",
            "check",
        ],
        &cells,
        &[
            false, false, false, false, false, true, true, true, true, false,
        ],
    );
    let ok = rows.iter().all(passes);

    // One line per family.
    println!();
    let mut families: Vec<&str> = Vec::new();
    for r in &rows {
        if !families.contains(&r.family) {
            families.push(r.family);
        }
    }
    let summary: Vec<Vec<String>> = families
        .iter()
        .map(|&f| {
            let of: Vec<&Row> = rows.iter().filter(|r| r.family == f).collect();
            let mut ran: Vec<&str> = of.iter().map(|r| r.device.as_str()).collect();
            ran.dedup();
            let mut dtypes: Vec<&str> = of.iter().map(|r| r.dtype).collect();
            dtypes.sort_unstable();
            dtypes.dedup();
            // NaN-aware: a NaN error is the worst.
            let worst = of
                .iter()
                .map(|r| r.rel_err)
                .fold(0.0f64, |w, e| if e.is_nan() || e > w { e } else { w });
            vec![
                f.to_string(),
                of.len().to_string(),
                dtypes.join(", "),
                ran.join("; "),
                format!("{worst:.2e}"),
                if of.iter().all(|r| passes(r)) {
                    "ok"
                } else {
                    "FAIL"
                }
                .to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "family",
            "cases",
            "dtype",
            "ran on",
            "worst rel L2 err",
            "check",
        ],
        &summary,
        &[false, true, false, false, true, false],
    );
    println!();
    println!("legend:");
    for line in [
        "  shape        b batch, sq/sk query/key tokens, s tokens, h q/kv heads, d head dim,",
        "               page = tokens per page, q = new query tokens (paged prefill), block =",
        "               block size (block-sparse), grid = the token grid (neighborhood attention)",
        "  ring         imb = load imbalance of the schedule (busiest rank's work / mean work,",
        "               1.00 = balanced); steps computed / all steps, sends needed / all sends",
        "  natten       neighborhood attention (NATTEN semantics)",
        "  bf16/e4m3    bf16 queries over an FP8 e4m3 KV cache (per-kv-head scales)",
        "  e4m3/bf16    FP8 e4m3 q/k/v (FlashAttention-3 descales), bf16 output; reference of",
        "               the same quantisation (docs/semantics.md, \"FP8 dense forward\")",
        "  max abs err  largest |result - f64 reference| over all output elements",
        "  rel L2 err   ||result - reference||_2 / ||reference||_2; check = ok when < 2e-2",
        "  GPU vs CPU   where an opt-in GPU kernel ran (block-sparse, paged prefill, FP8, ring,",
        "               natten): ||GPU result - CPU result||_2 / ||CPU result||_2, also < 2e-2",
        "  time ms      milliseconds per call: GPU dense = mean of 10 calls timed with device",
        "               events; otherwise the wall clock of one call (GPU: with uploads)",
    ] {
        println!("{line}");
    }
    if !ok {
        eprintln!(
            "tour: some result differs from the f64 reference (or a GPU result from the CPU \
             result) by more than {TOLERANCE:.0e}"
        );
        std::process::exit(1);
    }
    println!("all results match the f64 reference (rel L2 err < {TOLERANCE:.0e})");
    if rows.iter().any(|r| r.vs_cpu.is_some()) {
        println!("every GPU result matches the CPU path's (rel L2 err < {TOLERANCE:.0e})");
    }
    Ok(())
}
