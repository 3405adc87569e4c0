//! Configuration: defaults, JSON and environment loading, validation naming the field, and
//! the layers a bus gets from it.

use std::time::Duration;

use keel::bus::{Command, CommandBus, Query, QueryBus};
use keel::config::KeelConfig;
use keel::Error;

fn field_of(e: Error) -> String {
    match e {
        Error::Config { field, .. } => field,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn defaults_are_what_the_docs_say() {
    let c = KeelConfig::default();
    assert_eq!(
        (
            c.commands.timeout_ms,
            c.commands.retry_attempts,
            c.commands.validation
        ),
        (Some(5_000), 3, true)
    );
    assert_eq!(
        (
            c.queries.cache_ttl_ms,
            c.repository.snapshot_every,
            c.repository.max_retries
        ),
        (None, None, 3)
    );
    assert_eq!(KeelConfig::from_json("{}").unwrap(), c);
}

#[test]
fn bad_values_are_refused_with_the_field_named() {
    assert_eq!(
        field_of(KeelConfig::from_json(r#"{"commands":{"timeout_ms":0}}"#).unwrap_err()),
        "commands.timeout_ms"
    );
    assert_eq!(
        field_of(KeelConfig::from_json(r#"{"commands":{"cache_ttl_ms":10}}"#).unwrap_err()),
        "commands.cache_ttl_ms"
    );
    assert_eq!(
        field_of(KeelConfig::from_json(r#"{"queries":{"cache_ttl_ms":0}}"#).unwrap_err()),
        "queries.cache_ttl_ms"
    );
    assert_eq!(
        field_of(KeelConfig::from_json(r#"{"repository":{"snapshot_every":0}}"#).unwrap_err()),
        "repository.snapshot_every"
    );
    let unknown = KeelConfig::from_json(r#"{"repository":{"snapshots":5}}"#)
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("unknown field `snapshots`"), "{unknown}");
    let wrong_type = KeelConfig::from_json(r#"{"commands":{"retry_attempts":"many"}}"#)
        .unwrap_err()
        .to_string();
    assert!(wrong_type.contains("invalid type"), "{wrong_type}");
}

#[test]
fn environment_variables_override_defaults() {
    let vars = [
        ("KEEL_COMMANDS_TIMEOUT_MS", "2000"),
        ("KEEL_QUERIES_CACHE_TTL_MS", "250"),
        ("KEEL_REPOSITORY_SNAPSHOT_EVERY", "100"),
        ("KEEL_COMMANDS_TRACING", "false"),
        ("PATH", "/usr/bin"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let c = KeelConfig::from_vars(vars).unwrap();
    assert_eq!(
        (c.commands.timeout_ms, c.commands.tracing),
        (Some(2_000), false)
    );
    assert_eq!(
        (c.queries.cache_ttl_ms, c.repository.snapshot_every),
        (Some(250), Some(100))
    );
    let bad =
        KeelConfig::from_vars([("KEEL_COMMANDS_TIMEOUT".to_owned(), "5".to_owned())]).unwrap_err();
    assert_eq!(field_of(bad), "commands.timeout");
    let bad =
        KeelConfig::from_vars([("KEEL_REPOSITORY_SNAPSHOT_EVERY".to_owned(), "0".to_owned())])
            .unwrap_err();
    assert_eq!(field_of(bad), "repository.snapshot_every");
}

#[derive(Clone, Debug)]
struct Slow;
impl Command for Slow {
    type Output = ();
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Count;
impl Query for Count {
    type Output = u32;
}

#[tokio::test(start_paused = true)]
async fn a_bus_gets_the_configured_layers() {
    let config =
        KeelConfig::from_json(r#"{"commands":{"timeout_ms":50},"queries":{"cache_ttl_ms":1000}}"#)
            .unwrap();
    let commands = CommandBus::builder()
        .config(&config.commands)
        .command(|_: Slow, _| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        })
        .unwrap()
        .build();
    assert!(
        matches!(commands.send(Slow).await, Err(Error::Timeout { .. })),
        "the configured timeout applies"
    );
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = calls.clone();
    let queries = QueryBus::builder()
        .config(&config.queries)
        .query(move |_: Count, _| {
            let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok(n) }
        })
        .unwrap()
        .build();
    assert_eq!(queries.ask(Count).await.unwrap(), 0);
    assert_eq!(
        queries.ask(Count).await.unwrap(),
        0,
        "the configured cache applies"
    );
}
