//! One error type for every family. Each variant's message names the argument at fault so
//! that an engine can report it without reading the source.

/// Errors returned by every public function of the crate. Nothing in the crate panics on
/// bad input: shapes, strides, options and tables are validated before any pointer is used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A tensor's shape or buffer length does not match the problem.
    #[error("shape error: {0}")]
    Shape(String),
    /// A stride is negative, makes the last dim non-contiguous, or reaches past the buffer.
    #[error("stride error: {0}")]
    Stride(String),
    /// An option value is out of its domain (window, scale, softcap, sinks, ...).
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// `cu_seqlens_*`, block tables or page ids are malformed.
    #[error("index error: {0}")]
    Index(String),
    /// The combination is valid but no kernel implements it (dtype, head dim, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The crate was built without nvcc, so no kernel is linked in.
    #[error(
        "the CUDA kernels were not compiled (nvcc was missing at build time); \
         run scripts/install-cuda-toolkit.sh and rebuild"
    )]
    CudaNotCompiled,
    /// No usable GPU (libcuda missing or no device) where one was required.
    #[error("no GPU available: {0}")]
    NoGpu(String),
    /// A CUDA driver or runtime call failed.
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// A launcher (`la_*` C entry point) returned a CUDA error: the operation, the
    /// `cudaError_t` code and the runtime's message for it, so that a caller can tell an
    /// out-of-memory or a sticky launch failure from a bad argument without parsing text.
    #[error("CUDA error in {op}: {message} (cudaError_t {code})")]
    CudaCall {
        /// The C entry point that failed, e.g. `la_dense_forward`.
        op: String,
        /// The `cudaError_t` value it returned.
        code: i32,
        /// `cudaGetErrorString(code)`.
        message: String,
    },
}

/// Crate-wide result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Error::Cuda(e.to_string())
    }
}
