use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}:{line}: {message}")]
    Data {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    /// A config value that is wrong, named by its key.
    #[error(transparent)]
    Spec(#[from] safeprobe_wire::SpecError),
    /// Stopped on request (a cancelled job).
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Model(#[from] safeprobe_model::Error),
    #[error(transparent)]
    Train(#[from] safeprobe_train::TrainError),
}

impl EvalError {
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::File {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, EvalError>;
