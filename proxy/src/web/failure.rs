//! How the web API fails: an HTTP status and a JSON body with a stable code
//! (`{"error": {"code", "message"}}`), from the auth, token and backend errors, and from bodies
//! that do not parse. Nothing internal reaches an anonymous caller: the log has the details.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tunnel_proto::api::{self, ApiError, ApiErrorBody};

use crate::auth::AuthError;
use crate::auth::tokens::TokenError;

/// An error answer: an HTTP status and a JSON body with a stable code.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiFailure {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let body = ApiErrorBody {
            error: ApiError {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<AuthError> for ApiFailure {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Token(t) => t.into(),
            AuthError::BadRequest(m) => ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", m),
            e @ AuthError::NameTaken { .. } => {
                ApiFailure::new(StatusCode::CONFLICT, "name_taken", e.to_string())
            }
            AuthError::Backend(b) => backend_failure(b),
            AuthError::Rotate(crate::auth::rotation::RotateError::Ca(e)) => internal(e),
            AuthError::Rotate(r) => {
                ApiFailure::new(StatusCode::CONFLICT, "rotation_phase", r.to_string())
            }
            other => internal(other),
        }
    }
}

impl From<TokenError> for ApiFailure {
    fn from(e: TokenError) -> Self {
        let message = e.to_string();
        let (status, code) = match e {
            TokenError::Backend(b) => return backend_failure(b),
            TokenError::NotFound => (StatusCode::FORBIDDEN, "token_not_found"),
            TokenError::Expired(_) => (StatusCode::FORBIDDEN, "token_expired"),
            TokenError::Revoked => (StatusCode::FORBIDDEN, "token_revoked"),
            TokenError::RoleNotAllowed { .. } => (StatusCode::FORBIDDEN, "role_not_allowed"),
            TokenError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            TokenError::Exists => (StatusCode::CONFLICT, "token_exists"),
            TokenError::Static(_) => (StatusCode::BAD_REQUEST, "token_static"),
            TokenError::Ambiguous(_) => (StatusCode::BAD_REQUEST, "token_ambiguous"),
        };
        ApiFailure::new(status, code, message)
    }
}

pub fn internal(e: impl std::fmt::Display) -> ApiFailure {
    tracing::error!(error = %e, "request failed");
    ApiFailure::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the proxy failed to handle the request; its log says why",
    )
}

pub fn body_failure(rejection: BytesRejection) -> ApiFailure {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the request body is larger than {} bytes",
                api::MAX_BODY_BYTES
            ),
        )
    } else {
        ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            rejection.body_text(),
        )
    }
}

pub fn backend_failure(e: crate::backend::BackendError) -> ApiFailure {
    if e.is_unavailable() {
        tracing::warn!(error = %e, "request failed: the state backend is unavailable");
        ApiFailure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the state backend is unreachable; try again shortly",
        )
    } else {
        internal(e)
    }
}

pub fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiFailure> {
    let body = body.map_err(body_failure)?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the request is malformed: {e}"),
        )
    })
}
