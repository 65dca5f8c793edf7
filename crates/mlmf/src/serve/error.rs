//! Errors as the server answers them: a status and `{"error": {"type", "message",
//! "code"}}` (the shape OpenAI's clients read); 4xx for the request's fault, 5xx for
//! the server's, never a stack trace.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::MlmfError;

/// One error answer.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `payload_too_large`, `rate_limit_error`, `timeout`, `unavailable`,
    /// `server_error`.
    pub(crate) kind: &'static str,
    pub(crate) message: String,
    /// Seconds, for 429 and 503.
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing or wrong API key: send `Authorization: Bearer <key>`",
        )
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub(crate) fn overloaded(limit: usize) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("the server is at its limit of {limit} requests in flight; retry later"),
            )
        }
    }

    pub(crate) fn draining() -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the server is shutting down and takes no new requests",
            )
        }
    }

    pub(crate) fn timeout(after: std::time::Duration) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!("the request took longer than the server's limit of {after:?}"),
            )
        }
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
}

impl From<MlmfError> for ApiError {
    /// At request time every error but the server's own faults comes from what the
    /// request asked: bad inputs, a modality or head the model lacks (a similarity on
    /// a model with no aligned checkpoint is a config or load error of the heads), a
    /// zero-shot template without `{}`.
    fn from(e: MlmfError) -> Self {
        match e {
            MlmfError::Internal(_)
            | MlmfError::Device { .. }
            | MlmfError::Cache { .. }
            | MlmfError::Train(_)
            | MlmfError::ConfigFile { .. } => Self::internal(e.to_string()),
            _ => Self::bad_request(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "type": self.kind,
                "message": self.message,
                "code": self.status.as_u16(),
            }
        });
        let mut r = (self.status, axum::Json(body)).into_response();
        r.extensions_mut()
            .insert(super::routes::ErrorKind(self.kind));
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
