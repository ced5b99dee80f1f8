//! # longattn
//!
//! Hand-written CUDA attention kernels for long-context and local attention, with a CPU
//! reference of identical semantics that doubles as the fallback when no GPU is present.
//!
//! Families: dense/flash attention ([`FlashAttention`]) with causal, sliding-window
//! `(left, right)`, sinks, softcap, GQA/MQA, varlen and LSE output; the LSE merge
//! ([`MergeShape`]) that split-KV decode and ring attention build on.
//!
//! Conventions (FlashAttention's): `q: [batch, seqlen_q, heads_q, head_dim]`,
//! `k, v: [batch, seqlen_k, heads_kv, head_dim]`, element strides with a contiguous last
//! dim; causal is bottom-right aligned; LSE is the natural log; a row with no visible key
//! gives output 0 and LSE `-inf`.
//!
//! Layers: generated FFI (`kernels/include/longattn/*.h` through bindgen) -> checked
//! launchers -> the safe API here, which validates every shape, stride and option before
//! any pointer is touched.

pub mod cuda;
pub mod dense;
pub mod device;
pub mod element;
pub mod error;
pub mod layout;
pub mod mask;
pub mod merge;
pub mod paged;
pub mod reference;
pub mod softmax;

pub use cudarc;
pub use dense::{AttentionOptions, AttentionShape, DenseKernel, FlashAttention};
pub use device::Device;
pub use element::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use layout::{SeqLens, SeqSpan, Strided, Strides};
pub use mask::{Mask, Window};
pub use merge::{MergeShape, Partial};
pub use paged::{
    HeadPolicy, KvPages, PageLists, PageMeta, PageTable, PagedCache, PagedDecode, PagedLayout,
    QuestConfig, QuestSelection, SparsePolicy, StreamingConfig,
};
