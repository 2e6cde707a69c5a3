use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}:{line}: {message}")]
    Data {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("config: {0}")]
    Config(String),
    /// The run cannot fit in the memory there is (its estimate and what to lower).
    #[error("{0}")]
    TooLarge(String),
    #[error("cancelled after step {step}")]
    Cancelled { step: usize },
    #[error(transparent)]
    Model(#[from] safeprobe_model::Error),
}

pub type Result<T> = std::result::Result<T, TrainError>;
