//! Errors as values, and the exit code each kind of error maps to.

use std::fmt;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

// Display and std::error::Error are written by hand rather than derived with thiserror: thiserror takes any field
// named `source` as the error's cause, which `Config::source` (a file name) is not.
#[derive(Debug)]
pub enum Error {
    /// A configuration value is missing, unknown, of the wrong type or impossible. `source` names where it came
    /// from: a file path or `--set`. `key` is empty for a problem with the whole file (unreadable, not TOML).
    Config { source: String, key: String, message: String },

    /// A usage error that is not about one configuration key (a bad command-line combination, say).
    Usage(String),

    /// A data file (or a synthetic data specification) that cannot be used.
    Data { path: PathBuf, message: String },

    /// A file that could not be read or written.
    Io { path: PathBuf, source: std::io::Error },

    /// A backend could not start or an operation on it failed at run time.
    Backend { backend: String, message: String },

    /// A backend ran out of memory: the run does not fit as configured.
    OutOfMemory { backend: String, message: String },

    /// The model or trainer was asked for something it does not support (a programming or pairing error that
    /// surfaced at run time).
    Invalid(String),

    /// The user asked the run to stop (Ctrl-C).
    Interrupted,

    /// Training cannot go on: its updates keep failing the guard (`train.guard`), or its loss became non-finite.
    Diverged(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config { source, key, message } if key.is_empty() => write!(f, "{source}: {message}"),
            Error::Config { source, key, message } => write!(f, "{source}: {key}: {message}"),
            Error::Usage(message) | Error::Invalid(message) | Error::Diverged(message) => f.write_str(message),
            Error::Data { path, message } => write!(f, "{}: {message}", path.display()),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Backend { backend, message } | Error::OutOfMemory { backend, message } => {
                write!(f, "{backend}: {message}")
            }
            Error::Interrupted => f.write_str("interrupted"),
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

impl Error {
    pub fn config(source: impl Into<String>, key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { source: source.into(), key: key.into(), message: message.into() }
    }

    pub fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Data { path: path.into(), message: message.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn backend(backend: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Backend { backend: backend.into(), message: message.into() }
    }

    /// The process exit code for this error: 2 for anything the user can fix by changing the command line, the
    /// configuration or the input files; 130 for an interrupt (the shell's convention); 1 for failures at run time.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config { .. } | Error::Usage(_) | Error::Data { .. } | Error::OutOfMemory { .. } => 2,
            Error::Interrupted => 130,
            Error::Io { .. } | Error::Backend { .. } | Error::Invalid(_) | Error::Diverged(_) => 1,
        }
    }
}
