//! Properties of the memory store over random histories, checked against a plain model: the
//! expected-version rules, dense versions and positions, and reads from any version or
//! position (by event, by page, from the feed) returning exactly the suffix.

use std::collections::HashMap;

use futures::TryStreamExt;
use keel::{EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use keel_memory::MemoryStore;
use proptest::prelude::*;

const STREAMS: usize = 4;

/// One append as generated: which stream, what it expects, how many events.
#[derive(Clone, Debug)]
struct Append {
    stream: usize,
    expected: Expect,
    events: usize,
}

/// An expectation relative to the model, so that both matching and conflicting ones occur.
#[derive(Clone, Debug)]
enum Expect {
    Any,
    NoStream,
    /// The stream's current version plus this (0: right; otherwise a conflict).
    Off(i8),
}

fn append() -> impl Strategy<Value = Append> {
    let expect = prop_oneof![
        1 => Just(Expect::Any),
        1 => Just(Expect::NoStream),
        4 => Just(Expect::Off(0)),
        1 => (-2i8..=2).prop_map(Expect::Off),
    ];
    (0..STREAMS, expect, 0usize..=4).prop_map(|(stream, expected, events)| Append {
        stream,
        expected,
        events,
    })
}

fn stream(i: usize) -> StreamId {
    StreamId::new(format!("s-{i}"))
}

/// What the model remembers of an event: its stream and payload.
type Kept = (usize, String);

fn payload(e: &RecordedEvent) -> String {
    String::from_utf8(e.payload.to_vec()).unwrap()
}

fn check(history: Vec<Append>, from_version: u64, from_position: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = MemoryStore::new();
        let mut streams: HashMap<usize, Vec<String>> = HashMap::new();
        let mut feed: Vec<Kept> = Vec::new();
        for (n, op) in history.iter().enumerate() {
            let current = streams.get(&op.stream).map_or(0, Vec::len) as u64;
            let actual = (current > 0).then_some(current);
            let expected = match op.expected {
                Expect::Any => ExpectedVersion::Any,
                Expect::NoStream => ExpectedVersion::NoStream,
                Expect::Off(d) => ExpectedVersion::Exact(current.saturating_add_signed(d.into())),
            };
            let payloads: Vec<String> = (0..op.events).map(|i| format!("\"{n}.{i}\"")).collect();
            let events = payloads
                .iter()
                .map(|p| NewEvent::new("Happened", 1, p.clone().into_bytes()))
                .collect();
            let result = store.append(&stream(op.stream), expected, events).await;
            if expected.accepts(actual) {
                let appended = result.unwrap_or_else(|e| panic!("op {n} {op:?}: {e}"));
                assert_eq!(appended.first_version, current + 1);
                assert_eq!(appended.last_version, current + op.events as u64);
                feed.extend(payloads.iter().map(|p| (op.stream, p.clone())));
                streams.entry(op.stream).or_default().extend(payloads);
            } else {
                let err = result.expect_err("a wrong expectation is refused");
                assert!(err.is_conflict(), "op {n}: {err}");
            }
        }

        for i in 0..STREAMS {
            let id = stream(i);
            let model = streams.get(&i).cloned().unwrap_or_default();
            let version = store.stream_version(&id).await.unwrap();
            assert_eq!(version, (!model.is_empty()).then_some(model.len() as u64));
            let skip = from_version.max(1) as usize - 1;
            let want: Vec<(u64, String)> = model
                .iter()
                .enumerate()
                .skip(skip)
                .map(|(v, p)| (v as u64 + 1, p.clone()))
                .collect();
            let events: Vec<RecordedEvent> = store
                .read_stream(&id, from_version)
                .try_collect()
                .await
                .unwrap();
            let got: Vec<(u64, String)> = events.iter().map(|e| (e.version, payload(e))).collect();
            assert_eq!(got, want, "read_stream({id}, {from_version})");
            let pages: Vec<_> = store
                .read_stream_pages(&id, from_version)
                .try_collect()
                .await
                .unwrap();
            let paged: Vec<(u64, String)> = pages
                .iter()
                .flat_map(|p| p.iter().map(|e| (e.version, payload(e))))
                .collect();
            assert_eq!(paged, want, "read_stream_pages({id}, {from_version})");
        }

        assert_eq!(store.feed_head().await.unwrap(), feed.len() as u64);
        let skip = from_position.max(1) as usize - 1;
        let events: Vec<RecordedEvent> = store.read_all(from_position).try_collect().await.unwrap();
        let got: Vec<(u64, String, String)> = events
            .iter()
            .map(|e| (e.position.unwrap(), e.stream.to_string(), payload(e)))
            .collect();
        let want: Vec<(u64, String, String)> = feed
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(p, (s, payload))| (p as u64 + 1, stream(*s).to_string(), payload.clone()))
            .collect();
        assert_eq!(got, want, "read_all({from_position})");
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn histories_read_back_exactly(
        history in proptest::collection::vec(append(), 0..40),
        from_version in 0u64..12,
        from_position in 0u64..40,
    ) {
        check(history, from_version, from_position);
    }
}

/// A JSON payload: a string from a small alphabet (so that it often compresses), repeated.
fn json_payload() -> impl Strategy<Value = Vec<u8>> {
    ("[a-d ]{0,40}", 0usize..64).prop_map(|(text, times)| {
        serde_json::to_vec(&serde_json::json!({ "Noted": { "text": text.repeat(times) } })).unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any payload, through any codec setting, reads back as written, and what the store
    /// holds never shows an encrypted payload's text.
    #[test]
    fn codecs_round_trip_any_payload(
        payloads in proptest::collection::vec(json_payload(), 1..6),
        compress_above in proptest::option::of(0usize..600),
        encrypt in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let store = std::sync::Arc::new(MemoryStore::new());
            let mut builder = keel::codec::Codec::builder();
            if let Some(limit) = compress_above {
                builder = builder.compress_above(limit);
            }
            if encrypt {
                builder = builder.encrypt_streams(store.clone());
            }
            let codec = builder.build();
            let encoded = codec.events(store.clone());
            let id = StreamId::new("customer-1");
            let events = payloads
                .iter()
                .map(|p| NewEvent::new("Noted", 1, p.clone()))
                .collect();
            encoded.append(&id, ExpectedVersion::NoStream, events).await.unwrap();
            let read: Vec<RecordedEvent> = encoded.read_stream(&id, 1).try_collect().await.unwrap();
            let got: Vec<&[u8]> = read.iter().map(|e| &e.payload[..]).collect();
            let want: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            assert_eq!(got, want);
            let raw: Vec<RecordedEvent> = store.read_stream(&id, 1).try_collect().await.unwrap();
            for (stored, plain) in raw.iter().zip(&payloads) {
                if encrypt && plain.len() > 24 {
                    assert!(
                        !stored.payload.windows(16).any(|w| plain.windows(16).any(|p| p == w)),
                        "no 16 bytes of the plain payload are stored as they are"
                    );
                }
            }
        });
    }

    /// Whatever bytes a store hands back, reading them through a codec and decoding them gives
    /// a payload or a typed error: it never panics.
    #[test]
    fn arbitrary_stored_bytes_never_panic(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..200),
        envelope in any::<bool>(),
    ) {
        if envelope && !bytes.is_empty() {
            bytes[0] = 0; // what marks an envelope
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let store = std::sync::Arc::new(MemoryStore::new());
            let codec = keel::codec::Codec::builder()
                .compress_above(0)
                .encrypt_streams(store.clone())
                .build();
            let id = StreamId::new("garbage");
            store
                .append(&id, ExpectedVersion::NoStream, vec![NewEvent::new("Noted", 1, bytes.clone())])
                .await
                .unwrap();
            let read: Vec<RecordedEvent> =
                codec.events(store.clone()).read_stream(&id, 1).try_collect().await.unwrap();
            let _ = read[0].json();
            let _ = read[0].decode::<keel::doc::CounterEvent>();
        });
    }
}
