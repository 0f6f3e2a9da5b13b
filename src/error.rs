//! The one error type of the library: every failure names the input or file that caused it.

use std::path::Path;

/// Everything that can go wrong in biogate, with enough context to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure, with what we were doing at the time.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The caller's input is wrong (dimension, NaN, empty batch, bad k, bad id...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A file on disk is not what biogate wrote: bad magic, checksum, truncation.
    #[error("corrupt gallery data: {0}")]
    Corrupt(String),
    /// Another process holds the gallery's writer lock.
    #[error("gallery {0} is locked by another writer process")]
    Locked(String),
    /// A named thing (gallery, subject) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A named thing already exists where a new one was asked for.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A gallery stopped accepting writes after a storage failure (a failed fsync, or a
    /// failed write that could not be rolled back): reopen it to learn what is durable.
    #[error("gallery closed for writing: {0}")]
    Poisoned(String),
    /// A write failed in a way that leaves its outcome unknown until the gallery is reopened.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// A gallery is not available (it failed to open, or damage was found); the message
    /// says why and what to do.
    #[error("{0}")]
    Unavailable(String),
    /// An operation was cut short by a concurrent one (a gallery dropped under it).
    #[error("aborted: {0}")]
    Aborted(String),
    /// The GPU failed; the kind says what a caller can do about it.
    #[error("GPU ({}): {}", .0.kind, .0.message)]
    Gpu(GpuError),
    /// A server answered with an error status (the client side of the API).
    #[error("{}", describe_remote(code, message))]
    Remote {
        /// The gRPC status code's name ("UNAVAILABLE", "DATA_LOSS", ...).
        code: String,
        message: String,
    },
    /// A defect inside biogate (a panic caught, an impossible state): report it.
    #[error("internal error: {0}")]
    Internal(String),
    /// The configuration (a TOML file, flags, TLS material, an address) is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

/// What went wrong on a GPU, by what a caller can do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuErrorKind {
    /// No usable adapter (none found, or it lacks what is needed): use the CPU.
    NotAvailable,
    /// Out of GPU memory: the work may fit later, when less is resident; answer on the
    /// CPU now and try the GPU again later.
    OutOfMemory,
    /// The device was lost (driver reset, hung or removed GPU): open it again.
    DeviceLost,
    /// The GPU did not finish in time.
    Timeout,
    /// A validation error or impossible results: a defect; do not use the GPU for this
    /// work again.
    Internal,
}

impl std::fmt::Display for GpuErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GpuErrorKind::NotAvailable => "not available",
            GpuErrorKind::OutOfMemory => "out of memory",
            GpuErrorKind::DeviceLost => "device lost",
            GpuErrorKind::Timeout => "timeout",
            GpuErrorKind::Internal => "internal error",
        })
    }
}

/// A GPU failure: its kind and wgpu's message.
#[derive(Clone, Debug)]
pub struct GpuError {
    pub kind: GpuErrorKind,
    pub message: String,
}

impl Error {
    /// A GPU error of `kind`.
    pub fn gpu(kind: GpuErrorKind, message: impl Into<String>) -> Self {
        Error::Gpu(GpuError {
            kind,
            message: message.into(),
        })
    }

    /// The kind of a GPU error, if this is one.
    pub fn gpu_kind(&self) -> Option<GpuErrorKind> {
        match self {
            Error::Gpu(g) => Some(g.kind),
            _ => None,
        }
    }
}

/// Result with biogate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    /// Prefix an input error's message with where the input came from.
    pub fn in_context(self, place: &str) -> Self {
        match self {
            Error::InvalidInput(m) => Error::InvalidInput(format!("{place}: {m}")),
            other => other,
        }
    }

    /// Shorthand for [`Error::Corrupt`] naming the file.
    pub fn corrupt(path: &Path, msg: impl std::fmt::Display) -> Self {
        Error::Corrupt(format!("{}: {msg}", path.display()))
    }
}

/// Attach "what we were doing" to an `io::Result`.
pub trait IoContext<T> {
    /// Wrap an I/O error with a description of the operation, usually naming a path.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: what(),
            source,
        })
    }
}

/// A server's error status as a person reads it: a refusal (no or a wrong token, a
/// missing role) says so; anything else names the status.
fn describe_remote(code: &str, message: &str) -> String {
    match code {
        "UNAUTHENTICATED" => format!("the server refused: unauthenticated ({message})"),
        "PERMISSION_DENIED" => format!("the server refused: permission denied ({message})"),
        _ => format!("the server answered {code}: {message}"),
    }
}
