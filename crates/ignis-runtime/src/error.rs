//! Errors at the runtime's boundary.

use std::path::PathBuf;

/// Why a function could not be loaded. Every variant names the function and
/// the file, so a startup failure says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The component file could not be read.
    #[error("function `{function}`: cannot read {path}: {source}")]
    Read {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid WebAssembly component.
    #[error("function `{function}`: {path} is not a valid WebAssembly component: {reason}")]
    Invalid {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// What the compiler said.
        reason: String,
    },
    /// The component imports something Ignis does not provide.
    #[error("function `{function}`: {path} imports something Ignis does not provide: {reason}")]
    MissingImport {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// The linker's message, which names the import.
        reason: String,
    },
    /// The component does not export `wasi:http/incoming-handler`.
    #[error(
        "function `{function}`: {path} does not export the wasi:http/proxy world (`wasi:http/incoming-handler@0.2.x`): {reason}"
    )]
    WrongWorld {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// Details.
        reason: String,
    },
    /// Anything else (cache directory, engine).
    #[error("function `{function}`: {reason}")]
    Other {
        /// Function name.
        function: String,
        /// Details.
        reason: String,
    },
}

/// Why a request did not get the guest's own response. Each maps to the
/// status the edge answers with ([`GuestError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest trapped (panic, unreachable, bad memory access, ...).
    #[error("guest trapped")]
    Trap(String),
    /// The guest tried to grow memory past its limit.
    #[error("memory limit exceeded")]
    MemoryLimit,
    /// The guest used up its CPU-time budget.
    #[error("cpu time limit exceeded")]
    CpuLimit,
    /// The request ran past its wall-clock deadline.
    #[error("wall time limit exceeded")]
    WallLimit,
    /// The guest returned without sending a response.
    #[error("guest returned no response")]
    NoResponse,
    /// The guest answered with a `wasi:http` error code instead of a response.
    #[error("guest answered with an error: {0}")]
    GuestErrorCode(String),
    /// The request body was larger than the function allows.
    #[error("request body too large")]
    BodyTooLarge,
    /// The host failed (resource table, instantiation).
    #[error("internal error: {0}")]
    Internal(String),
}

impl GuestError {
    /// The HTTP status the edge answers with.
    pub fn status(&self) -> u16 {
        match self {
            GuestError::Trap(_)
            | GuestError::MemoryLimit
            | GuestError::NoResponse
            | GuestError::GuestErrorCode(_)
            | GuestError::Internal(_) => 500,
            GuestError::CpuLimit | GuestError::WallLimit => 504,
            GuestError::BodyTooLarge => 413,
        }
    }
}
