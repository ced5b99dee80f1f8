//! # longattn
//!
//! Hand-written CUDA attention kernels for long-context and local attention, with a CPU
//! reference of identical semantics that doubles as the fallback when no GPU is present.
//!
//! Families: dense/flash attention ([`FlashAttention`]) with causal, sliding-window
//! `(left, right)`, sinks, softcap, GQA/MQA, varlen and LSE output; the LSE merge
//! ([`MergeShape`]) that split-KV decode and ring attention build on; paged KV-cache decode
//! ([`PagedDecode`]: split-KV, Quest top-k pages, streaming/retrieval heads); ring
//! (sequence-parallel) attention over simulated ranks ([`RingAttention`]: contiguous, zigzag
//! and stripe sharding, global-position masks, skipped steps and transfers); neighborhood
//! attention in 1-D/2-D/3-D with NATTEN's semantics ([`NeighborhoodAttention`]: kernel size,
//! dilation, causal and stride per dim); block-sparse attention over CSR block lists
//! ([`BlockSparseAttention`]: FlexAttention-style full/partial blocks, MoBA selection, pattern
//! constructors; CPU path and reference, GPU kernels not built yet).
//!
//! Conventions (FlashAttention's): `q: [batch, seqlen_q, heads_q, head_dim]`,
//! `k, v: [batch, seqlen_k, heads_kv, head_dim]`, element strides with a contiguous last
//! dim; causal is bottom-right aligned; LSE is the natural log; a row with no visible key
//! gives output 0 and LSE `-inf`.
//!
//! ```
//! use longattn::*;
//!
//! // 1 sequence, 5 queries over 7 keys, 4 query heads sharing 2 kv heads (GQA), head_dim 8.
//! let (sq, sk, hq, hkv, d) = (5, 7, 4, 2, 8);
//! let shape = AttentionShape {
//!     batch: 1,
//!     heads_q: hq,
//!     heads_kv: hkv,
//!     head_dim: d,
//!     seqlens: SeqLens::Fixed { seqlen_q: sq, seqlen_k: sk },
//! };
//! // Causal sliding window of 3 tokens plus 1 attention sink.
//! let opts = AttentionOptions::default()
//!     .with_window(Window::causal_tokens(3)?)
//!     .with_sinks(1);
//! let attn = FlashAttention::new(&shape, &opts)?;
//! let q: Vec<f32> = (0..sq * hq * d).map(|i| (i as f32 * 0.37).sin()).collect();
//! let k: Vec<f32> = (0..sk * hkv * d).map(|i| (i as f32 * 0.11).cos()).collect();
//! let v: Vec<f32> = (0..sk * hkv * d).map(|i| (i as f32 * 0.23).sin()).collect();
//! let (qs, ks) = (Strides::contiguous(sq, hq, d), Strides::contiguous(sk, hkv, d));
//! let mut out = vec![0.0f32; attn.out_len()];
//! let mut lse = vec![0.0f32; attn.lse_len()]; // [batch, heads_q, seqlen_q], natural log
//! attn.forward_cpu(
//!     Strided::new(&q[..], qs),
//!     Strided::new(&k[..], ks),
//!     Strided::new(&v[..], ks),
//!     Strided::new(&mut out[..], qs),
//!     Some(&mut lse),
//! )?;
//! // The f64 reference agrees.
//! let (want, _) = reference::dense_attention_f64(
//!     &attn,
//!     Strided::new(&q[..], qs),
//!     Strided::new(&k[..], ks),
//!     Strided::new(&v[..], ks),
//! )?;
//! assert!(out.iter().zip(&want).all(|(a, b)| (*a as f64 - b).abs() < 1e-5));
//! # Ok::<(), longattn::Error>(())
//! ```
//!
//! Layers: generated FFI (`kernels/include/longattn/*.h` through bindgen) -> checked
//! launchers -> the safe API here, which validates every shape, stride and option before
//! any pointer is touched.

#![warn(missing_docs)]

pub mod block_sparse;
#[cfg(feature = "candle")]
pub mod candle;
pub mod capi;
pub mod dense;
pub mod device;
pub mod element;
pub mod error;
mod gpu;
pub mod layout;
pub mod mask;
pub mod merge;
pub mod neighborhood;
pub mod paged;
pub mod reference;
pub mod ring;
pub mod softmax;

pub use block_sparse::moba::{MobaConfig, MobaGpuPlan};
pub use block_sparse::{
    BlockKind, BlockMask, BlockMaskDims, BlockMaskError, BlockSparseAttention, BlockSparseGpuPlan,
    BlockSparseKernel, FlexParts, RowBlocks,
};
pub use cudarc;
pub use dense::{
    AttentionOptions, AttentionShape, DenseGpuPlan, DenseKernel, FP8_KEY_TILE, FP8_MAX_DESCALE,
    FlashAttention, Fp8Descales, MAX_SCALE,
};
pub use device::Device;
pub use element::{DType, Element, F8E4M3};
pub use error::{Error, Result};
pub use gpu::{DeviceBuffer, DeviceBufferMut};
pub use half::{bf16, f16};
pub use layout::{SeqLens, SeqSpan, Strided, Strides};
pub use mask::{Mask, Window};
pub use merge::{MergeShape, Partial};
pub use neighborhood::{
    NeighborhoodAttention, NeighborhoodDim, NeighborhoodGpuPlan, NeighborhoodShape, Neighbors,
};
pub use paged::{
    GpuSelection, GpuSelectionRef, HeadPolicy, KvPages, KvScales, PageLists, PageMeta, PageTable,
    PagedCache, PagedDecode, PagedDecodePlan, PagedLayout, PagedPrefill, PagedPrefillKernel,
    PagedPrefillPlan, QuestConfig, QuestKernel, QuestSelection, SparsePolicy, SplitMerge,
    StreamingConfig,
};
pub use ring::{
    GlobalBlock, KvBuffer, MAX_RING_WORLD, PlannedStep, RankPlan, RingAttention, RingLayout,
    RingPiece, RingSchedule, RingShape, Sharding, StarAttention, Transfer, TransferCount,
    block_pieces,
};
