//! One error type from the guest to the response.
//!
//! Every layer below the edge (runtime, admission, durable actors) returns
//! [`Error`]: a [`ErrorKind`] saying what went wrong and whose fault it is,
//! optional context that is safe to show a client, and the source chain
//! (wasmtime's trap with its backtrace, a storage error, ...) that is only
//! ever logged. The edge is the one place that turns an `Error` into a
//! response ([`Error::status`], [`Error::retry_after`], [`Error::public`])
//! and logs it, once ([`Error::log_level`]).
//!
//! The status table is [`ErrorKind::status`]; nothing else maps errors to
//! statuses.

use crate::RequestId;
use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A boxed error source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong, and so which status the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Admission: every instance was busy and the mailbox full.
    Overloaded,
    /// Admission: the request waited in the mailbox past its queue deadline.
    QueueTimeout,
    /// The guest trapped (panic, unreachable, bad memory access, ...), with
    /// wasmtime's trap code when there is one.
    Trap(Option<wasmtime::Trap>),
    /// The guest tried to grow memory past its limit.
    MemoryLimit,
    /// The guest used up its CPU-time budget.
    CpuLimit,
    /// The guest ran past its wall-clock deadline.
    WallLimit,
    /// The guest returned without sending a response.
    NoResponse,
    /// The guest answered with a `wasi:http` error code instead of a response.
    GuestErrorCode(String),
    /// The request body was larger than the target allows.
    BodyTooLarge,
    /// The client did not send its request (body) in time.
    RequestTimeout,
    /// The request is malformed (the context says how).
    BadRequest,
    /// No such route, actor class or store.
    NotFound,
    /// The caller may not do this.
    Forbidden,
    /// The storage engine failed.
    Storage,
    /// The host failed (resource table, instantiation, a broken invariant).
    Internal,
    /// A proxied request's origin was unreachable, reset the connection or
    /// answered something that is not HTTP (or no origin is usable).
    BadGateway,
    /// A proxied request's origin did not answer in time.
    GatewayTimeout,
    /// Something the request needs is unavailable for now (the database,
    /// the actor's owner while it moves between nodes); retryable.
    Unavailable,
    /// A request forwarded between cluster nodes came back around.
    LoopDetected,
}

impl ErrorKind {
    /// The HTTP status a client gets for this kind: the one status table.
    pub fn status(&self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::BodyTooLarge => 413,
            ErrorKind::Trap(_)
            | ErrorKind::MemoryLimit
            | ErrorKind::NoResponse
            | ErrorKind::GuestErrorCode(_)
            | ErrorKind::Storage
            | ErrorKind::Internal => 500,
            ErrorKind::BadGateway => 502,
            ErrorKind::Overloaded | ErrorKind::QueueTimeout | ErrorKind::Unavailable => 503,
            ErrorKind::LoopDetected => 508,
            ErrorKind::CpuLimit | ErrorKind::WallLimit | ErrorKind::GatewayTimeout => 504,
        }
    }

    /// What a client is told (never internals).
    fn describe(&self) -> &'static str {
        match self {
            ErrorKind::Overloaded => "over capacity",
            ErrorKind::QueueTimeout => "no instance became free in time",
            ErrorKind::Trap(_) => "guest trapped",
            ErrorKind::MemoryLimit => "memory limit exceeded",
            ErrorKind::CpuLimit => "cpu time limit exceeded",
            ErrorKind::WallLimit => "wall time limit exceeded",
            ErrorKind::NoResponse => "guest returned no response",
            ErrorKind::GuestErrorCode(_) => "guest answered with an error",
            ErrorKind::BodyTooLarge => "request body too large",
            ErrorKind::RequestTimeout => "request body timed out",
            ErrorKind::BadRequest => "bad request",
            ErrorKind::NotFound => "not found",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Storage => "storage error",
            ErrorKind::Internal => "internal error",
            ErrorKind::BadGateway => "bad gateway",
            ErrorKind::GatewayTimeout => "gateway timeout",
            ErrorKind::Unavailable => "temporarily unavailable",
            ErrorKind::LoopDetected => "forwarding loop detected",
        }
    }

    /// Whether the guest or the host is at fault (logged at warn with the
    /// source chain), as opposed to load or the client's request.
    fn is_fault(&self) -> bool {
        matches!(
            self,
            ErrorKind::Trap(_)
                | ErrorKind::MemoryLimit
                | ErrorKind::NoResponse
                | ErrorKind::GuestErrorCode(_)
                | ErrorKind::Storage
                | ErrorKind::Internal
                | ErrorKind::BadGateway
                | ErrorKind::GatewayTimeout
                | ErrorKind::CpuLimit
                | ErrorKind::WallLimit
                | ErrorKind::Unavailable
                | ErrorKind::LoopDetected
        )
    }
}

/// Why a request did not get the guest's own response (see the module docs).
pub struct Error {
    kind: ErrorKind,
    /// Safe to show a client: says which limit, which key, which actor.
    context: Option<Cow<'static, str>>,
    retry_after: Option<Duration>,
    source: Option<BoxError>,
}

/// How loudly the edge logs an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Load shedding: the hot path of an overload, kept quiet.
    Debug,
    /// A client's mistake.
    Info,
    /// A guest or host fault.
    Warn,
}

impl Error {
    /// An error of `kind` with no context or source.
    pub fn new(kind: ErrorKind) -> Error {
        Error {
            kind,
            context: None,
            retry_after: None,
            source: None,
        }
    }

    /// A shed request (503) with the `Retry-After` to send.
    pub fn shed(kind: ErrorKind, retry_after: Duration) -> Error {
        Error {
            retry_after: Some(retry_after),
            ..Error::new(kind)
        }
    }

    /// Something the request needs is unavailable for now (a 503 with a
    /// one-second `Retry-After`); `why` is shown to the client.
    pub fn unavailable(why: impl Into<Cow<'static, str>>) -> Error {
        Error::shed(ErrorKind::Unavailable, Duration::from_secs(1)).context(why)
    }

    /// A host failure with its cause (logged, never shown).
    pub fn internal(source: impl Into<BoxError>) -> Error {
        Error::new(ErrorKind::Internal).with_source(source)
    }

    /// A storage failure with its cause (logged, never shown).
    pub fn storage(source: impl Into<BoxError>) -> Error {
        Error::new(ErrorKind::Storage).with_source(source)
    }

    /// A guest trap: the trap code is taken from `e` if it has one.
    pub fn trap(e: wasmtime::Error) -> Error {
        let code = e.downcast_ref::<wasmtime::Trap>().copied();
        Error::new(ErrorKind::Trap(code)).with_source(e)
    }

    /// Adds client-safe context (which limit, key, actor, ...). Context
    /// added later goes in front: `outer: inner`.
    pub fn context(mut self, context: impl Into<Cow<'static, str>>) -> Error {
        let context = context.into();
        self.context = Some(match self.context.take() {
            Some(inner) => format!("{context}: {inner}").into(),
            None => context,
        });
        self
    }

    /// Attaches the cause (logged, never shown to clients).
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Error {
        self.source = Some(source.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The HTTP status the edge answers with.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The `Retry-After` to send (shed requests only).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The client-safe message: the kind and its context, never the source.
    /// The guest's own `wasi:http` error code is its answer, so it is shown.
    pub fn public(&self) -> String {
        let mut s = self.kind.describe().to_string();
        if let ErrorKind::GuestErrorCode(code) = &self.kind {
            s.push_str(&format!(": {code}"));
        }
        if let Some(c) = &self.context {
            s.push_str(&format!(": {c}"));
        }
        s
    }

    /// How the edge logs it.
    pub fn log_level(&self) -> LogLevel {
        match self.kind {
            ErrorKind::Overloaded | ErrorKind::QueueTimeout => LogLevel::Debug,
            ref k if k.is_fault() => LogLevel::Warn,
            _ => LogLevel::Info,
        }
    }

    /// Logs the error, once, at its level: `owner` is the function or actor
    /// it happened in. The edge calls this for every error response; a
    /// binding calls it for an error it hands to a guest as an interface
    /// error instead.
    pub fn log(&self, owner: &str, request_id: RequestId) {
        match self.log_level() {
            LogLevel::Debug => tracing::debug!(owner, %request_id, "{}", self.public()),
            LogLevel::Info => tracing::info!(owner, %request_id, "{}", self.public()),
            LogLevel::Warn => {
                tracing::warn!(owner, %request_id, detail = %self.detail(), "{}", self.public())
            }
        }
    }

    /// The full cause for the log: kind, context, trap code or guest error
    /// code, and every source in the chain (with wasmtime's backtrace).
    pub fn detail(&self) -> String {
        let mut s = self.public();
        if let ErrorKind::Trap(Some(code)) = &self.kind {
            s.push_str(&format!(" [trap: {code}]"));
        }
        if let Some(source) = &self.source {
            s.push_str(&format!("; caused by: {source:?}"));
        }
        s
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.public())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Error::new(kind)
    }
}

/// Why a function or actor class could not be loaded. Every variant names
/// it and the file, so a startup failure says what to fix.
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
    /// The component imports something this kind of guest is not given.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_message_never_contains_the_source() {
        let e = Error::storage(std::io::Error::other(
            "disk I/O error at /var/lib/secret.db",
        ))
        .context("actor counter/a");
        assert_eq!(e.status(), 500);
        assert_eq!(e.public(), "storage error: actor counter/a");
        assert!(!e.to_string().contains("secret"));
        assert!(e.detail().contains("/var/lib/secret.db"), "{}", e.detail());
    }

    #[test]
    fn context_nests_outer_first() {
        let e = Error::new(ErrorKind::BadRequest)
            .context("inner")
            .context("outer");
        assert_eq!(e.public(), "bad request: outer: inner");
    }

    #[test]
    fn only_shed_requests_carry_retry_after() {
        let shed = Error::shed(ErrorKind::Overloaded, Duration::from_secs(2));
        assert_eq!(
            (shed.status(), shed.retry_after()),
            (503, Some(Duration::from_secs(2)))
        );
        assert_eq!(shed.log_level(), LogLevel::Debug);
        let cpu = Error::new(ErrorKind::CpuLimit);
        assert_eq!((cpu.status(), cpu.retry_after()), (504, None));
        assert_eq!(cpu.log_level(), LogLevel::Warn);
    }

    #[test]
    fn trap_code_is_kept() {
        let e = Error::trap(wasmtime::Error::new(wasmtime::Trap::UnreachableCodeReached));
        assert_eq!(
            e.kind(),
            &ErrorKind::Trap(Some(wasmtime::Trap::UnreachableCodeReached))
        );
        assert!(e.detail().contains("[trap: "), "{}", e.detail());
    }
}
