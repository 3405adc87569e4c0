//! The memory store under contention from several threads: appends to shared streams, with
//! and without an expected version, leave every stream and the feed dense, in order, and
//! without duplicates. (Events are built before the store's locks are taken and only numbered
//! under them; this is what that must not break.)

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::TryStreamExt;
use keel::{Error, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use keel_memory::MemoryStore;

const THREADS: usize = 8;
const APPENDS: usize = 1_000;
const STREAMS: usize = 16;

fn event(thread: usize, n: usize) -> NewEvent {
    NewEvent::new(
        "Noted",
        1,
        format!("{{\"Noted\":[{thread},{n}]}}").into_bytes(),
    )
}

#[test]
fn many_threads_on_shared_streams_leave_streams_and_feed_dense() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let streams: Vec<StreamId> = (0..STREAMS)
        .map(|s| StreamId::new(format!("shared-{s}")))
        .collect();
    let committed: usize = rt.block_on(async {
        let tasks: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, streams) = (store.clone(), streams.clone());
                tokio::spawn(async move {
                    let mut committed = 0;
                    for n in 0..APPENDS {
                        let stream = &streams[(t * 7 + n) % STREAMS];
                        let events = vec![event(t, n), event(t, n)];
                        if n % 2 == 0 {
                            store
                                .append(stream, ExpectedVersion::Any, events)
                                .await
                                .unwrap();
                            committed += 2;
                        } else {
                            // An exact expectation: a lost race is a typed conflict, never
                            // a half-written append.
                            let at = store.stream_version(stream).await.unwrap().unwrap_or(0);
                            match store
                                .append(stream, ExpectedVersion::from_version(at), events)
                                .await
                            {
                                Ok(_) => committed += 2,
                                Err(Error::Conflict { .. }) => {}
                                Err(e) => panic!("unexpected error: {e}"),
                            }
                        }
                        if n % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    committed
                })
            })
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await.unwrap();
        }
        total
    });

    rt.block_on(async {
        let feed: Vec<RecordedEvent> = store
            .read_feed(&keel::Cursor::new())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            feed.len(),
            committed,
            "every committed event is in the feed"
        );
        // Each slice read in position order from 1, with no gap.
        let mut by_slice: HashMap<u32, Vec<u64>> = HashMap::new();
        for e in &feed {
            by_slice
                .entry(e.slice)
                .or_default()
                .push(e.position.unwrap());
        }
        for (slice, positions) in &by_slice {
            let n = positions.len() as u64;
            assert_eq!(
                positions,
                &(1..=n).collect::<Vec<_>>(),
                "slice {slice} dense"
            );
        }
        let heads = store.feed_heads().await.unwrap();
        assert_eq!(
            heads.total(),
            committed as u64,
            "the heads count every event"
        );
        let ids: HashSet<_> = feed.iter().map(|e| e.event_id).collect();
        assert_eq!(ids.len(), committed, "none twice");
        let mut by_stream: HashMap<&StreamId, Vec<u64>> = HashMap::new();
        for e in &feed {
            by_stream.entry(&e.stream).or_default().push(e.version);
        }
        for stream in &streams {
            let in_feed = by_stream.remove(stream).unwrap_or_default();
            let n = in_feed.len() as u64;
            assert_eq!(in_feed, (1..=n).collect::<Vec<_>>(), "`{stream}` in order");
            let stored: Vec<RecordedEvent> =
                store.read_stream(stream, 1).try_collect().await.unwrap();
            let versions: Vec<u64> = stored.iter().map(|e| e.version).collect();
            assert_eq!(versions, (1..=n).collect::<Vec<_>>(), "`{stream}` dense");
            // The two events of one append are adjacent and carry the same payload.
            for pair in stored.chunks(2) {
                assert_eq!(pair.len(), 2, "appends are whole");
                assert_eq!(
                    pair[0].payload, pair[1].payload,
                    "appends are not interleaved"
                );
            }
        }
    });
}
