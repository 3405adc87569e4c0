//! The driver's retry policy for Keel's statements: the driver's default, except that an
//! `Unavailable` answer is final.
//!
//! A coordinator that says too few replicas are alive knows the cluster's state; the default
//! policy would send the request once more to the next node of the plan, which with nodes
//! down is often one the driver has no connection to, so the caller got "no connections in
//! the pool" instead of the reason. Keel's own layers decide whether to try again later.

use scylla::errors::{DbError, RequestAttemptError};
use scylla::policies::retry::{
    DefaultRetryPolicy, RequestInfo, RetryDecision, RetryPolicy, RetrySession,
};

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct KeelRetry(DefaultRetryPolicy);

impl RetryPolicy for KeelRetry {
    fn new_session(&self) -> Box<dyn RetrySession> {
        Box::new(KeelRetrySession(self.0.new_session()))
    }
}

struct KeelRetrySession(Box<dyn RetrySession>);

impl RetrySession for KeelRetrySession {
    fn decide_should_retry(&mut self, info: RequestInfo) -> RetryDecision {
        if matches!(
            info.error,
            RequestAttemptError::DbError(DbError::Unavailable { .. }, _)
        ) {
            return RetryDecision::DontRetry;
        }
        self.0.decide_should_retry(info)
    }

    fn reset(&mut self) {
        self.0.reset()
    }
}
