//! The one place where Keel's errors become HTTP statuses.
//!
//! | error | status | why |
//! |---|---|---|
//! | a body that does not parse, [`Error::Invalid`], [`Error::InvalidStream`], [`Error::TooLarge`] | 400 Bad Request | the request itself is wrong; sending it again fails again |
//! | [`Error::Rejected`] | 422 Unprocessable Content | the aggregate refused the command on its current state (an overdraft, a post that exists) |
//! | [`Error::Conflict`] | 409 Conflict | the stream kept moving under the command past the repository's retries |
//! | nothing under that id | 404 Not Found | |
//! | [`Error::Timeout`] | 504 Gateway Timeout | a command, or a read waiting for its write, ran out of time |
//! | [`Error::UnknownOutcome`] | 503 Service Unavailable | the store lost contact mid-append: the command **may have been applied**; the body says so |
//! | [`Error::Unavailable`] | 503 Service Unavailable | too few replicas: nothing was written, retry later |
//! | anything else | 500 Internal Server Error | |
//!
//! Every error body is JSON: `{"error": KIND, "message": TEXT}`, and for an unknown outcome
//! also `"may_have_been_applied": true`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use keel::Error;
use serde::Serialize;

/// An HTTP handler's error: a Keel error, or one of the service's own.
#[derive(Debug)]
pub enum ApiError {
    /// Whatever Keel returned.
    Keel(Error),
    /// Nothing under that id (`what` names it: `account acc-1`).
    NotFound(String),
    /// The request could not be read (a body that is not the JSON expected, a bad `after`).
    BadRequest(String),
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError::Keel(error)
    }
}

/// The body of every error response.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// A short machine-readable kind: `invalid`, `rejected`, `conflict`, `not_found`,
    /// `timeout`, `unknown_outcome`, `unavailable`, `internal`.
    pub error: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Present (and true) when the command may have been applied although it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub may_have_been_applied: Option<bool>,
}

impl ApiError {
    /// The status and body this error is answered with.
    pub fn status_and_body(&self) -> (StatusCode, ErrorBody) {
        let body = |error, message: String| ErrorBody {
            error,
            message,
            may_have_been_applied: None,
        };
        match self {
            ApiError::NotFound(what) => (
                StatusCode::NOT_FOUND,
                body("not_found", format!("no {what}")),
            ),
            ApiError::BadRequest(why) => (StatusCode::BAD_REQUEST, body("invalid", why.clone())),
            ApiError::Keel(e) => {
                let message = e.to_string();
                match e {
                    Error::Invalid { .. }
                    | Error::InvalidStream { .. }
                    | Error::TooLarge { .. } => (StatusCode::BAD_REQUEST, body("invalid", message)),
                    Error::Rejected { .. } => {
                        (StatusCode::UNPROCESSABLE_ENTITY, body("rejected", message))
                    }
                    Error::Conflict { .. } => (StatusCode::CONFLICT, body("conflict", message)),
                    Error::Timeout { .. } => {
                        (StatusCode::GATEWAY_TIMEOUT, body("timeout", message))
                    }
                    Error::UnknownOutcome { .. } => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorBody {
                            error: "unknown_outcome",
                            message: format!(
                                "{message}; the command may have been applied: read the \
                                 resource before sending it again"
                            ),
                            may_have_been_applied: Some(true),
                        },
                    ),
                    Error::Unavailable { .. } => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        body("unavailable", message),
                    ),
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, body("internal", message)),
                }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.status_and_body();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %body.message, "request failed");
        }
        (status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel::{ExpectedVersion, StreamId};

    use super::*;

    fn status(error: Error) -> (u16, &'static str, Option<bool>) {
        let (status, body) = ApiError::Keel(error).status_and_body();
        (status.as_u16(), body.error, body.may_have_been_applied)
    }

    #[test]
    fn each_error_has_its_documented_status() {
        let stream = || StreamId::new("account-1");
        let invalid = Error::Invalid {
            type_name: "OpenAccount",
            reason: "the owner is empty".into(),
        };
        assert_eq!(status(invalid), (400, "invalid", None));
        let rejected = Error::Rejected {
            aggregate: "account",
            source: "insufficient funds".into(),
        };
        assert_eq!(status(rejected), (422, "rejected", None));
        let conflict = Error::Conflict {
            stream: stream(),
            expected: ExpectedVersion::Exact(3),
            actual: Some(4),
        };
        assert_eq!(status(conflict), (409, "conflict", None));
        let timeout = Error::Timeout {
            operation: "Deposit".into(),
            after: Duration::from_secs(5),
        };
        assert_eq!(status(timeout), (504, "timeout", None));
        let unknown = Error::UnknownOutcome {
            stream: stream(),
            reason: "connection lost".into(),
        };
        assert_eq!(status(unknown), (503, "unknown_outcome", Some(true)));
        let broken = Error::HandlerNotFound { type_name: "Nope" };
        assert_eq!(status(broken), (500, "internal", None));
        let (missing, body) = ApiError::NotFound("account acc-9".into()).status_and_body();
        assert_eq!(
            (missing.as_u16(), body.message.as_str()),
            (404, "no account acc-9")
        );
    }

    #[test]
    fn an_unknown_outcome_says_the_command_may_have_been_applied() {
        let (_, body) = ApiError::Keel(Error::UnknownOutcome {
            stream: StreamId::new("post-1"),
            reason: "timed out".into(),
        })
        .status_and_body();
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["may_have_been_applied"], true);
        assert!(
            body.message.contains("may have been applied"),
            "{}",
            body.message
        );
    }
}
