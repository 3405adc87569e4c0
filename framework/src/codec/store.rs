//! Stores wrapped by a [`Codec`]: the same traits, with payloads encoded on the way in and
//! decoded on the way out.

use std::sync::Arc;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};

use super::{is_envelope, Codec, Context, Unreadable};
use crate::ending::{Deletion, Ended, StreamInfo};
use crate::error::{Error, Result};
use crate::event::{AppendResult, ExpectedVersion, NewEvent, StreamId};
use crate::store::{EventPage, EventStore, EventStream, PageStream, Snapshot, SnapshotStore};

/// An [`EventStore`] whose payloads pass through a [`Codec`] (see [`Codec::events`]).
///
/// Events that cannot be opened (shredded, tampered, corrupt) are still read, marked with
/// [`RecordedEvent::unreadable`](crate::RecordedEvent::unreadable); decoding one gives the
/// matching error.
pub struct EncodedEvents {
    inner: Arc<dyn EventStore>,
    codec: Arc<Codec>,
}

impl EncodedEvents {
    /// `inner` behind `codec`.
    pub fn new(inner: Arc<dyn EventStore>, codec: Arc<Codec>) -> Self {
        EncodedEvents { inner, codec }
    }

    /// The store underneath, which reads payloads as stored.
    pub fn inner(&self) -> &Arc<dyn EventStore> {
        &self.inner
    }

    /// The codec.
    pub fn codec(&self) -> &Arc<Codec> {
        &self.codec
    }

    async fn open_page(&self, page: EventPage) -> Result<EventPage> {
        if !page.iter().any(|e| is_envelope(&e.payload)) {
            return Ok(page);
        }
        let mut opened = Vec::with_capacity(page.len());
        for event in page.iter() {
            opened.push(self.codec.open_event(event.clone()).await?);
        }
        Ok(EventPage::from(opened))
    }
}

#[async_trait]
impl EventStore for EncodedEvents {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        mut events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        for event in &mut events {
            let context = Context::Event {
                stream,
                event_id: event.event_id,
                event_type: &event.event_type,
            };
            let plain = std::mem::take(&mut event.payload);
            event.payload = self.codec.seal(context, plain).await?;
        }
        self.inner.append(stream, expected, events).await
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> EventStream<'a> {
        self.inner
            .read_stream(stream, from_version)
            .and_then(move |event| self.codec.open_event(event))
            .boxed()
    }

    fn read_stream_pages<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> PageStream<'a> {
        self.inner
            .read_stream_pages(stream, from_version)
            .and_then(move |page| self.open_page(page))
            .boxed()
    }

    fn feed_slices(&self) -> u32 {
        self.inner.feed_slices()
    }

    fn read_slice(&self, slice: u32, from_position: u64) -> EventStream<'_> {
        self.inner
            .read_slice(slice, from_position)
            .and_then(move |event| self.codec.open_event(event))
            .boxed()
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<u64>> {
        self.inner.stream_version(stream).await
    }

    async fn feed_heads(&self) -> Result<crate::Cursor> {
        self.inner.feed_heads().await
    }

    async fn fed_position(&self, stream: &StreamId, version: u64) -> Result<Option<u64>> {
        self.inner.fed_position(stream, version).await
    }

    fn cache_epoch(&self) -> u64 {
        self.inner.cache_epoch() + self.codec.shreds()
    }

    // Endings go to the store underneath: their notices carry no personal data, so they are
    // never sealed, and the store appends them itself.
    async fn stream_info(&self, stream: &StreamId) -> Result<StreamInfo> {
        self.inner.stream_info(stream).await
    }

    async fn delete_stream(&self, stream: &StreamId, deletion: Deletion) -> Result<Ended> {
        self.inner.delete_stream(stream, deletion).await
    }

    async fn truncate_stream(&self, stream: &StreamId, before: u64) -> Result<Ended> {
        self.inner.truncate_stream(stream, before).await
    }

    async fn archive_stream(&self, stream: &StreamId) -> Result<Ended> {
        self.inner.archive_stream(stream).await
    }

    fn read_archive<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> EventStream<'a> {
        self.inner
            .read_archive(stream, from_version)
            .and_then(move |event| self.codec.open_event(event))
            .boxed()
    }
}

/// A [`SnapshotStore`] whose payloads pass through a [`Codec`] (see [`Codec::snapshots`]).
///
/// A snapshot that cannot be opened loads as an error ([`Error::Shredded`],
/// [`Error::Tampered`], [`Error::Corrupt`]); the repository then replays the stream instead.
pub struct EncodedSnapshots {
    inner: Arc<dyn SnapshotStore>,
    codec: Arc<Codec>,
}

impl EncodedSnapshots {
    /// `inner` behind `codec`.
    pub fn new(inner: Arc<dyn SnapshotStore>, codec: Arc<Codec>) -> Self {
        EncodedSnapshots { inner, codec }
    }
}

#[async_trait]
impl SnapshotStore for EncodedSnapshots {
    async fn save_snapshot(&self, mut snapshot: Snapshot) -> Result<()> {
        let context = Context::Snapshot {
            stream: &snapshot.stream,
            version: snapshot.version,
        };
        snapshot.payload = self.codec.seal(context, snapshot.payload.clone()).await?;
        self.inner.save_snapshot(snapshot).await
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        let Some(mut snapshot) = self.inner.load_snapshot(stream).await? else {
            return Ok(None);
        };
        let context = Context::Snapshot {
            stream,
            version: snapshot.version,
        };
        match self.codec.open(context, &snapshot.payload).await? {
            Ok(plain) => {
                snapshot.payload = plain;
                Ok(Some(snapshot))
            }
            Err(why @ Unreadable::Sealed { .. }) => Err(Error::store(
                "codec",
                format!("load_snapshot({stream})"),
                format!("{why:?}: this codec does not decrypt"),
            )),
            // Named like an event's error, at the snapshot's version.
            Err(why) => Err(why.error_at(
                stream,
                snapshot.version,
                "snapshot",
                snapshot.schema_version,
            )),
        }
    }
}
