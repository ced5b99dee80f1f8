//! Allocation bounds (issue 11, findings 2 and 5): nothing is allocated in proportion to a
//! size that validation did not bound. A counting global allocator records the largest
//! single allocation while each case runs; each test function holds `SERIAL` throughout, so
//! that no other test of this binary allocates meanwhile.

use longattn::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns the largest single allocation (bytes) it made.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    f();
    LARGEST.load(Ordering::Relaxed)
}

const MIB: usize = 1 << 20;

/// Held by each test for its whole run (see the module docs).
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn no_allocation_proportional_to_unvalidated_sizes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Finding 2: a problem of 2^26 sequences is described, not materialised (the old code
    // kept one 32-byte span per sequence: 2 GiB).
    let bytes = largest_allocation(|| {
        let shape = AttentionShape {
            batch: 1 << 26,
            heads_q: 4,
            heads_kv: 4,
            head_dim: 8,
            seqlens: SeqLens::Fixed {
                seqlen_q: 1,
                seqlen_k: 1,
            },
        };
        FlashAttention::new(&shape, &AttentionOptions::default()).unwrap();
    });
    assert!(bytes < MIB, "FlashAttention::new allocated {bytes} bytes");

    // Finding 2: 2^24 heads over empty sequences do no work and hold no per-head memory.
    let bytes = largest_allocation(|| {
        let shape = AttentionShape {
            batch: 4,
            heads_q: 1 << 24,
            heads_kv: 1,
            head_dim: 8,
            seqlens: SeqLens::Fixed {
                seqlen_q: 0,
                seqlen_k: 3,
            },
        };
        let attn = FlashAttention::new(&shape, &AttentionOptions::default()).unwrap();
        let kv = vec![0.5f32; 4 * 3 * 8];
        let (qs, ks) = (
            Strides::contiguous(0, 1 << 24, 8),
            Strides::contiguous(3, 1, 8),
        );
        let mut out: Vec<f32> = vec![];
        attn.forward_cpu(
            Strided::new(&out.clone()[..], qs),
            Strided::new(&kv[..], ks),
            Strided::new(&kv[..], ks),
            Strided::new(&mut out[..], qs),
            None,
        )
        .unwrap();
    });
    assert!(
        bytes < MIB,
        "empty-sequence forward allocated {bytes} bytes"
    );

    // Finding 5: the CPU decode's working rows follow the keys a page holds, not the page
    // size (the old code took page_size * head_dim floats per row: 32 MiB here for a
    // 3-token sequence).
    let (page_size, d) = (1usize << 20, 8usize);
    let cache = PagedCache::new(
        PagedLayout {
            num_pages: 1,
            page_size,
            heads_kv: 1,
            head_dim: d,
        },
        PageTable {
            block_table: &[0],
            max_pages_per_seq: 1,
            seqlens_k: &[3],
        },
    )
    .unwrap();
    let decode = PagedDecode::new(&cache, 1, 1, &AttentionOptions::default()).unwrap();
    let kv = vec![f16::from_f32(0.25); cache.layout().cache_len()];
    let q = vec![f16::from_f32(0.5); d];
    let mut out = vec![f16::ZERO; d];
    let qs = Strides::contiguous(1, 1, d);
    let bytes = largest_allocation(|| {
        decode
            .forward_cpu(
                Strided::new(&q[..], qs),
                KvPages {
                    k: &kv[..],
                    v: &kv[..],
                },
                None,
                Strided::new(&mut out[..], qs),
                None,
            )
            .unwrap();
    });
    assert!(bytes < MIB, "paged decode allocated {bytes} bytes");
    assert!((out[0].to_f32() - 0.25).abs() < 1e-3);
}

#[test]
fn fuzz_empty_append_allocates_nothing_per_kv_head() {
    // Found by fuzz/paged_append: a cache without pages may declare up to i32::MAX kv heads;
    // an append of no token built a table of every head's (k, v) scales first (16 GiB at
    // i32::MAX heads; 128 MiB at the 2^24 here).
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let layout = PagedLayout {
        num_pages: 0,
        page_size: 1,
        heads_kv: 1 << 24,
        head_dim: 1,
    };
    let cache = PagedCache::new(
        layout,
        PageTable {
            block_table: &[-1],
            max_pages_per_seq: 1,
            seqlens_k: &[0],
        },
    )
    .unwrap();
    let fp8 = cache
        .clone()
        .with_kv_scales(KvScales::new(vec![1.0; 1 << 24], vec![1.0; 1 << 24]).unwrap())
        .unwrap();
    let s = Strides::contiguous(0, 1 << 24, 1);
    let bytes = largest_allocation(|| {
        cache
            .append_cpu::<f32, f32>(
                &[0, 0],
                Strided::new(&[], s),
                Strided::new(&[], s),
                KvPages {
                    k: &mut [],
                    v: &mut [],
                },
                None,
            )
            .unwrap();
        fp8.append_cpu::<f32, F8E4M3>(
            &[0, 0],
            Strided::new(&[], s),
            Strided::new(&[], s),
            KvPages {
                k: &mut [],
                v: &mut [],
            },
            None,
        )
        .unwrap();
    });
    assert!(bytes < MIB, "an empty append allocated {bytes} bytes");
}

#[test]
fn capi_fuzz_decode_problem_allocates_nothing_per_kv_head() {
    // Found by tests/capi_fuzz.rs (seed 119, a 2.4 s call): a decode step over a cache
    // declaring i32::MAX kv heads (3 pages) built a per-head policy table of every head
    // (2 GiB, memset) before the call's buffers were checked; the default policy is now no
    // table at all.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let heads = i32::MAX as usize;
    let (table, seqlens) = ([0i32, 1], [3i32, 2]);
    let layout = PagedLayout {
        num_pages: 3,
        page_size: 3,
        heads_kv: heads,
        head_dim: 2,
    };
    let page_table = PageTable {
        block_table: &table,
        max_pages_per_seq: 1,
        seqlens_k: &seqlens,
    };
    let mut made = None;
    let bytes = largest_allocation(|| {
        let cache = PagedCache::new(layout, page_table).unwrap();
        made = Some(PagedDecode::new(&cache, heads, 1, &AttentionOptions::default()).unwrap());
    });
    assert!(bytes < MIB, "the decode problem allocated {bytes} bytes");
    let decode = made.unwrap();
    assert_eq!(decode.head_policy(heads - 1), Some(HeadPolicy::Full));
    assert_eq!(decode.head_policy(heads), None);
    assert!(decode.policy().is_none() && !decode.needs_meta());
    // The C door, with buffers far smaller than the descriptor: refused, nothing per head.
    let desc = longattn::capi::CPagedDesc {
        num_pages: 3,
        page_size: 3,
        heads_kv: heads,
        head_dim: 2,
        batch: 2,
        block_table: table.as_ptr(),
        max_pages_per_seq: 1,
        seqlens_k: seqlens.as_ptr(),
        heads_q: heads,
        q_len: 1,
        scale: 0.0,
        softcap: 0.0,
        window_left: 3,
        window_right: 0,
        sinks: 2,
    };
    let (q, cache) = (vec![0f32; 37], vec![0f32; 56]);
    let mut out = vec![0f32; 21];
    let strides = longattn::capi::CStrides {
        batch: 8,
        seq: 4,
        head: 2,
    };
    let bytes = largest_allocation(|| {
        // SAFETY: every buffer holds the length it claims; the descriptor's tables are alive.
        let st = unsafe {
            longattn::capi::longattn_paged_decode_cpu(
                &desc,
                2,
                longattn::capi::CTensor {
                    data: q.as_ptr().cast(),
                    len: q.len(),
                    strides,
                },
                cache.as_ptr().cast(),
                cache.as_ptr().cast(),
                cache.len(),
                longattn::capi::CTensorMut {
                    data: out.as_mut_ptr().cast(),
                    len: out.len(),
                    strides,
                },
                std::ptr::null_mut(),
                0,
            )
        };
        assert_ne!(st, longattn::capi::LONGATTN_OK);
    });
    assert!(bytes < MIB, "the refused C call allocated {bytes} bytes");
}
