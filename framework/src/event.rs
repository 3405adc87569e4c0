//! Events as the domain sees them ([`DomainEvent`]) and as stores keep them
//! ([`NewEvent`] going in, [`RecordedEvent`] coming out).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};

/// A domain event: a fact, named in the past tense, that an aggregate emitted.
///
/// Events are usually one enum per aggregate, serialised with serde. The stored record keeps
/// the [`event_type`](DomainEvent::event_type) beside the JSON so upcasters, projections and
/// operators can tell events apart without decoding them.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// enum AccountEvent {
///     Opened { owner: String },
///     Deposited { amount: u64 },
/// }
///
/// impl keel::DomainEvent for AccountEvent {
///     fn event_type(&self) -> &'static str {
///         match self {
///             AccountEvent::Opened { .. } => "Opened",
///             AccountEvent::Deposited { .. } => "Deposited",
///         }
///     }
/// }
/// ```
pub trait DomainEvent: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The stable name of this event's type. Keep it equal to the serde variant name: the
    /// upcasting path rebuilds the serde representation from it.
    fn event_type(&self) -> &'static str;

    /// The schema version this code writes for this event's type (1 unless it changed shape).
    fn schema_version(&self) -> u32 {
        1
    }
}

/// The identity of an event stream: `"<aggregate type>-<id>"` for aggregates.
///
/// Ids of up to 23 bytes (most aggregate ids) are kept inline, longer ones shared: cloning one
/// never allocates, and comparing the keys of a map of streams reads no other memory than
/// the map's own.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(smol_str::SmolStr);

/// A stream id is its string, in JSON and every other serde format.
impl serde::Serialize for StreamId {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let id = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Ok(StreamId::new(id))
    }
}

impl StreamId {
    /// The longest stream id a store accepts, in UTF-8 bytes: far above any id an
    /// application needs, and safely below ScyllaDB's and Cassandra's 64 KiB key limit with
    /// the other key columns of every table that a stream id is part of.
    pub const MAX_BYTES: usize = 1024;

    /// Whether a store can hold this id: not empty, at most [`MAX_BYTES`](Self::MAX_BYTES).
    /// Every store checks it before it writes anything for an append.
    ///
    /// ```
    /// use keel::StreamId;
    /// assert!(StreamId::new("account-1").validate().is_ok());
    /// assert!(StreamId::new("").validate().is_err());
    /// assert!(StreamId::new("x".repeat(2_000)).validate().is_err());
    /// ```
    pub fn validate(&self) -> crate::Result<()> {
        let refuse = |reason: String| {
            let shown: String = self.0.chars().take(64).collect();
            Err(crate::Error::InvalidStream {
                stream: shown,
                reason,
            })
        };
        if self.0.is_empty() {
            return refuse("a stream id may not be empty".into());
        }
        if self.0.len() > Self::MAX_BYTES {
            return refuse(format!(
                "{} bytes is longer than the {} bytes a stream id may have",
                self.0.len(),
                Self::MAX_BYTES
            ));
        }
        Ok(())
    }

    /// A stream id from any string (checked by the store at append: see
    /// [`validate`](Self::validate)).
    pub fn new(id: impl AsRef<str>) -> Self {
        StreamId(smol_str::SmolStr::new(id.as_ref()))
    }

    /// `"<kind>-<id>"`, the stream of an aggregate (see
    /// [`Aggregate::stream_id`](crate::Aggregate::stream_id)), built with one allocation.
    ///
    /// ```
    /// use keel::StreamId;
    /// assert_eq!(StreamId::of("account", "acc-1").as_str(), "account-acc-1");
    /// let long = "é".repeat(100); // past the stack buffer: built another way, same result
    /// assert_eq!(StreamId::of("account", &long).as_str(), format!("account-{long}"));
    /// ```
    pub fn of(kind: &str, id: &str) -> Self {
        let len = kind.len() + 1 + id.len();
        let mut buf = [0u8; 128];
        if len <= buf.len() {
            buf[..kind.len()].copy_from_slice(kind.as_bytes());
            buf[kind.len()] = b'-';
            buf[kind.len() + 1..len].copy_from_slice(id.as_bytes());
            if let Ok(joined) = std::str::from_utf8(&buf[..len]) {
                return StreamId(smol_str::SmolStr::new(joined));
            }
        }
        StreamId::from(format!("{kind}-{id}"))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A shared `Arc<str>` for a static name: event type names repeat on every event, so each
/// thread keeps one copy per name instead of allocating one per event.
pub(crate) fn intern(name: &'static str) -> Arc<str> {
    type Names = std::collections::HashMap<(usize, usize), Arc<str>, foldhash::fast::RandomState>;
    thread_local! {
        static NAMES: std::cell::RefCell<Names> = std::cell::RefCell::default();
    }
    NAMES
        .try_with(|names| {
            let mut names = names.borrow_mut();
            if names.len() > 4096 {
                names.clear(); // a bound, for programs that make up names at run time
            }
            names
                .entry((name.as_ptr() as usize, name.len()))
                .or_insert_with(|| Arc::from(name))
                .clone()
        })
        .unwrap_or_else(|_| Arc::from(name))
}

/// `value` as JSON in bytes of exactly its length.
///
/// `serde_json::to_vec` leaves spare capacity, and `Bytes` then needs a second allocation to
/// share such a buffer; writing into a per-thread buffer and copying out the few bytes gives
/// one allocation of the right size.
pub(crate) fn encode_json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Bytes> {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// Buffers grown past this by a large payload are not kept.
    const KEEP: usize = 64 * 1024;
    BUFFER
        .try_with(|buffer| {
            let Ok(mut buffer) = buffer.try_borrow_mut() else {
                // Re-entered from a `Serialize` impl that encodes an event itself.
                return serde_json::to_vec(value).map(Bytes::from);
            };
            buffer.clear();
            let written = serde_json::to_writer(&mut *buffer, value);
            let bytes = written.map(|()| Bytes::copy_from_slice(&buffer));
            if buffer.capacity() > KEEP {
                *buffer = Vec::new();
            }
            bytes
        })
        .unwrap_or_else(|_| serde_json::to_vec(value).map(Bytes::from))
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl From<&str> for StreamId {
    fn from(s: &str) -> Self {
        StreamId::new(s)
    }
}

impl From<String> for StreamId {
    fn from(s: String) -> Self {
        StreamId(smol_str::SmolStr::from(s))
    }
}

/// What an appender believes about a stream's current version.
///
/// Versions count events: the first event of a stream has version 1, and a stream holding `n`
/// events is "at version `n`".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check: append after whatever is there.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be exactly at this version (holding this many events).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream currently at `actual` (`None`: no stream) satisfies this expectation.
    pub fn accepts(self, actual: Option<u64>) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual.is_none(),
            ExpectedVersion::Exact(n) => actual.unwrap_or(0) == n,
        }
    }

    /// The expectation matching a stream at `version` events (0: no stream yet).
    pub fn from_version(version: u64) -> Self {
        if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(n) => write!(f, "version {n}"),
        }
    }
}

/// Per-event metadata: who caused it, in which conversation, and free-form user data.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Metadata {
    /// The conversation this event belongs to (a request, a saga), shared by everything it caused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The message (command or event) that directly caused this one: one hop back along the
    /// chain from a request through commands, events and saga steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// This message's own id, while it is a command being dispatched (the bus sets it): what
    /// the command causes (its events, the commands its handler sends) names it as their
    /// causation id. Stored events carry `None` here; their own id is the event id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<Uuid>,
    /// The id of the command that produced this event, when its sender gave one because it may
    /// send the command again (a saga does): a repository applies a command id once per stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<Uuid>,
    /// Free-form key/value data (user id, tenant, client ip ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub user: BTreeMap<String, String>,
}

impl Metadata {
    /// Metadata with a correlation id.
    pub fn correlated(correlation_id: Uuid) -> Self {
        Metadata {
            correlation_id: Some(correlation_id),
            ..Metadata::default()
        }
    }

    /// Sets the causation id.
    pub fn caused_by(mut self, causation_id: Uuid) -> Self {
        self.causation_id = Some(causation_id);
        self
    }

    /// The metadata for what this message causes: the same conversation and user data, the
    /// causation id one hop on (this message's id when it has one), and no message id of its
    /// own (an event's id is its event id).
    pub fn for_effects(&self) -> Metadata {
        Metadata {
            correlation_id: self.correlation_id,
            causation_id: self.message_id.or(self.causation_id),
            command_id: self.command_id,
            message_id: None,
            user: self.user.clone(),
        }
    }

    /// Sets the command id (see [`Metadata::command_id`]).
    pub fn with_command_id(mut self, command_id: Uuid) -> Self {
        self.command_id = Some(command_id);
        self
    }

    /// Adds a user key/value pair.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.user.insert(key.into(), value.into());
        self
    }

    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.correlation_id.is_none()
            && self.causation_id.is_none()
            && self.command_id.is_none()
            && self.user.is_empty()
    }
}

/// An event about to be appended: encoded, with a fresh id, not yet versioned.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    /// Unique id of this event.
    pub event_id: Uuid,
    /// Stable type name.
    pub event_type: Arc<str>,
    /// Schema version of the payload.
    pub schema_version: u32,
    /// Encoded payload (JSON unless a codec says otherwise).
    pub payload: Bytes,
    /// Metadata.
    pub metadata: Metadata,
}

/// The largest event (payload, type and metadata) a store accepts unless configured
/// otherwise: 512 KiB, below the batch size that the ScyllaDB test node refuses (640 KiB) and
/// far above what an event of a domain needs. Larger blobs belong in an object store, with
/// their key in the event.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 512 << 10;

impl NewEvent {
    /// The bytes this event takes in a store: payload, type name and metadata (its JSON size,
    /// estimated without encoding it).
    pub fn stored_len(&self) -> usize {
        let m = &self.metadata;
        let ids = [m.correlation_id, m.causation_id, m.command_id]
            .iter()
            .flatten()
            .count()
            * 56;
        let user: usize = m.user.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
        self.payload.len() + self.event_type.len() + ids + user + 16
    }

    /// Refuses (with [`Error::TooLarge`]) an event over `max` bytes
    /// by [`stored_len`](Self::stored_len); every store checks its events with it before it
    /// writes anything.
    ///
    /// ```
    /// use keel::{NewEvent, StreamId};
    /// let big = NewEvent::new("Uploaded", 1, vec![b'x'; 2_000]);
    /// assert!(big.check_size(&StreamId::new("doc-1"), 1_000).is_err());
    /// assert!(big.check_size(&StreamId::new("doc-1"), 4_000).is_ok());
    /// ```
    pub fn check_size(&self, stream: &StreamId, max: usize) -> crate::Result<()> {
        let bytes = self.stored_len();
        if bytes > max {
            return Err(crate::Error::TooLarge {
                stream: stream.clone(),
                event_type: self.event_type.to_string(),
                bytes,
                max,
            });
        }
        Ok(())
    }

    /// An event from raw parts, with a fresh id and empty metadata.
    pub fn new(event_type: &str, schema_version: u32, payload: impl Into<Bytes>) -> Self {
        NewEvent {
            event_id: Uuid::new_v4(),
            event_type: Arc::from(event_type),
            schema_version,
            payload: payload.into(),
            metadata: Metadata::default(),
        }
    }

    /// Encodes a domain event as JSON.
    pub fn encode<E: DomainEvent>(event: &E, metadata: Metadata) -> Result<Self> {
        let payload = encode_json(event).map_err(|e| Error::Encode {
            what: format!("event `{}`", event.event_type()),
            reason: e.to_string(),
        })?;
        Ok(NewEvent {
            event_id: Uuid::new_v4(),
            event_type: intern(event.event_type()),
            schema_version: event.schema_version(),
            payload,
            metadata,
        })
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// An event as a store holds it: a [`NewEvent`] plus its place in its stream and in the feed.
///
/// Clones are cheap (shared strings and bytes).
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedEvent {
    /// Unique id of this event.
    pub event_id: Uuid,
    /// The stream it belongs to.
    pub stream: StreamId,
    /// Its version in the stream (1-based).
    pub version: u64,
    /// Its position in its feed slice (1-based), when read from the feed. Events read from a
    /// stream carry it where the store knows it at that point (`None` otherwise).
    pub position: Option<u64>,
    /// The feed slice it is in ([`slice_of`](crate::feed::slice_of) its stream): meaningful
    /// with `position`.
    pub slice: u32,
    /// When the store recorded it, in milliseconds since the Unix epoch.
    pub recorded_at: i64,
    /// Stable type name.
    pub event_type: Arc<str>,
    /// Schema version of the payload.
    pub schema_version: u32,
    /// Encoded payload.
    pub payload: Bytes,
    /// Metadata.
    pub metadata: Arc<Metadata>,
    /// Why the payload could not be opened, when read through a
    /// [`Codec`](crate::codec::Codec) that could not decrypt or decompress it (its subject was
    /// shredded, it was tampered with). Decoding such an event gives the matching error.
    pub unreadable: Option<Box<crate::codec::Unreadable>>,
}

impl RecordedEvent {
    /// Records a new event at a version (and optionally a feed position), stamped now.
    pub fn record(stream: StreamId, version: u64, position: Option<u64>, event: NewEvent) -> Self {
        RecordedEvent {
            event_id: event.event_id,
            stream,
            version,
            position,
            slice: 0,
            recorded_at: now_millis(),
            event_type: event.event_type,
            schema_version: event.schema_version,
            payload: event.payload,
            metadata: Arc::new(event.metadata),
            unreadable: None,
        }
    }

    /// Whether the event's subject was crypto-shredded (its payload can no longer be read).
    pub fn is_shredded(&self) -> bool {
        matches!(
            self.unreadable.as_deref(),
            Some(crate::codec::Unreadable::Shredded { .. })
        )
    }

    /// The payload's JSON: the payload itself unless a codec encoded it (compressed payloads
    /// read without a codec are decompressed here). An unreadable payload gives its error
    /// ([`Error::Shredded`], [`Error::Tampered`], [`Error::Corrupt`]).
    pub fn json(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        if let Some(why) = &self.unreadable {
            return Err(why.to_error(self));
        }
        crate::codec::plain_json(&self.payload).map_err(|why| why.to_error(self))
    }
}

impl RecordedEvent {
    /// Decodes the payload into a domain event (no upcasting; see
    /// [`Upcasters::decode`](crate::Upcasters::decode) for that). A failure names the stream,
    /// version and event type.
    pub fn decode<E: DomainEvent>(&self) -> Result<E> {
        if let Some(why) = &self.unreadable {
            return Err(why.to_error(self));
        }
        crate::upcast::decode_json(self, &self.payload)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The outcome of a successful append.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendResult {
    /// Version of the first appended event.
    pub first_version: u64,
    /// Version of the last appended event: the stream's version now.
    pub last_version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value whose `Serialize` encodes another value with the same per-thread buffer.
    struct Nested(u32);

    impl Serialize for Nested {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            let inner = encode_json(&self.0).map_err(serde::ser::Error::custom)?;
            s.serialize_str(std::str::from_utf8(&inner).map_err(serde::ser::Error::custom)?)
        }
    }

    #[test]
    fn encoded_json_is_exact_and_survives_reentry_and_large_values() {
        let small = encode_json(&vec![1, 2, 3]).unwrap();
        assert_eq!(&small[..], b"[1,2,3]");
        // Re-entered from a Serialize impl: the inner value takes another buffer.
        assert_eq!(&encode_json(&Nested(42)).unwrap()[..], b"\"42\"");
        // Past the kept size, and the next small value still comes out alone.
        let large = "x".repeat(100_000);
        assert_eq!(encode_json(&large).unwrap().len(), large.len() + 2);
        assert_eq!(&encode_json(&7).unwrap()[..], b"7");
    }
}
