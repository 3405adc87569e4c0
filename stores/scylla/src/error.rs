//! The setup error of `keel-scylla`, and how driver errors become `keel::Error`s.

use scylla::errors::{DbError, ExecutionError, RequestAttemptError, WriteType};

/// What can go wrong while building a [`KeelScylla`](crate::KeelScylla).
///
/// Once built, the store's operations return [`keel::Error`]; this type is converted into it
/// as well (`Error::Config` for refused settings, `Error::Store` for the rest).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A keyspace or table name that is not a plain CQL identifier. Nothing reached the server.
    #[error("invalid {what} `{name}`: {reason} (use 1-48 characters: a lowercase letter, then lowercase letters, digits or `_`)")]
    InvalidIdentifier {
        /// What the name was for (`keyspace`, `table prefix`).
        what: &'static str,
        /// The refused name, as given.
        name: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// A setting out of range.
    #[error("invalid setting `{field}`: {reason}")]
    InvalidSetting {
        /// The setting's builder method.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// The builder was given no node to connect to.
    #[error("no node given: call `known_node(\"host:port\")` on the builder")]
    NoNodes,
    /// The session could not be opened.
    #[error("cannot connect to {nodes:?}: {source}")]
    Connect {
        /// The nodes tried.
        nodes: Vec<String>,
        /// The driver's error.
        source: Box<scylla::errors::NewSessionError>,
    },
    /// Opening the session did not finish in time (nodes that accept connections but never
    /// complete the handshake, or a TLS set-up the nodes do not answer).
    #[error("cannot connect to {nodes:?}: no session after {after:?}")]
    ConnectTimeout {
        /// The nodes tried.
        nodes: Vec<String>,
        /// How long it waited.
        after: std::time::Duration,
    },
    /// The TLS material could not be used (a file missing, not PEM, or a key that does not
    /// match its certificate), or this build has no TLS.
    #[error("TLS set-up failed: {reason}")]
    Tls {
        /// What went wrong, naming the file.
        reason: String,
    },
    /// Creating or checking the schema failed.
    #[error("schema setup failed during `{step}`: {reason}")]
    Schema {
        /// The step (a table, the version check).
        step: String,
        /// What the server or the check said.
        reason: String,
    },
}

impl From<Error> for keel::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidIdentifier { what, .. } => keel::Error::Config {
                field: what.to_owned(),
                reason: e.to_string(),
            },
            Error::InvalidSetting { field, .. } => keel::Error::Config {
                field: field.to_owned(),
                reason: e.to_string(),
            },
            other => keel::Error::store("scylla", "setup", other),
        }
    }
}

/// A driver error as a Keel store error naming the operation: [`keel::Error::Unavailable`]
/// when the coordinator refused for want of live replicas, [`keel::Error::Store`] otherwise.
pub(crate) fn store_err(
    operation: impl Into<String>,
    e: impl std::error::Error + Send + Sync + 'static,
) -> keel::Error {
    let boxed: keel::BoxError = Box::new(e);
    if let Some(ExecutionError::LastAttemptError(RequestAttemptError::DbError(
        DbError::Unavailable {
            consistency,
            required,
            alive,
        },
        message,
    ))) = boxed.downcast_ref::<ExecutionError>()
    {
        return keel::Error::Unavailable {
            store: "scylla",
            operation: operation.into(),
            consistency: cql_level(&format!("{consistency:?}")),
            required: (*required).max(0) as u32,
            alive: (*alive).max(0) as u32,
            reason: message.clone(),
        };
    }
    keel::Error::Store {
        store: "scylla",
        operation: operation.into(),
        source: boxed,
    }
}

/// Whether an error leaves a conditional write's outcome unknown: a client-side timeout, a
/// server write timeout of a CAS write, or a broken connection after sending.
pub(crate) fn outcome_unknown(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::RequestTimeout(_) => true,
        ExecutionError::LastAttemptError(attempt) => match attempt {
            RequestAttemptError::DbError(DbError::WriteTimeout { write_type, .. }, _) => {
                matches!(
                    write_type,
                    WriteType::Cas | WriteType::Simple | WriteType::Batch
                )
            }
            RequestAttemptError::DbError(DbError::Unavailable { .. }, _) => false,
            RequestAttemptError::DbError(_, _) => false,
            // Failures before the request left the client: nothing was sent.
            RequestAttemptError::SerializationError(_)
            | RequestAttemptError::CqlRequestSerialization(_)
            | RequestAttemptError::UnableToAllocStreamId => false,
            // A connection or framing failure after the request may have left: unknown.
            _ => true,
        },
        _ => false,
    }
}

/// `LocalQuorum` as CQL writes it: `LOCAL_QUORUM`.
fn cql_level(debug: &str) -> String {
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn levels_read_as_cql_writes_them() {
        assert_eq!(super::cql_level("LocalQuorum"), "LOCAL_QUORUM");
        assert_eq!(super::cql_level("Serial"), "SERIAL");
    }
}
