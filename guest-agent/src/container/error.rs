//! The error every container setup step returns: a protocol error class plus a one-line message.

use rootcell_protocol::ErrorCode;

/// A failed setup step, classified so the host can map it (e.g. NotFound -> exit 127).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SetupError {
    /// Class of failure.
    pub code: ErrorCode,
    /// One line for humans.
    pub message: String,
}

impl SetupError {
    /// An error of class `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A generic failure (`ErrorCode::Other`).
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Other, message)
    }

    /// The spec asks for something not supported.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unsupported, message)
    }
}

/// Adds "what we were doing" context to OS errors.
pub trait Context<T> {
    /// Maps the error to `SetupError::other("<what>: <err>")`.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, SetupError>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, SetupError> {
        self.map_err(|e| SetupError::other(format!("{}: {e}", what())))
    }
}
