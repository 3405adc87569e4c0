//! Properties of the payload codecs over the memory store: any payload round-trips, and any
//! stored bytes read back as a payload or a typed error. (Random histories of appends are a
//! conformance case, `random_histories_match_a_model`, which this store runs too.)

use futures::TryStreamExt;
use keel::{EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use keel_memory::MemoryStore;
use proptest::prelude::*;

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
