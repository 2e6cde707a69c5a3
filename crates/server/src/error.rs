//! One error type for every handler, mapped to an HTTP status with a JSON body
//! `{"error": "..."}` that names the field or value at fault.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use safeprobe_wire::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (400).
    #[error("{0}")]
    Invalid(String),
    /// A field of the request is wrong (400), named by its key within the request
    /// (`config.max_steps`), so that a form can show the message at the field.
    #[error("{0}")]
    InvalidField(SpecError),
    /// A path a field names lies outside the configured directories (403).
    #[error("{0}")]
    ForbiddenField(SpecError),
    /// Missing or wrong access token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A path outside the configured model and data directories (403).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The job is in a state that does not allow this (409).
    #[error("{0}")]
    Conflict(String),
    /// The body is over the size limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// The body is not JSON where JSON is required (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Internal(String),
}

/// A body the JSON extractor refused: too large (413), not declared as JSON (415) or
/// malformed (400, naming the problem).
pub fn rejected(e: axum::extract::rejection::JsonRejection) -> ApiError {
    match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::TooLarge(format!("request body over {} bytes", crate::BODY_LIMIT))
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(e.body_text()),
        _ => ApiError::Invalid(e.body_text()),
    }
}

impl ApiError {
    /// Field `field` of the request is wrong: `message` says how.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidField(SpecError::new(field, message))
    }

    /// The path field `field` names is outside the directories this server may touch.
    pub fn forbidden_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::ForbiddenField(SpecError::new(field, message))
    }

    /// The request's field at fault, where one is.
    pub fn faulty_field(&self) -> Option<&str> {
        match self {
            ApiError::InvalidField(e) | ApiError::ForbiddenField(e) => Some(&e.field),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) | ApiError::InvalidField(_) => StatusCode::BAD_REQUEST,
            ApiError::ForbiddenField(_) => StatusCode::FORBIDDEN,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The client sees the message; the server's log keeps the fault for whoever runs it.
        if let ApiError::Internal(cause) = &self {
            tracing::error!(%cause, "internal error");
        }
        let body = safeprobe_wire::ErrorBody {
            error: self.to_string(),
            field: self.faulty_field().map(str::to_string),
        };
        (self.status(), Json(body)).into_response()
    }
}

/// Errors of the trainer, the evaluation and the model reach a request only while it is being
/// checked (a config, a data file, a checkpoint the request names), so they are the request's
/// fault (400, with the file, field or value; a device error names the device asked for),
/// except a cancelled run, which is a state conflict (409). The server's own faults (its
/// database, its folders, starting a job's process) are `Internal` where they happen.
/// A config value that is wrong, named by its key within the request's `config`.
impl From<SpecError> for ApiError {
    fn from(error: SpecError) -> Self {
        ApiError::InvalidField(error.within("config"))
    }
}

impl From<safeprobe_train::TrainError> for ApiError {
    fn from(e: safeprobe_train::TrainError) -> Self {
        use safeprobe_train::TrainError;
        match e {
            TrainError::Model(e) => e.into(),
            TrainError::Cancelled { .. } => ApiError::Conflict(e.to_string()),
            TrainError::Data { .. }
            | TrainError::File { .. }
            | TrainError::Config(_)
            | TrainError::TooLarge(_) => ApiError::Invalid(e.to_string()),
        }
    }
}

impl From<safeprobe_eval::EvalError> for ApiError {
    fn from(e: safeprobe_eval::EvalError) -> Self {
        use safeprobe_eval::EvalError;
        match e {
            EvalError::Model(e) => e.into(),
            EvalError::Train(e) => e.into(),
            EvalError::Cancelled => ApiError::Conflict(e.to_string()),
            EvalError::Spec(e) => e.into(),
            EvalError::Data { .. } | EvalError::File { .. } | EvalError::Invalid(_) => {
                ApiError::Invalid(e.to_string())
            }
        }
    }
}

impl From<safeprobe_model::Error> for ApiError {
    fn from(e: safeprobe_model::Error) -> Self {
        use safeprobe_model::Error;
        match e {
            Error::Io { .. }
            | Error::Json { .. }
            | Error::Config { .. }
            | Error::Weights { .. }
            | Error::Tokenizer { .. }
            | Error::Template(_)
            | Error::Adapter { .. }
            | Error::Device(_)
            | Error::Invalid(_) => ApiError::Invalid(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_status_of_whose_fault_they_are() {
        use safeprobe_eval::EvalError;
        use safeprobe_train::TrainError;
        let status = |e: ApiError| e.status();
        assert_eq!(
            status(TrainError::Config("lr -1 must be positive".into()).into()),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(TrainError::Cancelled { step: 3 }.into()),
            StatusCode::CONFLICT
        );
        assert_eq!(status(EvalError::Cancelled.into()), StatusCode::CONFLICT);
        assert_eq!(
            status(EvalError::Train(TrainError::Cancelled { step: 0 }).into()),
            StatusCode::CONFLICT
        );
        let weights = safeprobe_model::Error::Weights {
            path: "m/model.safetensors".into(),
            message: "truncated".into(),
        };
        assert_eq!(
            status(EvalError::Train(TrainError::Model(weights)).into()),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(ApiError::Internal("database: disk full".into())),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            status(safeprobe_model::Error::Invalid("max_new_tokens 0".into()).into()),
            StatusCode::BAD_REQUEST
        );
    }
}
