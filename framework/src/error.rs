//! The one error type of `keel`, with variants that carry the context needed to act on them.

use std::time::Duration;

use crate::event::{ExpectedVersion, StreamId};

/// A `Result` whose error defaults to [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed error from a store backend or a domain, kept as a source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in Keel.
///
/// Every variant names what was wrong: the stream and version of an event that would not
/// decode, the command type without a handler, the expected and actual version of a conflict.
/// Domain rejections travel as [`Error::Rejected`] and can be read back typed with
/// [`Error::rejection`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Optimistic concurrency: the stream was not at the version the writer expected.
    #[error("version conflict on stream `{stream}`: expected {expected}, stream is at {}", fmt_actual(*.actual))]
    Conflict {
        /// The stream written to.
        stream: StreamId,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's version when the append was refused (`None`: no stream).
        actual: Option<u64>,
    },

    /// The aggregate refused the command (its `handle` returned an error).
    #[error("{aggregate} rejected the command: {source}")]
    Rejected {
        /// The aggregate type's name.
        aggregate: &'static str,
        /// The aggregate's own error, see [`Error::rejection`].
        source: BoxError,
    },

    /// A stored event's type is not one the reading code knows.
    #[error("unknown event type `{event_type}` at stream `{stream}` version {version}")]
    UnknownEventType {
        /// The stream holding the event.
        stream: StreamId,
        /// The event's version in its stream.
        version: u64,
        /// The stored type name.
        event_type: String,
    },

    /// A stored event (or snapshot) did not decode into the current type.
    #[error("cannot decode event `{event_type}` (schema v{schema_version}) at stream `{stream}` version {version}: {reason}")]
    Decode {
        /// The stream holding the event.
        stream: StreamId,
        /// The event's version in its stream.
        version: u64,
        /// The stored type name.
        event_type: String,
        /// The stored schema version.
        schema_version: u32,
        /// What the decoder said.
        reason: String,
    },

    /// An upcaster failed to turn an old event into the current shape.
    #[error("upcasting `{event_type}` from schema v{from_version} failed at stream `{stream}` version {version}: {reason}")]
    Upcast {
        /// The stream holding the event.
        stream: StreamId,
        /// The event's version in its stream.
        version: u64,
        /// The stored type name.
        event_type: String,
        /// The schema version the failing upcaster starts from.
        from_version: u32,
        /// What the upcaster said.
        reason: String,
    },

    /// The event's subject was crypto-shredded: its key is deleted and its payload can no
    /// longer be read. Projections skip such events.
    #[error("event `{event_type}` at stream `{stream}` version {version} is shredded (the key of subject `{subject}` was deleted)")]
    Shredded {
        /// The stream holding the event.
        stream: StreamId,
        /// The event's version in its stream.
        version: u64,
        /// The stored type name.
        event_type: String,
        /// The subject whose key was deleted.
        subject: String,
    },

    /// A stored payload failed authentication: it was altered, or copied from another event.
    #[error(
        "event `{event_type}` at stream `{stream}` version {version} was tampered with: {reason}"
    )]
    Tampered {
        /// The stream holding the event.
        stream: StreamId,
        /// The event's version in its stream.
        version: u64,
        /// The stored type name.
        event_type: String,
        /// What failed.
        reason: String,
    },

    /// A stored payload is malformed or does not decompress.
    #[error("event `{event_type}` at stream `{stream}` version {version} is corrupt: {reason}")]
    Corrupt {
        /// The stream holding the event.
        stream: StreamId,
        /// The event's version in its stream.
        version: u64,
        /// The stored type name.
        event_type: String,
        /// What failed.
        reason: String,
    },

    /// An event or command could not be encoded.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// What was being encoded (an event type, a snapshot, a command).
        what: String,
        /// What the encoder said.
        reason: String,
    },

    /// No handler is registered for a command or query type.
    #[error("no handler registered for `{type_name}`; register one with the bus builder's `command`/`query`")]
    HandlerNotFound {
        /// The message type's name.
        type_name: &'static str,
    },

    /// A second handler was registered for the same message type.
    #[error("a handler for `{type_name}` is already registered")]
    DuplicateHandler {
        /// The message type's name.
        type_name: &'static str,
    },

    /// A handler panicked; the panic was caught and the bus stays usable.
    #[error("handler for `{type_name}` panicked: {message}")]
    HandlerPanicked {
        /// The message type's name.
        type_name: &'static str,
        /// The panic payload, when it was a string.
        message: String,
    },

    /// A message failed validation before reaching its handler.
    #[error("`{type_name}` is invalid: {reason}")]
    Invalid {
        /// The message type's name.
        type_name: &'static str,
        /// Why it is invalid.
        reason: String,
    },

    /// An operation did not finish in time.
    #[error("`{operation}` timed out after {after:?}")]
    Timeout {
        /// What timed out (a message type, a store call).
        operation: String,
        /// The limit that was exceeded.
        after: Duration,
    },

    /// An append whose outcome could not be established (the store lost contact mid-write
    /// and could not read the outcome back). The events may or may not be stored.
    #[error("outcome of append to `{stream}` is unknown: {reason}")]
    UnknownOutcome {
        /// The stream written to.
        stream: StreamId,
        /// Why the outcome could not be established.
        reason: String,
    },

    /// A stream id no store can hold (empty, or longer than [`StreamId::MAX_BYTES`]).
    /// Refused before anything is written.
    #[error("invalid stream id `{stream}`: {reason}")]
    InvalidStream {
        /// The id as given (its first 64 characters).
        stream: String,
        /// Why it was refused.
        reason: String,
    },

    /// An event too large for the store: refused at append, before anything is written, so
    /// that nothing reaches the feed that the feed could not carry.
    #[error("event `{event_type}` for stream `{stream}` is {bytes} bytes, over the store's maximum of {max} (payload, type and metadata)")]
    TooLarge {
        /// The stream appended to.
        stream: StreamId,
        /// The event's type.
        event_type: String,
        /// Its stored size.
        bytes: usize,
        /// The store's limit (`max_event_bytes`).
        max: usize,
    },

    /// Too few replicas answer for the consistency the operation needs (a quorum of a
    /// cluster with nodes down). Nothing was written; retry once the nodes are back.
    #[error("{store} store: {operation} needs {required} replica(s) at {consistency}, {alive} alive: {reason}")]
    Unavailable {
        /// The store's name.
        store: &'static str,
        /// The operation that was refused.
        operation: String,
        /// The consistency level asked for (`QUORUM`, `SERIAL`, ...).
        consistency: String,
        /// Replicas the level needs.
        required: u32,
        /// Replicas the coordinator knew alive.
        alive: u32,
        /// What the server said.
        reason: String,
    },

    /// A stored row is damaged: a column the store always writes is missing, or versions have
    /// a gap. Names the stream, the version and what is wrong, so that an operator can repair it.
    #[error("stream `{stream}` is damaged at version {version}: {reason}")]
    Damaged {
        /// The stream.
        stream: StreamId,
        /// The version of the damaged row (for a gap: the first missing version).
        version: u64,
        /// What is wrong (`column event_type is null`, `versions 4..=4 are missing`).
        reason: String,
    },

    /// The stream was deleted or archived: it takes no more appends, and (deleted hard,
    /// archived) its events are no longer in its table. Nothing was written.
    #[error("stream `{stream}` is {status} (at version {version}): it takes no appends{}", closed_hint(*status))]
    StreamClosed {
        /// The stream.
        stream: StreamId,
        /// Its last version (the notice's).
        version: u64,
        /// How it ended.
        status: crate::ending::StreamStatus,
    },

    /// A read from a version the stream no longer holds: it was truncated, and its events
    /// from `first_version` on are still there (a load starts from a snapshot at or after it).
    #[error("stream `{stream}` was truncated: version {from} is gone, it holds versions from {first_version} on")]
    Truncated {
        /// The stream.
        stream: StreamId,
        /// The version asked for.
        from: u64,
        /// The first version still held.
        first_version: u64,
    },

    /// An operation on a stream as a whole (delete, truncate, archive) was refused before
    /// anything was written: the stream is missing, no snapshot covers what a truncation
    /// would remove, the stream is closed already.
    #[error("{operation} of stream `{stream}` refused: {reason}")]
    Refused {
        /// The stream.
        stream: StreamId,
        /// What was asked (`delete`, `truncate`, `archive`).
        operation: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// The store does not implement this operation.
    #[error("the {store} store does not support {operation}")]
    Unsupported {
        /// The store's name.
        store: &'static str,
        /// What was asked.
        operation: String,
    },

    /// A write made under a lease whose epoch is no longer the newest: another worker took the
    /// lease over (this one stalled past its TTL) and the store refused the stale write.
    /// The worker has lost its lease; nothing was written.
    #[error("`{name}`: write under lease epoch {epoch} refused, epoch {current} holds it now")]
    Fenced {
        /// What the lease guards (a projection's checkpoint, a read model).
        name: String,
        /// The epoch the refused write was made under.
        epoch: u64,
        /// The newest epoch the store has seen.
        current: u64,
    },

    /// Another worker holds the lease this operation needs, and did not let go within the
    /// wait (a projection's rebuild on a manager that is not the projection's lease holder).
    #[error("`{name}` is held by `{holder}`, not by this worker{detail}")]
    HeldElsewhere {
        /// What the lease guards.
        name: String,
        /// The holder as last reported (a manager id), or `unknown`.
        holder: String,
        /// What was done instead, if anything (the request left for the holder).
        detail: String,
    },

    /// A store backend failed (connection, server error, schema).
    #[error("{store} store failed during {operation}: {source}")]
    Store {
        /// The store's name (`memory`, `scylla`, ...).
        store: &'static str,
        /// The operation that failed.
        operation: String,
        /// The backend's error.
        source: BoxError,
    },

    /// Configuration was refused.
    #[error("invalid configuration `{field}`: {reason}")]
    Config {
        /// The offending field.
        field: String,
        /// Why it was refused.
        reason: String,
    },
}

fn closed_hint(status: crate::ending::StreamStatus) -> &'static str {
    match status {
        crate::ending::StreamStatus::Archived => "; its events are in the archive",
        _ => "",
    }
}

fn fmt_actual(actual: Option<u64>) -> String {
    match actual {
        Some(v) => format!("version {v}"),
        None => "no stream".to_owned(),
    }
}

impl Error {
    /// A store failure, with the store's name and the operation.
    pub fn store(
        store: &'static str,
        operation: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Store {
            store,
            operation: operation.into(),
            source: source.into(),
        }
    }

    /// Whether this is an optimistic-concurrency conflict (worth retrying after a reload).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// Whether this is [`Error::Shredded`]: the event's subject was forgotten.
    pub fn is_shredded(&self) -> bool {
        matches!(self, Error::Shredded { .. })
    }

    /// The one stored event this error is about (stream, version and, when known, its type):
    /// a row that is damaged, does not decode, upcast or authenticate. `None` for errors that
    /// are not about one event (a store that is down, a conflict).
    pub fn event(&self) -> Option<(&StreamId, u64, Option<&str>)> {
        match self {
            Error::Damaged {
                stream, version, ..
            } => Some((stream, *version, None)),
            Error::UnknownEventType {
                stream,
                version,
                event_type,
            }
            | Error::Decode {
                stream,
                version,
                event_type,
                ..
            }
            | Error::Upcast {
                stream,
                version,
                event_type,
                ..
            }
            | Error::Shredded {
                stream,
                version,
                event_type,
                ..
            }
            | Error::Tampered {
                stream,
                version,
                event_type,
                ..
            }
            | Error::Corrupt {
                stream,
                version,
                event_type,
                ..
            } => Some((stream, *version, Some(event_type))),
            _ => None,
        }
    }

    /// Whether this is a [`Timeout`](Error::Timeout): the operation did not finish in time
    /// (for a wait, what it waited for did not happen in time).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// Whether this is [`Error::Fenced`]: a write under a stale lease epoch was refused.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Fenced { .. })
    }

    /// The aggregate's own error, when the command was rejected with an error of type `E`.
    ///
    /// ```
    /// # #[derive(Debug, thiserror::Error)] #[error("no funds")] struct NoFunds;
    /// let err = keel::Error::Rejected { aggregate: "Account", source: Box::new(NoFunds) };
    /// assert!(err.rejection::<NoFunds>().is_some());
    /// ```
    pub fn rejection<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            Error::Rejected { source, .. } => source.downcast_ref::<E>(),
            _ => None,
        }
    }
}
