//! Payload codecs on the memory store: what is stored, what reads without a codec, and
//! robustness against every single-byte change and truncation of a sealed payload.

use std::sync::Arc;

use futures::TryStreamExt;
use keel::codec::Codec;
use keel::config::KeelConfig;
use keel::doc::CounterEvent;
use keel::{Error, EventStore, ExpectedVersion, Metadata, NewEvent, RecordedEvent, StreamId};
use keel_memory::MemoryStore;

fn stream(name: &str) -> StreamId {
    StreamId::new(format!("{name}-{}", uuid::Uuid::new_v4().simple()))
}

fn counter(by: u64) -> NewEvent {
    NewEvent::encode(&CounterEvent::Incremented { by }, Metadata::default()).unwrap()
}

fn noted(len: usize) -> NewEvent {
    let json = serde_json::json!({ "Noted": { "text": "abcdefgh".repeat(len / 8) } });
    NewEvent::new("Noted", 1, serde_json::to_vec(&json).unwrap())
}

async fn raw(store: &MemoryStore, stream: &StreamId) -> Vec<RecordedEvent> {
    store.read_stream(stream, 1).try_collect().await.unwrap()
}

#[tokio::test]
async fn payloads_below_the_threshold_are_stored_as_plain_json() {
    let store = Arc::new(MemoryStore::new());
    let codec = Codec::builder().compress_above(1024).build();
    let s = stream("plain");
    let events = vec![counter(1), noted(512)];
    codec
        .events(store.clone())
        .append(&s, ExpectedVersion::NoStream, events.clone())
        .await
        .unwrap();
    let stored = raw(&store, &s).await;
    assert_eq!(stored[0].payload, events[0].payload);
    assert_eq!(stored[1].payload, events[1].payload);
}

#[tokio::test]
async fn compressed_payloads_read_as_json_without_the_codec() {
    let store = Arc::new(MemoryStore::new());
    let codec = Codec::builder().compress_above(64).build();
    let s = stream("lz4");
    let event = noted(4096);
    codec
        .events(store.clone())
        .append(&s, ExpectedVersion::NoStream, vec![event.clone()])
        .await
        .unwrap();
    let stored = raw(&store, &s).await;
    assert!(
        stored[0].payload.len() < 300,
        "{} bytes",
        stored[0].payload.len()
    );
    assert_eq!(&*stored[0].json().unwrap(), &event.payload[..]);
    // `decode` keeps to plain JSON (its hot path stays one serde call) and says what to do.
    let err = stored[0].decode::<CounterEvent>().unwrap_err();
    assert!(err.to_string().contains("RecordedEvent::json"), "{err}");
}

#[tokio::test]
async fn encrypted_payloads_read_without_the_codec_name_the_event_and_subject() {
    let store = Arc::new(MemoryStore::new());
    let codec = Codec::builder().encrypt_streams(store.clone()).build();
    let s = stream("sealed");
    codec
        .events(store.clone())
        .append(&s, ExpectedVersion::NoStream, vec![counter(3)])
        .await
        .unwrap();
    let stored = raw(&store, &s).await;
    let err = stored[0].decode::<CounterEvent>().unwrap_err();
    assert!(matches!(err, Error::Decode { version: 1, .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(s.as_str()) && text.contains("encrypted for subject"),
        "{text}"
    );
}

#[tokio::test]
async fn a_subject_function_picks_what_is_encrypted_and_under_which_key() {
    let store = Arc::new(MemoryStore::new());
    // Streams `customer-<id>` and `invoice-<id>-<n>` belong to customer <id>; others are public.
    let codec = Codec::builder()
        .encrypt_subjects(store.clone(), |s: &StreamId| {
            let mut parts = s.as_str().split('-');
            match parts.next() {
                Some("customer" | "invoice") => parts.next().map(|id| format!("customer:{id}")),
                _ => None,
            }
        })
        .build();
    let events = codec.events(store.clone());
    for name in ["customer-7", "invoice-7-1", "invoice-8-1", "catalog-1"] {
        events
            .append(&StreamId::new(name), ExpectedVersion::Any, vec![counter(1)])
            .await
            .unwrap();
    }
    assert_eq!(
        raw(&store, &StreamId::new("catalog-1")).await[0].payload[0],
        b'{'
    );
    codec.shred("customer:7").await.unwrap();
    let readable = |name: &'static str| {
        let events = events.clone();
        async move {
            let read: Vec<RecordedEvent> = events
                .read_stream(&StreamId::new(name), 1)
                .try_collect()
                .await
                .unwrap();
            read[0].decode::<CounterEvent>().is_ok()
        }
    };
    assert!(!readable("customer-7").await);
    assert!(!readable("invoice-7-1").await);
    assert!(readable("invoice-8-1").await);
    assert!(readable("catalog-1").await);
}

#[tokio::test]
async fn every_single_byte_change_or_truncation_is_refused_without_a_panic() {
    let store = Arc::new(MemoryStore::new());
    let codec = Codec::builder()
        .compress_above(16)
        .encrypt_streams(store.clone())
        .build();
    let events = codec.events(store.clone());
    let s = stream("mutate");
    let original = NewEvent::encode(
        &CounterEvent::Incremented { by: 1234567 },
        Metadata::default(),
    )
    .unwrap();
    events
        .append(&s, ExpectedVersion::NoStream, vec![original.clone()])
        .await
        .unwrap();
    let sealed = raw(&store, &s).await[0].payload.clone();

    let mut mutants: Vec<Vec<u8>> = (0..sealed.len()).map(|n| sealed[..n].to_vec()).collect();
    for i in 0..sealed.len() {
        for bit in [0x01, 0x80] {
            let mut m = sealed.to_vec();
            m[i] ^= bit;
            mutants.push(m);
        }
    }
    let count = mutants.len();
    for (i, payload) in mutants.into_iter().enumerate() {
        let target = stream("mutant");
        let event = NewEvent {
            event_id: original.event_id,
            ..NewEvent::new("Incremented", 1, payload)
        };
        // Same event id and type, but another stream: only an exact copy of the stream
        // binding could open, and the binding differs, so nothing may open.
        store
            .append(&target, ExpectedVersion::NoStream, vec![event])
            .await
            .unwrap();
        let read: Vec<RecordedEvent> = events.read_stream(&target, 1).try_collect().await.unwrap();
        assert!(
            read[0].decode::<CounterEvent>().is_err(),
            "mutant {i} of {count} decoded"
        );
    }

    // On its own stream, every single-byte change is refused too (the exact original opens).
    let mut refused = 0;
    for i in 0..sealed.len() {
        let mut m = sealed.to_vec();
        m[i] ^= 0x01;
        let event = NewEvent {
            event_id: original.event_id,
            ..NewEvent::new("Incremented", 1, m)
        };
        store
            .append(&s, ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
        let version = store.stream_version(&s).await.unwrap().unwrap();
        let read: Vec<RecordedEvent> = events.read_stream(&s, version).try_collect().await.unwrap();
        refused += read[0].decode::<CounterEvent>().is_err() as usize;
    }
    assert_eq!(refused, sealed.len());
    let first: Vec<RecordedEvent> = events.read_stream(&s, 1).try_collect().await.unwrap();
    assert_eq!(
        first[0].decode::<CounterEvent>().unwrap(),
        CounterEvent::Incremented { by: 1234567 }
    );
}

#[tokio::test]
async fn a_payload_over_the_size_limit_reads_as_corrupt() {
    let store = Arc::new(MemoryStore::new());
    let writer = Codec::builder().compress_above(64).build();
    let reader = Codec::builder().max_payload(1000).build();
    let s = stream("big");
    writer
        .events(store.clone())
        .append(&s, ExpectedVersion::NoStream, vec![noted(8192)])
        .await
        .unwrap();
    let read: Vec<RecordedEvent> = reader
        .events(store.clone())
        .read_stream(&s, 1)
        .try_collect()
        .await
        .unwrap();
    match read[0].json() {
        Err(Error::Corrupt {
            reason, version, ..
        }) => {
            assert_eq!(version, 1);
            assert!(reason.contains("limit of 1000"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn shredding_needs_an_encrypting_codec() {
    let codec = Codec::builder().compress_above(64).build();
    let err = codec.shred("alice").await.unwrap_err();
    assert!(err.to_string().contains("does not encrypt"), "{err}");
}

#[tokio::test]
async fn payload_configuration_builds_a_codec_or_names_the_field() {
    let config =
        KeelConfig::from_json(r#"{ "payloads": { "compress_above_bytes": 64, "encrypt": true } }"#)
            .unwrap();
    let err = Codec::from_config(&config.payloads, None).unwrap_err();
    assert!(err.to_string().contains("payloads.encrypt"), "{err}");

    let store = Arc::new(MemoryStore::new());
    let codec = Codec::from_config(&config.payloads, Some(store.clone())).unwrap();
    let s = stream("configured");
    codec
        .events(store.clone())
        .append(&s, ExpectedVersion::NoStream, vec![noted(1024)])
        .await
        .unwrap();
    let stored = raw(&store, &s).await;
    assert_eq!(
        &stored[0].payload[..3],
        &[0, 1, 3],
        "compressed and encrypted"
    );

    let bad = KeelConfig::from_json(r#"{ "payloads": { "max_payload_bytes": 0 } }"#).unwrap_err();
    assert!(
        bad.to_string().contains("payloads.max_payload_bytes"),
        "{bad}"
    );
    let env = KeelConfig::from_vars([(
        "KEEL_PAYLOADS_COMPRESS_ABOVE_BYTES".to_owned(),
        "512".to_owned(),
    )])
    .unwrap();
    assert_eq!(env.payloads.compress_above_bytes, Some(512));
}

#[tokio::test]
async fn the_key_cache_stays_bounded_over_many_subjects() {
    let store = Arc::new(MemoryStore::new());
    let codec = Codec::builder().encrypt_streams(store.clone()).build();
    let events = codec.events(store.clone());
    let count = keel::codec::KEY_CACHE_CAPACITY + 50;
    for i in 0..count {
        events
            .append(
                &StreamId::new(format!("many-{i}")),
                ExpectedVersion::NoStream,
                vec![counter(1)],
            )
            .await
            .unwrap();
    }
    let kept = codec.cached_keys();
    assert!(kept <= keel::codec::KEY_CACHE_CAPACITY, "{kept} keys kept");
    // Full means evicting some, not forgetting all: every miss is a key-store read (a SERIAL
    // one on ScyllaDB).
    assert!(
        kept > keel::codec::KEY_CACHE_CAPACITY / 2,
        "only {kept} keys kept after {count} subjects"
    );
    // Evicted keys are read again from the key store: the first stream still reads.
    let first: Vec<RecordedEvent> = events
        .read_stream(&StreamId::new("many-0"), 1)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        first[0].decode::<CounterEvent>().unwrap(),
        CounterEvent::Incremented { by: 1 }
    );
}
