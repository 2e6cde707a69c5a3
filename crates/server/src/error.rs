//! One error type for every handler, mapped to an HTTP status with a JSON body
//! `{"error": "..."}` that names the field or value at fault.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or a field is invalid (400).
    #[error("{0}")]
    Invalid(String),
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
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
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
        let body = safeprobe_wire::ErrorBody {
            error: self.to_string(),
        };
        (self.status(), Json(body)).into_response()
    }
}

impl From<safeprobe_train::TrainError> for ApiError {
    fn from(e: safeprobe_train::TrainError) -> Self {
        ApiError::Invalid(e.to_string())
    }
}

impl From<safeprobe_eval::EvalError> for ApiError {
    fn from(e: safeprobe_eval::EvalError) -> Self {
        ApiError::Invalid(e.to_string())
    }
}

impl From<safeprobe_model::Error> for ApiError {
    fn from(e: safeprobe_model::Error) -> Self {
        ApiError::Invalid(e.to_string())
    }
}
