//! The one error type of the crate. `python.rs` maps it onto Python exceptions.

use std::fmt;
use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug)]
pub enum Error {
    /// A file or directory that does not exist (Python: `FileNotFoundError`).
    NotFound(PathBuf),
    /// An I/O failure other than a missing file.
    Io { path: PathBuf, source: std::io::Error },
    /// A model file that is malformed: bad header, truncated data, bad JSON (Python: `GemmaError`).
    Format { path: PathBuf, msg: String },
    /// A config value that is missing or out of range (Python: `GemmaError`).
    Config(String),
    /// A tensor absent from the checkpoint file(s) at `path` (Python: `GemmaError`).
    MissingTensor { path: PathBuf, name: String },
    /// A tensor whose shape is not what the config implies (Python: `GemmaError`).
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    /// A caller's argument out of range (Python: `ValueError`).
    InvalidArgument(String),
    /// A text method called on a model loaded without tokenizer.json (Python: `GemmaError`).
    NoTokenizer,
    /// Loading would exceed the caller's memory limit (Python: `MemoryError`).
    MemoryLimit(String),
    /// A call stopped by its cancel check, e.g. Ctrl-C (Python: the signal handler's exception,
    /// `KeyboardInterrupt`).
    Interrupted,
    /// NaN or infinite weights or logits (Python: `GemmaError`).
    NonFinite(String),
    /// A bug or an unexpected state, e.g. a caught panic (Python: `GemmaError`).
    Internal(String),
}

impl Error {
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(path)
        } else {
            Error::Io { path, source }
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound(p) => write!(f, "no such file or directory: {}", p.display()),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Format { path, msg } => write!(f, "{}: {msg}", path.display()),
            Error::Config(msg) => write!(f, "config: {msg}"),
            Error::MissingTensor { path, name } => write!(f, "{}: tensor {name} is missing", path.display()),
            Error::ShapeMismatch { path, name, expected, found } => write!(
                f,
                "{}: tensor {name} has shape {found:?}, but the config's sizes imply {expected:?}",
                path.display()
            ),
            Error::InvalidArgument(msg) | Error::MemoryLimit(msg) | Error::NonFinite(msg) => f.write_str(msg),
            Error::Interrupted => f.write_str("interrupted"),
            Error::NoTokenizer => f.write_str(
                "this model was loaded without tokenizer.json: text methods are unavailable \
                 (pass token ids instead)",
            ),
            Error::Internal(msg) => write!(f, "internal error: {msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
