//! Conformance cases for a store's [`KeyStore`] and for payload codecs over the store:
//! round trips, crypto-shredding, tampering.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;

use super::projections::ProjectionHost;
use super::{counter_events, fresh_stream, wait_for_feed};
use crate::codec::{Codec, KeyStore};
use crate::doc::{Counter, CounterEvent};
use crate::error::{BoxError, Error};
use crate::event::{ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use crate::projection::{Generations, Projection, ProjectionManager, ProjectionState};
use crate::repository::{Repository, SnapshotPolicy};
use crate::store::{EventStore, Snapshot, SnapshotStore};

/// Everything a store needs for the codec cases.
pub trait CodecHost: ProjectionHost + SnapshotStore + KeyStore {}
impl<S: ProjectionHost + SnapshotStore + KeyStore> CodecHost for S {}

fn subject() -> String {
    format!("subject-{}", uuid::Uuid::new_v4().simple())
}

/// A JSON payload of about 2 KB that compresses well.
fn big_event() -> NewEvent {
    let text = "the quick brown fox jumps over the lazy dog; ".repeat(48);
    let json = serde_json::json!({ "Noted": { "text": text } });
    NewEvent::new("Noted", 1, serde_json::to_vec(&json).expect("json encodes"))
}

/// Every codec the round trip runs: compression only, encryption only, both.
fn codecs<S: CodecHost>(store: &Arc<S>) -> Vec<(&'static str, Arc<Codec>)> {
    vec![
        ("lz4", Codec::builder().compress_above(64).build()),
        (
            "aes-gcm",
            Codec::builder().encrypt_streams(store.clone()).build(),
        ),
        (
            "lz4+aes-gcm",
            Codec::builder()
                .compress_above(64)
                .encrypt_streams(store.clone())
                .build(),
        ),
    ]
}

/// A subject's key is created once and then always the same, also for concurrent callers;
/// subjects do not share keys.
pub async fn keys_are_stable_per_subject<S: CodecHost>(store: Arc<S>) {
    let s = subject();
    assert_eq!(store.find_key(&s).await.unwrap(), None, "no key yet");
    let racers = (0..16).map(|_| {
        let store = store.clone();
        let s = s.clone();
        tokio::spawn(async move { store.key_for(&s).await.unwrap() })
    });
    let keys: Vec<_> = futures::future::try_join_all(racers).await.unwrap();
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "concurrent key_for calls agree"
    );
    assert_eq!(store.key_for(&s).await.unwrap(), keys[0]);
    assert_eq!(store.find_key(&s).await.unwrap().as_ref(), Some(&keys[0]));
    let other = store.key_for(&subject()).await.unwrap();
    assert_ne!(other.id(), keys[0].id());
    assert_ne!(other.material(), keys[0].material());
}

/// Shredding deletes the key and records its id as shredded; a key made afterwards is a new
/// one.
pub async fn shredding_deletes_the_key<S: CodecHost>(store: Arc<S>) {
    let s = subject();
    let first = store.key_for(&s).await.unwrap();
    assert!(!store.was_shredded(first.id()).await.unwrap());
    assert!(store.shred(&s).await.unwrap(), "there was a key");
    assert_eq!(store.find_key(&s).await.unwrap(), None);
    assert!(store.was_shredded(first.id()).await.unwrap());
    assert!(!store.shred(&s).await.unwrap(), "nothing left to shred");
    let second = store.key_for(&s).await.unwrap();
    assert_ne!(second.id(), first.id());
    assert!(!store.was_shredded(second.id()).await.unwrap());
    assert!(!store.was_shredded(uuid::Uuid::new_v4()).await.unwrap());
}

/// Through each codec, events (by stream, by page, from the feed), snapshots and aggregates
/// read back as written, while the store holds them encoded.
pub async fn codec_round_trips<S: CodecHost>(store: Arc<S>) {
    for (name, codec) in codecs(&store) {
        let encoded = codec.events(store.clone());
        let stream = fresh_stream("codec");
        let mut written = counter_events(&[7]);
        written.push(big_event());
        let from = store.feed_heads().await.unwrap();
        encoded
            .append(&stream, ExpectedVersion::NoStream, written.clone())
            .await
            .unwrap();

        let read: Vec<RecordedEvent> = encoded.read_stream(&stream, 1).try_collect().await.unwrap();
        let paged: Vec<RecordedEvent> = encoded
            .read_stream_pages(&stream, 1)
            .map_ok(|page| page.to_vec())
            .try_concat()
            .await
            .unwrap();
        let fed = wait_for_feed(&*encoded, &from, &[&stream], 2).await;
        for events in [&read, &paged, &fed] {
            assert_eq!(events.len(), 2, "{name}");
            for (event, original) in events.iter().zip(&written) {
                assert_eq!(event.unreadable, None, "{name}");
                assert_eq!(
                    event.payload, original.payload,
                    "{name}: payload round trip"
                );
                assert_eq!(event.event_id, original.event_id, "{name}");
            }
        }
        assert_eq!(
            read[0].decode::<CounterEvent>().unwrap(),
            CounterEvent::Incremented { by: 7 }
        );

        let raw: Vec<RecordedEvent> = store.read_stream(&stream, 1).try_collect().await.unwrap();
        assert_eq!(raw[1].payload[0], 0, "{name}: the store holds an envelope");
        if name.contains("lz4") {
            assert!(
                raw[1].payload.len() < written[1].payload.len() / 2,
                "{name}: compressed to {} of {} bytes",
                raw[1].payload.len(),
                written[1].payload.len()
            );
        }
        if name.contains("aes") {
            let plain = String::from_utf8_lossy(&raw[1].payload);
            assert!(
                !plain.contains("quick brown fox"),
                "{name}: plaintext stored"
            );
            assert!(
                raw[0].payload[0] == 0,
                "{name}: small events are encrypted too"
            );
        }

        let snapshots = codec.snapshots(store.clone());
        let snapshot = Snapshot {
            stream: stream.clone(),
            version: 2,
            schema_version: 1,
            payload: big_event().payload,
            taken_at: 0,
            recent_commands: Some(vec![uuid::Uuid::new_v4()]),
        };
        snapshots.save_snapshot(snapshot.clone()).await.unwrap();
        assert_eq!(
            snapshots.load_snapshot(&stream).await.unwrap(),
            Some(snapshot.clone())
        );
        let raw_snapshot = store.load_snapshot(&stream).await.unwrap().unwrap();
        assert_eq!(
            raw_snapshot.payload[0], 0,
            "{name}: snapshot stored encoded"
        );

        let counters = Repository::<Counter>::builder(encoded.clone())
            .cache(0, None) // every command loads: the snapshot path is under test
            .snapshots(snapshots.clone(), SnapshotPolicy::Every(2))
            .build();
        let id = uuid::Uuid::new_v4().simple().to_string();
        for by in [1, 2, 3] {
            counters.execute(&id, by).await.unwrap();
        }
        let loaded = counters.load(&id).await.unwrap();
        assert_eq!((loaded.state.value, loaded.version), (6, 3), "{name}");
        // The snapshot at version 2 decodes: the third command and the load start from it.
        assert_eq!(counters.metrics().snapshot_hits, 2, "{name}: snapshot used");
    }
}

/// After a subject is shredded its events read as [`Error::Shredded`] (by stream and from the
/// feed), its snapshots do not load, other subjects are untouched, and new events of the
/// subject use a new key.
pub async fn shredded_events_read_as_shredded<S: CodecHost>(store: Arc<S>) {
    let codec = Codec::builder().encrypt_streams(store.clone()).build();
    let encoded = codec.events(store.clone());
    let snapshots = codec.snapshots(store.clone());
    let counters = Repository::<Counter>::builder(encoded.clone())
        .snapshots(snapshots.clone(), SnapshotPolicy::Every(1))
        .build();
    let (gone, kept) = (
        uuid::Uuid::new_v4().simple().to_string(),
        uuid::Uuid::new_v4().simple().to_string(),
    );
    let from = store.feed_heads().await.unwrap();
    for id in [&gone, &kept] {
        counters.execute(id, 2).await.unwrap();
        counters.execute(id, 3).await.unwrap();
    }
    let gone_stream = StreamId::new(format!("counter-{gone}"));
    let kept_stream = StreamId::new(format!("counter-{kept}"));

    assert!(codec.shred(gone_stream.as_str()).await.unwrap());
    match counters.load(&gone).await {
        Err(Error::Shredded {
            stream,
            version,
            event_type,
            subject,
        }) => {
            assert_eq!(
                (stream, version, event_type.as_str(), subject.as_str()),
                (gone_stream.clone(), 1, "Incremented", gone_stream.as_str())
            );
        }
        other => panic!("a shredded aggregate loads as Shredded, got {other:?}"),
    }
    assert!(snapshots
        .load_snapshot(&gone_stream)
        .await
        .unwrap_err()
        .is_shredded());
    assert_eq!(counters.load(&kept).await.unwrap().state.value, 5);

    let fed = wait_for_feed(&*encoded, &from, &[&gone_stream, &kept_stream], 4).await;
    for event in &fed {
        assert_eq!(
            event.is_shredded(),
            event.stream == gone_stream,
            "{event:?}"
        );
    }

    encoded
        .append(
            &gone_stream,
            ExpectedVersion::Exact(2),
            counter_events(&[9]),
        )
        .await
        .unwrap();
    let after: Vec<RecordedEvent> = encoded
        .read_stream(&gone_stream, 1)
        .try_collect()
        .await
        .unwrap();
    let readable: Vec<bool> = after
        .iter()
        .map(|e| e.decode::<CounterEvent>().is_ok())
        .collect();
    assert_eq!(
        readable,
        [false, false, true],
        "old events stay shredded, new ones read"
    );
}

/// A projection over a codec store skips shredded events and keeps going, live and in a
/// rebuild from scratch.
pub async fn projections_skip_shredded_events<S: CodecHost>(store: Arc<S>) {
    let codec = Codec::builder().encrypt_streams(store.clone()).build();
    let encoded = codec.events(store.clone());
    let prefix = format!("shred{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let streams: Vec<StreamId> = (0..3).map(|_| fresh_stream(&prefix)).collect();
    let from = store.feed_heads().await.unwrap();
    for s in &streams {
        encoded
            .append(s, ExpectedVersion::NoStream, counter_events(&[1, 2]))
            .await
            .unwrap();
    }
    let refs: Vec<&StreamId> = streams.iter().collect();
    wait_for_feed(&*encoded, &from, &refs, 6).await;
    codec.shred(streams[1].as_str()).await.unwrap();

    let totals = Arc::new(Totals {
        name: format!("{prefix}-totals"),
        prefix: prefix.clone(),
        model: Generations::default(),
    });
    let manager =
        ProjectionManager::builder(encoded.clone(), store.clone(), store.clone(), store.clone())
            .projection(totals.clone())
            .batch_size(4)
            .lease_ttl(Duration::from_secs(2))
            .poll_interval(Duration::from_millis(20))
            .build();
    let status = manager.catch_up(&totals.name).await.unwrap();
    assert_eq!(status.state, ProjectionState::Running, "{status:?}");
    assert_eq!(status.last_error, None);
    let mut expected = vec![(streams[0].to_string(), 3), (streams[2].to_string(), 3)];
    expected.sort();
    assert_eq!(totals.sums(), expected);
    manager.stop().await;
}

/// Sums each stream's increments; decoding errors (a shredded event) propagate with `?`.
struct Totals {
    name: String,
    prefix: String,
    model: Generations<std::collections::BTreeMap<String, u64>>,
}

impl Totals {
    fn sums(&self) -> Vec<(String, u64)> {
        self.model.read(|m| m.clone().into_iter().collect())
    }
}

#[async_trait]
impl Projection for Totals {
    fn name(&self) -> &str {
        &self.name
    }
    async fn apply(&self, generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        if !event.stream.as_str().starts_with(&self.prefix) {
            return Ok(());
        }
        let CounterEvent::Incremented { by } = event.decode()?;
        self.model.update(generation, |m| {
            *m.entry(event.stream.to_string()).or_default() += by;
        });
        Ok(())
    }
    async fn reset(&self, generation: u64) -> Result<(), BoxError> {
        self.model.reset(generation);
        Ok(())
    }
    async fn activate(&self, generation: u64) -> Result<(), BoxError> {
        self.model.activate(generation);
        Ok(())
    }
}

/// An altered ciphertext, a payload copied onto another event, a truncated envelope, a
/// compressed payload claiming an absurd size and an altered key reference (key id or subject)
/// are typed errors naming the event; reading goes on past them and nothing panics.
pub async fn tampered_payloads_are_detected<S: CodecHost>(store: Arc<S>) {
    let codec = Codec::builder()
        .compress_above(64)
        .encrypt_streams(store.clone())
        .build();
    let encoded = codec.events(store.clone());
    let stream = fresh_stream("tamper");
    let original = big_event();
    encoded
        .append(&stream, ExpectedVersion::NoStream, vec![original.clone()])
        .await
        .unwrap();
    let raw: Vec<RecordedEvent> = store.read_stream(&stream, 1).try_collect().await.unwrap();
    let sealed = raw[0].payload.clone();

    let mut flipped = sealed.to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    let bad = |payload: Bytes| NewEvent {
        event_id: original.event_id,
        ..NewEvent::new("Noted", 1, payload)
    };
    let mut claims_4gib = vec![0u8, 1, 1, 0xff, 0xff, 0xff, 0xff];
    claims_4gib.extend_from_slice(&[0x10; 32]);
    // The key reference altered: another key id, or another subject (one letter changed).
    let key_id = store.find_key(stream.as_str()).await.unwrap().unwrap().id();
    let altered = |find: &[u8]| {
        let at = sealed
            .windows(find.len())
            .position(|w| w == find)
            .expect("the envelope holds the key reference");
        let mut changed = sealed.to_vec();
        changed[at + find.len() - 1] ^= 0x01;
        Bytes::from(changed)
    };
    let other_key = altered(key_id.as_bytes());
    let other_subject = altered(stream.as_str().as_bytes());
    store
        .append(
            &stream,
            ExpectedVersion::Exact(1),
            vec![
                bad(Bytes::from(flipped)),
                bad(sealed.slice(..12)),
                bad(Bytes::from(claims_4gib)),
                bad(other_key),
                bad(other_subject),
            ],
        )
        .await
        .unwrap();
    let moved = fresh_stream("tamper");
    store
        .append(&moved, ExpectedVersion::NoStream, vec![bad(sealed.clone())])
        .await
        .unwrap();

    let read: Vec<RecordedEvent> = encoded.read_stream(&stream, 1).try_collect().await.unwrap();
    assert_eq!(read.len(), 6, "reading goes on past unreadable events");
    assert_eq!(read[0].payload, original.payload);
    let kinds: Vec<&str> = read[1..]
        .iter()
        .map(|e| {
            let (kind, s, version, event_type) = match e.json().unwrap_err() {
                Error::Tampered {
                    stream,
                    version,
                    event_type,
                    ..
                } => ("tampered", stream, version, event_type),
                Error::Corrupt {
                    stream,
                    version,
                    event_type,
                    ..
                } => ("corrupt", stream, version, event_type),
                other => panic!("expected Tampered or Corrupt, got {other}"),
            };
            assert_eq!(
                (&s, version, event_type.as_str()),
                (&stream, e.version, "Noted"),
                "the error names the event"
            );
            kind
        })
        .collect();
    // An altered key reference is not mistaken for a shredded key (projections skip those).
    assert_eq!(
        kinds,
        ["tampered", "corrupt", "corrupt", "tampered", "tampered"]
    );

    let copied: Vec<RecordedEvent> = encoded.read_stream(&moved, 1).try_collect().await.unwrap();
    assert!(
        matches!(copied[0].json(), Err(Error::Tampered { .. })),
        "a payload copied onto another stream does not open"
    );
}
