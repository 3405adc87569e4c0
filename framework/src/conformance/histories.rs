//! Random histories of appends, checked against a plain model: the expected-version rules,
//! dense versions, reads from any version (by event and by page), and each stream's order in
//! the feed.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use futures::TryStreamExt;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

use super::{fresh_stream, wait_for_feed};
use crate::event::{ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use crate::store::EventStore;

/// Histories each run of [`random_histories_match_a_model`] tries.
pub const HISTORIES: u32 = 12;

/// Streams one history writes to.
const STREAMS: usize = 3;

/// One append of a history.
#[derive(Clone)]
struct Append {
    stream: usize,
    expected: Expect,
    events: usize,
}

/// An expectation relative to the model's version of the stream, so that both matching and
/// conflicting ones occur.
#[derive(Clone, Debug)]
enum Expect {
    Any,
    NoStream,
    /// The stream's current version plus this: 0 is right, anything else a conflict.
    Off(i8),
}

impl fmt::Debug for Append {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{} {:?} x{}", self.stream, self.expected, self.events)
    }
}

fn history() -> impl Strategy<Value = (Vec<Append>, u64)> {
    let expect = prop_oneof![
        1 => Just(Expect::Any),
        1 => Just(Expect::NoStream),
        4 => Just(Expect::Off(0)),
        1 => (-2i8..=2).prop_map(Expect::Off),
    ];
    let append = (0..STREAMS, expect, 0usize..=3).prop_map(|(stream, expected, events)| Append {
        stream,
        expected,
        events,
    });
    (proptest::collection::vec(append, 0..30), 0u64..10)
}

/// Applies random histories of appends ([`HISTORIES`] of them, up to 30 appends of 0 to 3
/// events over 3 fresh streams, right and wrong expectations mixed) and checks the store
/// against a model after each: every append is accepted or refused with a conflict exactly as
/// the model says, with the versions it says; the streams read back (from a random version,
/// event by event and by page) as the model holds them; and the feed holds each stream's
/// events in version order. A failure names the history.
///
/// A store with small event partitions (a ScyllaDB store with a bucket size of a few
/// versions) gets its partition boundaries crossed in every way an append can cross them.
pub async fn random_histories_match_a_model<S: EventStore>(store: Arc<S>) {
    let mut runner = TestRunner::new(Config::default());
    for _ in 0..HISTORIES {
        let (ops, from) = history()
            .new_tree(&mut runner)
            .expect("a history")
            .current();
        check(&*store, &ops, from).await;
    }
}

async fn check<S: EventStore>(store: &S, ops: &[Append], from: u64) {
    let streams: Vec<StreamId> = (0..STREAMS).map(|_| fresh_stream("history")).collect();
    let head = store.feed_heads().await.expect("feed_heads");
    let mut model: HashMap<usize, Vec<String>> = HashMap::new();
    for (n, op) in ops.iter().enumerate() {
        let context = || format!("append {n} of {ops:?}");
        let current = model.get(&op.stream).map_or(0, Vec::len) as u64;
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
        let result = store.append(&streams[op.stream], expected, events).await;
        if expected.accepts(actual) {
            let appended = result.unwrap_or_else(|e| panic!("{}: {e}", context()));
            assert_eq!(
                (appended.first_version, appended.last_version),
                (current + 1, current + op.events as u64),
                "{}",
                context()
            );
            model.entry(op.stream).or_default().extend(payloads);
        } else {
            match result {
                Err(e) if e.is_conflict() => {}
                other => panic!("{}: expected a conflict, got {other:?}", context()),
            }
        }
    }

    let mut fed = 0;
    for (i, id) in streams.iter().enumerate() {
        let held = model.get(&i).cloned().unwrap_or_default();
        fed += held.len();
        let context = || format!("stream {i} from version {from} after {ops:?}");
        let version = store.stream_version(id).await.expect("stream_version");
        assert_eq!(
            version,
            (!held.is_empty()).then_some(held.len() as u64),
            "{}",
            context()
        );
        let want: Vec<(u64, String)> = held
            .iter()
            .enumerate()
            .skip(from.max(1) as usize - 1)
            .map(|(v, p)| (v as u64 + 1, p.clone()))
            .collect();
        let events: Vec<RecordedEvent> = store
            .read_stream(id, from)
            .try_collect()
            .await
            .expect("read_stream");
        assert_eq!(versions_and_payloads(events.iter()), want, "{}", context());
        let pages: Vec<_> = store
            .read_stream_pages(id, from)
            .try_collect()
            .await
            .expect("read_stream_pages");
        let paged = versions_and_payloads(pages.iter().flat_map(|p| p.iter()));
        assert_eq!(paged, want, "by page: {}", context());
    }

    let ids: Vec<&StreamId> = streams.iter().collect();
    let feed = wait_for_feed(store, &head, &ids, fed).await;
    for (i, id) in streams.iter().enumerate() {
        let of_stream: Vec<String> = feed
            .iter()
            .filter(|e| &e.stream == id)
            .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
            .collect();
        assert_eq!(
            of_stream,
            model.get(&i).cloned().unwrap_or_default(),
            "the feed holds stream {i}'s events in version order after {ops:?}"
        );
    }
}

fn versions_and_payloads<'a>(
    events: impl Iterator<Item = &'a RecordedEvent>,
) -> Vec<(u64, String)> {
    events
        .map(|e| (e.version, String::from_utf8_lossy(&e.payload).into_owned()))
        .collect()
}
