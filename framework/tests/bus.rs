//! The command and query buses: typed dispatch, registration errors, and every layer.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel::bus::{
    CacheLayer, Command, CommandBus, MetricsLayer, Query, QueryBus, RetryLayer, TimeoutLayer,
    TraceLayer, ValidateLayer,
};
use keel::{Error, ExpectedVersion, Metadata, StreamId};

#[derive(Clone, Debug)]
struct Add(u32, u32);
impl Command for Add {
    type Output = u32;
}

#[derive(Clone, Debug)]
struct Named(String);
impl Command for Named {
    type Output = ();
    fn validate(&self) -> Result<(), String> {
        if self.0.is_empty() {
            return Err("name is empty".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Explode;
impl Command for Explode {
    type Output = ();
}

#[derive(Clone, Debug)]
struct Slow;
impl Command for Slow {
    type Output = ();
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Square(u64);
impl Query for Square {
    type Output = u64;
}

fn conflict() -> Error {
    Error::Conflict {
        stream: StreamId::new("s-1"),
        expected: ExpectedVersion::Exact(1),
        actual: Some(2),
    }
}

#[tokio::test]
async fn send_returns_the_handlers_typed_output() {
    let bus = CommandBus::builder()
        .command(|Add(a, b), _| async move { Ok(a + b) })
        .unwrap()
        .build();
    assert_eq!(bus.send(Add(2, 3)).await.unwrap(), 5);
}

#[tokio::test]
async fn missing_handler_names_the_type() {
    let bus = CommandBus::builder().build();
    match bus.send(Add(1, 1)).await {
        Err(Error::HandlerNotFound { type_name }) => assert_eq!(type_name, "Add"),
        other => panic!("expected HandlerNotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn second_registration_for_a_type_is_refused() {
    let result = CommandBus::builder()
        .command(|Add(a, b), _| async move { Ok(a + b) })
        .unwrap()
        .command(|Add(a, _), _| async move { Ok(a) });
    match result {
        Err(Error::DuplicateHandler { type_name }) => assert_eq!(type_name, "Add"),
        Err(other) => panic!("expected DuplicateHandler, got {other:?}"),
        Ok(_) => panic!("a second handler for Add was accepted"),
    }
}

#[tokio::test]
async fn a_panicking_handler_is_a_typed_error_and_the_bus_survives() {
    let bus = CommandBus::builder()
        .command(|_: Explode, _| async move {
            panic!("boom");
        })
        .unwrap()
        .command(|Add(a, b), _| async move { Ok(a + b) })
        .unwrap()
        .build();
    match bus.send(Explode).await {
        Err(Error::HandlerPanicked { type_name, message }) => {
            assert_eq!((type_name, message.as_str()), ("Explode", "boom"));
        }
        other => panic!("expected HandlerPanicked, got {other:?}"),
    }
    assert_eq!(bus.send(Add(1, 2)).await.unwrap(), 3, "the bus still works");
}

#[tokio::test]
async fn validation_refuses_before_the_handler_runs() {
    let ran = Arc::new(AtomicU32::new(0));
    let counter = ran.clone();
    let bus = CommandBus::builder()
        .layer(ValidateLayer)
        .command(move |_: Named, _| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(()) }
        })
        .unwrap()
        .build();
    match bus.send(Named(String::new())).await {
        Err(Error::Invalid { type_name, reason }) => {
            assert_eq!((type_name, reason.as_str()), ("Named", "name is empty"))
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    bus.send(Named("ada".into())).await.unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn timeout_fails_a_slow_handler_with_the_limit() {
    let bus = CommandBus::builder()
        .layer(TimeoutLayer::new(Duration::from_millis(50)))
        .command(|_: Slow, _| async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        })
        .unwrap()
        .build();
    match bus.send(Slow).await {
        Err(Error::Timeout { operation, after }) => {
            assert_eq!(
                (operation.as_str(), after),
                ("Slow", Duration::from_millis(50))
            );
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn retry_told_to_resends_on_conflict_and_gives_up_after_the_limit() {
    let attempts = Arc::new(AtomicU32::new(0));
    let seen = attempts.clone();
    // Conflicts twice, then succeeds.
    let bus = CommandBus::builder()
        .layer(RetryLayer::new(3, Duration::from_millis(1)).conflicts())
        .command(move |Add(a, b), _| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(conflict())
                } else {
                    Ok(a + b)
                }
            }
        })
        .unwrap()
        .build();
    assert_eq!(bus.send(Add(1, 1)).await.unwrap(), 2);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);

    let always = Arc::new(AtomicU32::new(0));
    let seen = always.clone();
    let bus = CommandBus::builder()
        .layer(RetryLayer::new(2, Duration::from_millis(1)).conflicts())
        .command(move |_: Add, _| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move { Err::<u32, _>(conflict()) }
        })
        .unwrap()
        .command(|_: Explode, _| async move {
            Err(Error::Invalid {
                type_name: "Explode",
                reason: "no".into(),
            })
        })
        .unwrap()
        .build();
    assert!(bus.send(Add(1, 1)).await.unwrap_err().is_conflict());
    assert_eq!(always.load(Ordering::SeqCst), 3, "one try and two retries");
    assert!(
        matches!(bus.send(Explode).await, Err(Error::Invalid { .. })),
        "other errors are not retried"
    );
}

fn unavailable() -> Error {
    Error::Unavailable {
        store: "test",
        operation: "append".into(),
        consistency: "QUORUM".into(),
        required: 2,
        alive: 1,
        reason: "two nodes down".into(),
    }
}

fn unknown() -> Error {
    Error::UnknownOutcome {
        stream: StreamId::new("s-1"),
        reason: "the coordinator went away".into(),
    }
}

/// Runs `error` through a default `RetryLayer` with 3 retries: how many times the handler
/// ran.
async fn attempts_after(error: fn() -> Error, metadata: Metadata) -> u32 {
    let attempts = Arc::new(AtomicU32::new(0));
    let seen = attempts.clone();
    let bus = CommandBus::builder()
        .layer(RetryLayer::new(3, Duration::from_millis(1)))
        .command(move |_: Add, _| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move { Err::<u32, _>(error()) }
        })
        .unwrap()
        .build();
    assert!(bus.send_with(Add(1, 1), metadata).await.is_err());
    attempts.load(Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn retry_resends_only_what_is_safe_to_send_again() {
    let plain = Metadata::default;
    let with_id = || Metadata::default().with_command_id(uuid::Uuid::new_v4());
    assert_eq!(
        attempts_after(conflict, plain()).await,
        1,
        "a conflict was retried by the repository already"
    );
    assert_eq!(
        attempts_after(unavailable, plain()).await,
        4,
        "nothing was written"
    );
    assert_eq!(
        attempts_after(unknown, plain()).await,
        1,
        "may have landed, and nothing would recognise a re-send"
    );
    assert_eq!(
        attempts_after(unknown, with_id()).await,
        4,
        "the command id makes a re-send a no-op"
    );
}

#[tokio::test]
async fn metrics_count_dispatches_and_failures_per_type() {
    let metrics = MetricsLayer::new();
    let bus = CommandBus::builder()
        .layer(TraceLayer)
        .layer(metrics.clone())
        .command(|Add(a, b), _| async move { Ok(a + b) })
        .unwrap()
        .command(|_: Explode, _| async move {
            Err(Error::Invalid {
                type_name: "Explode",
                reason: "no".into(),
            })
        })
        .unwrap()
        .build();
    bus.send(Add(1, 1)).await.unwrap();
    bus.send(Add(1, 2)).await.unwrap();
    bus.send(Explode).await.unwrap_err();
    let snapshot = metrics.snapshot();
    assert_eq!((snapshot["Add"].count, snapshot["Add"].failures), (2, 0));
    assert_eq!(
        (snapshot["Explode"].count, snapshot["Explode"].failures),
        (1, 1)
    );
}

/// A query whose `Hash` sends every value to one bucket: the worst case of a collision.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Account(String);
impl std::hash::Hash for Account {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        0u8.hash(state);
    }
}
impl Query for Account {
    type Output = String;
}

#[tokio::test]
async fn colliding_queries_get_their_own_answers() {
    let cache = CacheLayer::new(Duration::from_secs(60));
    let bus = QueryBus::builder()
        .layer(cache.clone())
        .query(|Account(owner), _| async move { Ok(format!("balance of {owner}")) })
        .unwrap()
        .build();
    assert_eq!(
        bus.ask(Account("alice".into())).await.unwrap(),
        "balance of alice"
    );
    assert_eq!(
        bus.ask(Account("bob".into())).await.unwrap(),
        "balance of bob",
        "bob's query hashes like alice's and must still get his own answer"
    );
    assert_eq!(
        bus.ask(Account("alice".into())).await.unwrap(),
        "balance of alice"
    );
    assert_eq!(cache.len(), 2, "one entry per distinct query");
}

#[tokio::test]
async fn the_query_cache_keeps_at_most_its_capacity() {
    let cache = CacheLayer::new(Duration::from_secs(60)).capacity(50);
    let bus = QueryBus::builder()
        .layer(cache.clone())
        .query(|Square(n), _| async move { Ok(n * n) })
        .unwrap()
        .build();
    for n in 0..500 {
        assert_eq!(bus.ask(Square(n)).await.unwrap(), n * n);
        assert!(cache.len() <= 50, "{} results kept", cache.len());
    }
    assert!(!cache.is_empty());
}

#[tokio::test(start_paused = true)]
async fn cache_serves_equal_queries_until_the_ttl_passes() {
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let bus = QueryBus::builder()
        .layer(CacheLayer::new(Duration::from_secs(5)))
        .query(move |Square(n), _| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move { Ok(n * n) }
        })
        .unwrap()
        .build();
    assert_eq!(bus.ask(Square(3)).await.unwrap(), 9);
    assert_eq!(bus.ask(Square(3)).await.unwrap(), 9);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the second ask was served from the cache"
    );
    assert_eq!(bus.ask(Square(4)).await.unwrap(), 16);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "another query value is another entry"
    );
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(bus.ask(Square(3)).await.unwrap(), 9);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "expired entries are fetched again"
    );
}

#[tokio::test]
async fn handlers_receive_the_senders_metadata() {
    let bus = CommandBus::builder()
        .command(|_: Add, meta: Metadata| async move {
            Ok(meta.user.get("user").map_or(0, |u| u.len() as u32))
        })
        .unwrap()
        .build();
    let meta = Metadata::correlated(uuid::Uuid::new_v4()).with("user", "ada");
    assert_eq!(bus.send_with(Add(0, 0), meta).await.unwrap(), 3);
}

#[derive(Clone, Debug)]
struct Bump(String);
impl Command for Bump {
    type Output = ();
}

#[derive(Clone, Debug)]
struct BumpTwice(String);
impl Command for BumpTwice {
    type Output = ();
}

#[tokio::test]
async fn correlation_and_causation_flow_from_commands_into_events() {
    use futures::TryStreamExt;
    use keel::{Aggregate, CommandBus as Bus, EventStore, Repository};
    let store = Arc::new(keel_memory::MemoryStore::new());
    let repo = Repository::<keel::doc::Counter>::new(store.clone());
    let bus: Arc<std::sync::OnceLock<Bus>> = Arc::default();
    // What each handler received, to follow the chain back from the stored events.
    let seen: Arc<std::sync::Mutex<Vec<Metadata>>> = Arc::default();
    let (inner, r, seen_bump, seen_twice) = (bus.clone(), repo.clone(), seen.clone(), seen.clone());
    let built = Bus::builder()
        // The handler does not pass any metadata on: the repository picks it up.
        .command(move |Bump(id), meta: Metadata| {
            seen_bump.lock().unwrap().push(meta);
            let repo = r.clone();
            async move { repo.execute(&id, 1).await.map(|_| ()) }
        })
        .unwrap()
        // A handler that sends two more commands: same conversation, each its own id.
        .command(move |BumpTwice(id), meta: Metadata| {
            seen_twice.lock().unwrap().push(meta);
            let bus = inner.clone();
            async move {
                let bus = bus.get().expect("bus built");
                bus.send(Bump(id.clone())).await?;
                bus.send(Bump(id)).await
            }
        })
        .unwrap()
        .build();
    bus.set(built).ok().unwrap();
    let bus = bus.get().unwrap();

    let conversation = uuid::Uuid::new_v4();
    bus.send_with(Bump("a".into()), Metadata::correlated(conversation))
        .await
        .unwrap();
    bus.send(Bump("a".into())).await.unwrap();
    bus.send(BumpTwice("b".into())).await.unwrap();

    let read = |id: &str| {
        let (store, stream) = (store.clone(), keel::doc::Counter::stream_id(id));
        async move {
            store
                .read_stream(&stream, 1)
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
        }
    };
    let a = read("a").await;
    assert_eq!(
        a[0].metadata.correlation_id,
        Some(conversation),
        "the sender's conversation"
    );
    assert!(
        a[1].metadata
            .correlation_id
            .is_some_and(|c| c != conversation),
        "a new conversation"
    );
    assert!(
        a.iter().all(|e| e.metadata.causation_id.is_some()),
        "every event names its command"
    );
    assert_ne!(a[0].metadata.causation_id, a[1].metadata.causation_id);
    let b = read("b").await;
    assert_eq!(b.len(), 2, "two commands of one handler are both applied");
    assert_eq!(
        b[0].metadata.correlation_id, b[1].metadata.correlation_id,
        "one conversation"
    );
    assert_ne!(
        b[0].metadata.causation_id, b[1].metadata.causation_id,
        "two commands"
    );
    // One hop back at a time: event -> the nested command -> the command whose handler sent it.
    let seen = seen.lock().unwrap();
    let by_id = |id: Option<uuid::Uuid>| {
        seen.iter()
            .find(|m| id.is_some() && m.message_id == id)
            .cloned()
            .expect("a dispatched command with that id")
    };
    for event in &b {
        let nested = by_id(event.metadata.causation_id);
        let parent = by_id(nested.causation_id);
        assert_eq!(
            parent.correlation_id, b[0].metadata.correlation_id,
            "the nested command names the command whose handler sent it"
        );
        assert_eq!(parent.causation_id, None, "sent from outside any handler");
    }
}

/// Counts its clones, to see whether the bus copies messages.
#[derive(Debug)]
struct Counted(Arc<AtomicU32>);

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.0.fetch_add(1, Ordering::SeqCst);
        Counted(self.0.clone())
    }
}

impl Command for Counted {
    type Output = ();
}

#[tokio::test]
async fn the_handler_gets_the_message_moved_unless_a_layer_may_send_it_again() {
    let clones = Arc::new(AtomicU32::new(0));
    let plain = CommandBus::builder()
        .command(|_: Counted, _| async { Ok(()) })
        .unwrap()
        .build();
    plain.send(Counted(clones.clone())).await.unwrap();
    assert_eq!(clones.load(Ordering::SeqCst), 0, "moved, not cloned");

    let retrying = CommandBus::builder()
        .layer(RetryLayer::new(2, Duration::from_millis(1)))
        .command(|_: Counted, _| async { Ok(()) })
        .unwrap()
        .build();
    retrying.send(Counted(clones.clone())).await.unwrap();
    assert_eq!(
        clones.load(Ordering::SeqCst),
        1,
        "cloned once: the retry layer keeps the original"
    );
}
