//! Naive references in f64: the oracles every kernel and the CPU fallback are checked
//! against. They favour obviousness over speed: two passes per row, every key tested
//! against the mask, no tiling.

pub mod dense;
pub mod paged;

pub use dense::dense_attention_f64;
