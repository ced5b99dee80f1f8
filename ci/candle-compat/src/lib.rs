//! Compiles only: both crates, one cudarc. Using a type from each keeps both in the graph.
pub use candle_core::Device as CandleDevice;
pub use longattn::device::Device as LongattnDevice;
