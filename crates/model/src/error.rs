//! One error type for everything the model crate can refuse. Every variant names the file,
//! field or value at fault, so a user can fix their input without reading our source.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message and deliberately not an error `source`: callers that
    // print the whole chain (anyhow's `{:#}`) would print it twice.
    #[error("{path}: cannot read: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path}: malformed JSON: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },

    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("chat template: {0}")]
    Template(String),

    #[error("{path}: {message}")]
    Adapter { path: PathBuf, message: String },

    #[error("device: {0}")]
    Device(String),

    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
    pub(crate) fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Weights {
            path: path.into(),
            message: message.into(),
        }
    }
    pub(crate) fn adapter(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Adapter {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Reads and parses a JSON file, naming the file in either failure.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|cause| Error::Json {
        path: path.into(),
        cause,
    })
}
