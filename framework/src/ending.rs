//! Streams that end: deleted (soft or hard), truncated before a version, archived.
//!
//! A stream lives forever unless an operator ends it through its store
//! ([`EventStore::delete_stream`](crate::EventStore::delete_stream),
//! [`truncate_stream`](crate::EventStore::truncate_stream),
//! [`archive_stream`](crate::EventStore::archive_stream), or `keel stream ...`). Each of these
//! first appends a **notice** to the stream through the store's ordinary exact append: an
//! event of a reserved type (`$keel.stream-deleted`, `$keel.stream-truncated`,
//! `$keel.stream-archived`) whose payload is a [`StreamNotice`]. The notice takes the next
//! version, so it is in the feed exactly once, after every event of the stream, and a
//! projection hears of the ending in order ([`Projection::notice`](crate::projection::Projection::notice)).
//!
//! | ending | appends afterwards | `read_stream` | its events |
//! |---|---|---|---|
//! | soft delete | refused, [`Error::StreamClosed`] | every event, then the notice | kept |
//! | hard delete | refused | [`Error::StreamClosed`] from version 1; the notice alone | removed once in the feed |
//! | truncate before `v` | accepted | from `v` on; earlier: [`Error::Truncated`] | `1..v` removed once in the feed |
//! | archive | refused | as hard delete | moved to the archive ([`read_archive`](crate::EventStore::read_archive)) |
//!
//! Removal waits until the stream's events are in the feed: the feed is the history that
//! projections rebuild from, and a store never drops an event the feed has not carried. The
//! feed keeps what it carried (a rebuilt projection sees the stream's events and then its
//! notice); to make personal data unreadable everywhere, feed included, shred its subject's
//! key ([`Codec::shred`](crate::codec::Codec)).
//!
//! ```
//! use keel::ending::{StreamNotice, DELETED};
//! let notice = StreamNotice::Deleted { hard: true };
//! let event = notice.to_event();
//! assert_eq!(&*event.event_type, DELETED);
//! assert!(keel::ending::is_notice(&event.event_type));
//! assert_eq!(StreamNotice::parse(&event.event_type, &event.payload).unwrap(), notice);
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::event::{NewEvent, RecordedEvent, StreamId};

/// The type of the notice a deletion appends.
pub const DELETED: &str = "$keel.stream-deleted";
/// The type of the notice a truncation appends.
pub const TRUNCATED: &str = "$keel.stream-truncated";
/// The type of the notice an archive appends.
pub const ARCHIVED: &str = "$keel.stream-archived";
/// The prefix of every type Keel reserves for itself; an application's events never use it.
pub const RESERVED_PREFIX: &str = "$keel.";

/// Whether `event_type` is one of Keel's stream notices.
pub fn is_notice(event_type: &str) -> bool {
    matches!(event_type, DELETED | TRUNCATED | ARCHIVED)
}

/// How a stream is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deletion {
    /// Appends are refused; the events stay and can still be read.
    Soft,
    /// Appends are refused and the events are removed once the feed has carried them.
    Hard,
}

/// What a stream's notice says happened to it. Carried in the feed as the payload of an event
/// of the matching reserved type, so that projections can react.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum StreamNotice {
    /// The stream was deleted; `hard`: its events are removed.
    Deleted {
        /// Whether the events are removed (hard) or kept (soft).
        hard: bool,
    },
    /// The stream's events before version `before` are removed; later ones stay.
    Truncated {
        /// The first version still held.
        before: u64,
    },
    /// The stream was closed and its events moved to the archive.
    Archived,
}

impl StreamNotice {
    /// The reserved event type this notice is stored under.
    pub fn event_type(&self) -> &'static str {
        match self {
            StreamNotice::Deleted { .. } => DELETED,
            StreamNotice::Truncated { .. } => TRUNCATED,
            StreamNotice::Archived => ARCHIVED,
        }
    }

    /// Whether the stream takes no more appends after this notice.
    pub fn closes(&self) -> bool {
        self.closed_status().is_some()
    }

    /// The status a stream has after this notice, if the notice closes it.
    pub fn closed_status(&self) -> Option<StreamStatus> {
        match *self {
            StreamNotice::Deleted { hard } => Some(StreamStatus::Deleted { hard }),
            StreamNotice::Archived => Some(StreamStatus::Archived),
            StreamNotice::Truncated { .. } => None,
        }
    }

    /// The event that carries this notice.
    pub fn to_event(&self) -> NewEvent {
        let payload = serde_json::to_vec(self).expect("a notice always serialises");
        NewEvent::new(self.event_type(), 1, payload)
    }

    /// The notice an event of type `event_type` with `payload` carries, or why it is not one.
    pub fn parse(event_type: &str, payload: &[u8]) -> std::result::Result<StreamNotice, String> {
        let notice: StreamNotice =
            serde_json::from_slice(payload).map_err(|e| format!("not a stream notice: {e}"))?;
        if notice.event_type() != event_type {
            return Err(format!(
                "a `{event_type}` event carries a `{}` notice",
                notice.event_type()
            ));
        }
        Ok(notice)
    }

    /// The notice `event` carries, if it is one (`None` for an application's event); a
    /// damaged notice is an [`Error::Decode`] naming the event.
    pub fn of(event: &RecordedEvent) -> Option<Result<StreamNotice>> {
        is_notice(&event.event_type).then(|| {
            StreamNotice::parse(&event.event_type, &event.payload).map_err(|reason| Error::Decode {
                stream: event.stream.clone(),
                version: event.version,
                event_type: event.event_type.to_string(),
                schema_version: event.schema_version,
                reason,
            })
        })
    }
}

/// Where a stream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamStatus {
    /// No event was ever appended.
    Missing,
    /// Takes appends.
    Open,
    /// Deleted: appends refused; `hard`: its events are (or are being) removed.
    Deleted {
        /// Whether the deletion was hard.
        hard: bool,
    },
    /// Closed and moved to the archive.
    Archived,
}

impl StreamStatus {
    /// Whether appends are refused.
    pub fn is_closed(&self) -> bool {
        matches!(self, StreamStatus::Deleted { .. } | StreamStatus::Archived)
    }
}

impl std::fmt::Display for StreamStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamStatus::Missing => "missing",
            StreamStatus::Open => "open",
            StreamStatus::Deleted { hard: false } => "soft-deleted",
            StreamStatus::Deleted { hard: true } => "hard-deleted",
            StreamStatus::Archived => "archived",
        })
    }
}

/// A stream's state as [`EventStore::stream_info`](crate::EventStore::stream_info) reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// The stream.
    pub stream: StreamId,
    /// Its last version, notices included (0: no event).
    pub version: u64,
    /// Open, deleted, archived.
    pub status: StreamStatus,
    /// The first version the stream still holds in its table (1 unless truncated, deleted
    /// hard or archived; `version` then, the notice's own).
    pub first_version: u64,
}

impl StreamInfo {
    /// The state of a stream that was never ended: `version` `None` is a missing stream.
    pub fn open(stream: &StreamId, version: Option<u64>) -> StreamInfo {
        StreamInfo {
            stream: stream.clone(),
            version: version.unwrap_or(0),
            status: if version.is_some() {
                StreamStatus::Open
            } else {
                StreamStatus::Missing
            },
            first_version: 1,
        }
    }

    /// The error an append to this closed stream gets.
    pub fn closed_error(&self) -> Error {
        Error::StreamClosed {
            stream: self.stream.clone(),
            version: self.version,
            status: self.status,
        }
    }
}

/// What an ending operation did, for the operator's tool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// The stream's state afterwards.
    pub info: StreamInfo,
    /// Events removed from the stream's table by this call (moved, for an archive).
    pub removed: u64,
    /// Whether this call appended the notice (`false`: an earlier call had, and this one
    /// finished what it left).
    pub noticed: bool,
}

/// Refuses an application event whose type is reserved for Keel's notices.
pub fn check_not_reserved(stream: &StreamId, event_type: &str) -> Result<()> {
    if event_type.starts_with(RESERVED_PREFIX) {
        return Err(Error::Encode {
            what: format!("event `{event_type}` for stream `{stream}`"),
            reason: format!(
                "types starting with `{RESERVED_PREFIX}` are reserved for Keel's stream notices"
            ),
        });
    }
    Ok(())
}

/// The error for an operation a store does not implement.
pub fn unsupported(store: &'static str, operation: &str) -> Error {
    Error::Unsupported {
        store,
        operation: operation.to_owned(),
    }
}
