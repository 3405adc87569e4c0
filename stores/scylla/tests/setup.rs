//! Building the store: identifier checks, idempotent schema, locked bucket sizes, tenants.

mod common;

use futures::TryStreamExt;
use keel::{EventStore, ExpectedVersion, NewEvent, StreamId};
use keel_scylla::{Error, KeelScylla};

#[tokio::test]
async fn injection_attempts_in_names_are_refused_before_any_cql() {
    for bad in [
        "keel; DROP KEYSPACE system_auth",
        "x' OR '1'='1",
        "Tenant",
        "a.b",
        "",
    ] {
        // No node is given: if the name reached the connection step we would see NoNodes.
        match KeelScylla::builder().keyspace(bad).build().await {
            Err(Error::InvalidIdentifier { what, name, .. }) => {
                assert_eq!((what, name.as_str()), ("keyspace", bad))
            }
            Err(other) => panic!("{bad:?}: expected InvalidIdentifier, got {other}"),
            Ok(_) => panic!("{bad:?} was accepted"),
        }
    }
    let err = KeelScylla::builder()
        .keyspace("keel; drop")
        .build()
        .await
        .err()
        .unwrap();
    let as_keel: keel::Error = err.into();
    assert!(
        matches!(as_keel, keel::Error::Config { ref field, .. } if field == "keyspace"),
        "{as_keel}"
    );
}

/// Names the validator used to pass and the server then refused (reserved words) or owned
/// (`system_*`): refused by Keel with the reason, before anything reaches the server.
#[tokio::test]
async fn reserved_words_and_system_keyspaces_are_refused() {
    for (bad, why) in [
        ("select", "reserved"),
        ("table", "reserved"),
        ("from", "reserved"),
        ("primary", "reserved"),
        ("null", "reserved"),
        ("system_traces", "system"),
        ("system", "system"),
        ("system_auth", "system"),
    ] {
        match KeelScylla::builder().keyspace(bad).build().await {
            Err(e @ Error::InvalidIdentifier { .. }) => {
                assert!(e.to_string().contains(why), "{bad}: {e}")
            }
            other => panic!("{bad:?}: expected InvalidIdentifier, got {:?}", other.err()),
        }
    }
    // Words that only look like reserved ones are fine.
    for good in ["selection", "tables", "keel_system"] {
        keel_scylla::validate_identifier("keyspace", good).unwrap();
    }
}

#[tokio::test]
async fn connection_settings_from_the_environment_are_checked() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let config = keel_scylla::ScyllaConfig::from_vars(vars(&[
        ("KEEL_SCYLLA_NODES", "10.0.0.1:9042, 10.0.0.2:9042"),
        ("KEEL_SCYLLA_LOCAL_DC", "dc1"),
        ("KEEL_SCYLLA_USERNAME", "keel"),
        ("KEEL_SCYLLA_PASSWORD", "secret"),
        ("KEEL_SCYLLA_REPLICATION", "dc1:3,dc2:3"),
        ("KEEL_SCYLLA_REQUEST_TIMEOUT_MS", "2500"),
    ]))
    .unwrap();
    assert_eq!(config.nodes, ["10.0.0.1:9042", "10.0.0.2:9042"]);
    assert_eq!(config.local_datacenter.as_deref(), Some("dc1"));
    assert_eq!(config.request_timeout_ms, Some(2500));
    KeelScylla::builder().config(&config).unwrap();
    match keel_scylla::ScyllaConfig::from_vars(vars(&[("KEEL_SCYLLA_REQUEST_TIMEOUT_MS", "2s")])) {
        Err(Error::InvalidSetting { field, .. }) => {
            assert_eq!(field, "KEEL_SCYLLA_REQUEST_TIMEOUT_MS")
        }
        other => panic!("{other:?}"),
    }
    for (pairs, field) in [
        (&[("KEEL_SCYLLA_USERNAME", "keel")][..], "username"),
        (
            &[
                ("KEEL_SCYLLA_TLS_CERT", "/c.pem"),
                ("KEEL_SCYLLA_TLS_KEY", "/k.pem"),
            ][..],
            "tls_ca_file",
        ),
        (&[("KEEL_SCYLLA_REPLICATION", "dc1")][..], "replication"),
        (
            &[("KEEL_SCYLLA_REPLICATION", "simple:1,dc1:3")][..],
            "replication",
        ),
    ] {
        let pairs: &'static [(&'static str, &'static str)] =
            Box::leak(pairs.to_vec().into_boxed_slice());
        let config = keel_scylla::ScyllaConfig::from_vars(vars(pairs)).unwrap();
        match KeelScylla::builder().config(&config) {
            Err(Error::InvalidSetting { field: f, .. }) => assert_eq!(f, field, "{pairs:?}"),
            other => panic!("{pairs:?}: {:?}", other.err()),
        }
    }
    // Zero timeouts are refused at build, before connecting.
    match KeelScylla::builder()
        .known_node("127.0.0.1:9042")
        .request_timeout(std::time::Duration::ZERO)
        .build()
        .await
    {
        Err(Error::InvalidSetting { field, .. }) => assert_eq!(field, "request_timeout"),
        other => panic!("{:?}", other.err()),
    }
}

#[tokio::test]
async fn missing_nodes_and_bad_settings_are_named() {
    assert!(matches!(
        KeelScylla::builder().build().await,
        Err(Error::NoNodes)
    ));
    for (builder, bad) in [
        (KeelScylla::builder().bucket_size(0), "bucket_size"),
        (KeelScylla::builder().read_page_size(0), "read_page_size"),
    ] {
        match builder.known_node("127.0.0.1:9042").build().await {
            Err(Error::InvalidSetting { field, .. }) => assert_eq!(field, bad),
            other => panic!("{bad}: expected InvalidSetting, got {:?}", other.err()),
        }
    }
}

#[tokio::test]
async fn building_twice_on_one_keyspace_is_idempotent_and_keeps_data() {
    let keyspace = common::fresh_keyspace("keel_idem");
    let stream = StreamId::new("s-1");
    {
        let store = common::open(common::builder(&keyspace).feeder(false)).await;
        store
            .append(
                &stream,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("E", 1, &b"{}"[..])],
            )
            .await
            .unwrap();
    }
    let again = common::open(common::builder(&keyspace).feeder(false)).await;
    let events: Vec<_> = again.read_stream(&stream, 1).try_collect().await.unwrap();
    assert_eq!(events.len(), 1);
    let (version,): (i32,) = again
        .session()
        .query_unpaged(
            format!("SELECT version FROM {keyspace}.keel_schema WHERE id = 0"),
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row()
        .unwrap();
    assert_eq!(
        version,
        keel_scylla::SCHEMA_VERSION,
        "the schema version is recorded"
    );
}

#[tokio::test]
async fn a_keyspace_refuses_other_bucket_sizes() {
    let keyspace = common::fresh_keyspace("keel_lock");
    drop(common::open(common::builder(&keyspace).feeder(false)).await);
    match common::builder(&keyspace)
        .feeder(false)
        .bucket_size(1_000)
        .build()
        .await
    {
        Err(Error::Schema { reason, .. }) => {
            assert!(reason.contains("bucket_size 500"), "{reason}")
        }
        Err(other) => panic!("expected a schema error, got {other}"),
        Ok(_) => panic!("a different bucket size was accepted"),
    }
}

#[tokio::test]
async fn a_keyspace_refuses_another_slice_count_and_adopts_its_own() {
    let keyspace = common::fresh_keyspace("keel_slices");
    let created = common::open(common::builder(&keyspace).feeder(false)).await;
    assert_eq!(created.feed_slices(), keel::feed::DEFAULT_SLICES);
    drop(created);
    match common::builder(&keyspace)
        .feeder(false)
        .feed_slices(8)
        .build()
        .await
    {
        Err(Error::Schema { reason, .. }) => {
            assert!(reason.contains("feed of 64 slice(s)"), "{reason}")
        }
        Err(other) => panic!("expected a schema error, got {other}"),
        Ok(_) => panic!("another slice count was accepted"),
    }
    match common::builder(&keyspace).feed_slices(48).build().await {
        Err(Error::InvalidSetting { field, .. }) => assert_eq!(field, "feed_slices"),
        Err(other) => panic!("expected an invalid setting, got {other}"),
        Ok(_) => panic!("48 slices were accepted"),
    }
    let adopted = common::open(common::builder(&keyspace).feeder(false)).await;
    assert_eq!(
        adopted.feed_slices(),
        64,
        "an unnamed count adopts the keyspace's"
    );
}

/// A keyspace from before slices (schema v4: one feed, `feed_meta` row 0, no `feed_slices`)
/// is upgraded in place: its feed reads as slice 0 of 1, with its positions, and new events
/// follow them; a build that names another slice count is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyspace_from_before_slices_is_upgraded_in_place_as_one_slice() {
    use keel::RecordedEvent;
    let keyspace = common::fresh_keyspace("keel_preslices");
    // One slice lays the feed out exactly as before slices: partitions, row 0, `keel.feeder`.
    let old = common::open(common::builder(&keyspace).feed_slices(1)).await;
    let streams: Vec<StreamId> = (0..3)
        .map(|i| StreamId::new(format!("ledger-{i}")))
        .collect();
    for s in &streams {
        let events = (0..2)
            .map(|_| NewEvent::new("Noted", 1, &b"{}"[..]))
            .collect();
        old.append(s, ExpectedVersion::NoStream, events)
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while old.feed_head().await.unwrap() < 6 {
        assert!(std::time::Instant::now() < deadline, "the old feed was fed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    old.shutdown().await;
    for cql in [
        format!("ALTER TABLE {keyspace}.keel_schema DROP feed_slices"),
        format!(
            "UPDATE {keyspace}.keel_schema SET version = 4 WHERE id = 0 IF version = {}",
            keel_scylla::SCHEMA_VERSION
        ),
    ] {
        old.session().query_unpaged(cql, ()).await.unwrap();
    }
    drop(old);

    match common::builder(&keyspace).feed_slices(64).build().await {
        Err(Error::Schema { reason, .. }) => {
            assert!(reason.contains("feed of 1 slice(s)"), "{reason}")
        }
        Err(other) => panic!("expected a schema error, got {other}"),
        Ok(_) => panic!("a pre-slice keyspace was opened with 64 slices"),
    }
    let upgraded = common::open(common::builder(&keyspace)).await;
    assert_eq!(upgraded.feed_slices(), 1);
    let before: Vec<RecordedEvent> = upgraded
        .read_feed(&keel::Cursor::new())
        .try_collect()
        .await
        .unwrap();
    let at: Vec<(u32, u64)> = before
        .iter()
        .map(|e| (e.slice, e.position.unwrap()))
        .collect();
    assert_eq!(
        at,
        (1..=6).map(|p| (0, p)).collect::<Vec<_>>(),
        "the old feed as slice 0"
    );
    let events = vec![NewEvent::new("Noted", 1, &b"{}"[..])];
    upgraded
        .append(&streams[0], ExpectedVersion::Exact(2), events)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let after = loop {
        let after: Vec<RecordedEvent> = upgraded.read_slice(0, 7).try_collect().await.unwrap();
        if !after.is_empty() || std::time::Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(after.len(), 1, "the new event follows the old feed");
    assert_eq!(
        (after[0].stream.as_str(), after[0].version),
        ("ledger-0", 3)
    );
    let status = upgraded.feed_status().await.unwrap();
    assert_eq!((status.head, status.slices.len()), (7, 1), "{status:?}");
    upgraded.shutdown().await;
}

#[tokio::test]
async fn tenants_in_separate_keyspaces_do_not_see_each_other() {
    let (a, b) = (
        common::fresh_keyspace("keel_tenant"),
        common::fresh_keyspace("keel_tenant"),
    );
    let tenant_a = common::open(common::builder(&a).feeder(false)).await;
    let tenant_b = common::open(common::builder(&b).feeder(false)).await;
    let stream = StreamId::new("account-1");
    tenant_a
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("E", 1, &b"{}"[..])],
        )
        .await
        .unwrap();
    assert_eq!(tenant_b.stream_version(&stream).await.unwrap(), None);
    tenant_b
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![
                NewEvent::new("E", 1, &b"{}"[..]),
                NewEvent::new("E", 1, &b"{}"[..]),
            ],
        )
        .await
        .unwrap();
    assert_eq!(tenant_a.stream_version(&stream).await.unwrap(), Some(1));
    assert_eq!(tenant_b.stream_version(&stream).await.unwrap(), Some(2));
}

#[tokio::test]
async fn configuration_applies_and_names_bad_fields() {
    let bad: keel_scylla::ScyllaConfig =
        serde_json::from_str(r#"{"serial_consistency": "quorum"}"#).unwrap();
    match KeelScylla::builder().config(&bad) {
        Err(Error::InvalidSetting { field, .. }) => assert_eq!(field, "serial_consistency"),
        other => panic!("expected InvalidSetting, got {:?}", other.err()),
    }
    let bad: keel_scylla::ScyllaConfig =
        serde_json::from_str(r#"{"consistency": "serial"}"#).unwrap();
    match KeelScylla::builder().config(&bad) {
        Err(Error::InvalidSetting { field, reason }) => {
            assert_eq!(field, "consistency");
            assert!(reason.contains("local_quorum"), "{reason}");
        }
        other => panic!("expected InvalidSetting, got {:?}", other.err()),
    }
    let unknown =
        serde_json::from_str::<keel_scylla::ScyllaConfig>(r#"{"bucketsize": 5}"#).unwrap_err();
    assert!(unknown.to_string().contains("unknown field"), "{unknown}");
    let keyspace = common::fresh_keyspace("keel_conf");
    let config: keel_scylla::ScyllaConfig = serde_json::from_value(serde_json::json!({
        "nodes": common::nodes(),
        "keyspace": keyspace,
        "serial_consistency": "serial",
        "consistency": "quorum",
        "read_page_size": 7,
        "bucket_size": 50,
        "feed_bucket_size": 2000,
        "feeder": false
    }))
    .unwrap();
    let store = KeelScylla::builder()
        .config(&config)
        .unwrap()
        .build()
        .await
        .unwrap();
    assert_eq!(store.keyspace(), keyspace);
    assert!(!store.is_feeding());
    let stream = StreamId::new("s-cfg");
    // 120 events across buckets of 50, read back in pages of 7: all of them, in order.
    for start in (0..120).step_by(30) {
        let events: Vec<NewEvent> = (0..30).map(|_| NewEvent::new("E", 1, &b"{}"[..])).collect();
        store
            .append(&stream, ExpectedVersion::from_version(start), events)
            .await
            .unwrap();
    }
    let read: Vec<_> = store.read_stream(&stream, 1).try_collect().await.unwrap();
    let versions: Vec<u64> = read.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=120).collect::<Vec<u64>>());
    // The recorded bucket sizes are the configured ones: a builder with others is refused.
    assert!(common::builder(&keyspace)
        .feeder(false)
        .build()
        .await
        .is_err());
}

#[tokio::test]
async fn data_keys_are_stored_wrapped_and_open_only_with_their_master_key() {
    use keel::codec::{KeyStore, MasterKey};
    let keyspace = common::fresh_keyspace("keel_keys");
    let master = MasterKey::generate();
    let store = common::open(
        common::builder(&keyspace)
            .feeder(false)
            .master_key(master.clone()),
    )
    .await;
    let key = store.key_for("alice").await.unwrap();

    let (wrapped,): (Vec<u8>,) = store
        .session()
        .query_unpaged(
            format!("SELECT wrapped FROM {keyspace}.keys WHERE subject = 'alice'"),
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row()
        .unwrap();
    assert!(
        !wrapped.windows(32).any(|w| w == key.material().as_slice()),
        "the key material is not stored in the clear"
    );

    let same = common::open(common::builder(&keyspace).feeder(false).master_key(master)).await;
    assert_eq!(same.find_key("alice").await.unwrap(), Some(key));

    let other = common::open(
        common::builder(&keyspace)
            .feeder(false)
            .master_key(MasterKey::generate()),
    )
    .await;
    let err = other.find_key("alice").await.unwrap_err();
    assert!(
        matches!(&err, keel::Error::Config { field, reason } if field == "master_key" && reason.contains("alice")),
        "{err}"
    );

    let none = common::open(common::builder_without_master_key(&keyspace).feeder(false)).await;
    let err = none.key_for("bob").await.unwrap_err();
    assert!(
        err.to_string().contains("KeelScyllaBuilder::master_key"),
        "{err}"
    );
    assert!(
        none.shred("alice").await.unwrap(),
        "shredding needs no master key"
    );
    assert_eq!(same.find_key("alice").await.unwrap(), None);
}

#[tokio::test]
async fn a_new_snapshot_replaces_the_older_ones_of_its_stream() {
    use keel::{Snapshot, SnapshotStore};
    let keyspace = common::fresh_keyspace("keel_snapshots");
    let store = common::open(common::builder(&keyspace).feeder(false)).await;
    let snapshot = |stream: &str, version: u64| Snapshot {
        stream: StreamId::new(stream),
        version,
        schema_version: 1,
        payload: format!("{{\"at\":{version}}}").into_bytes().into(),
        taken_at: 1_000 + version as i64,
        recent_commands: Some(vec![uuid::Uuid::from_u128(version.into())]),
    };
    for version in [10, 20, 30] {
        store.save_snapshot(snapshot("a", version)).await.unwrap();
    }
    store.save_snapshot(snapshot("b", 5)).await.unwrap();
    // A late save of an older snapshot does not remove the newer one.
    store.save_snapshot(snapshot("a", 25)).await.unwrap();

    let versions = |stream: &str| {
        let cql = format!("SELECT version FROM {keyspace}.snapshots WHERE stream = '{stream}'");
        common::column::<i64>(&store, cql)
    };
    assert_eq!(versions("a").await, vec![30, 25], "30 pruned 10 and 20");
    assert_eq!(versions("b").await, vec![5], "other streams keep theirs");
    let latest = store
        .load_snapshot(&StreamId::new("a"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (latest.version, &latest.payload[..]),
        (30, &b"{\"at\":30}"[..])
    );
}

#[tokio::test]
async fn the_master_key_rotates_without_rewriting_events() {
    use keel::codec::{Codec, KeyStore, MasterKey};
    let keyspace = common::fresh_keyspace("keel_rotate");
    let (old, new) = (MasterKey::generate(), MasterKey::generate());
    let open_with = |current: &MasterKey, previous: Vec<MasterKey>| {
        common::open(
            common::builder(&keyspace)
                .feeder(false)
                .master_key(current.clone())
                .previous_master_keys(previous),
        )
    };
    let before = std::sync::Arc::new(open_with(&old, vec![]).await);
    let codec = Codec::builder().encrypt_streams(before.clone()).build();
    let stream = StreamId::new("customer-ada");
    codec
        .events(before.clone())
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Registered", 1, &b"{\"name\":\"Ada\"}"[..])],
        )
        .await
        .unwrap();
    let ada = before.find_key("customer-ada").await.unwrap().unwrap();
    let bob = before.key_for("customer-bob").await.unwrap();
    let stranger = open_with(&MasterKey::generate(), vec![])
        .await
        .key_for("customer-eve")
        .await
        .unwrap();

    // During the rotation both master keys open the keys, and a new key is wrapped with the
    // new one.
    let during = std::sync::Arc::new(open_with(&new, vec![old.clone()]).await);
    assert_eq!(
        during.find_key("customer-ada").await.unwrap(),
        Some(ada.clone())
    );
    assert_eq!(during.key_for("customer-bob").await.unwrap(), bob);
    let carl = during.key_for("customer-carl").await.unwrap();
    let report = during.rewrap_keys().await.unwrap();
    assert_eq!(
        (report.scanned, report.rewrapped, report.unopenable),
        (4, 2, vec!["customer-eve".to_owned()]),
        "ada and bob rewrapped, carl already on the new key, eve opens with neither"
    );
    assert_eq!(during.rewrap_keys().await.unwrap().rewrapped, 0, "done");
    drop(stranger);

    // After it the old master key is not needed, and no longer opens anything.
    let after = std::sync::Arc::new(open_with(&new, vec![]).await);
    for (subject, key) in [
        ("customer-ada", &ada),
        ("customer-bob", &bob),
        ("customer-carl", &carl),
    ] {
        assert_eq!(
            after.find_key(subject).await.unwrap().as_ref(),
            Some(key),
            "{subject}"
        );
    }
    let events: Vec<keel::RecordedEvent> = Codec::builder()
        .encrypt_streams(after.clone())
        .build()
        .events(after.clone())
        .read_stream(&stream, 1)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        &events[0].payload[..],
        b"{\"name\":\"Ada\"}",
        "the event, never rewritten"
    );
    let err = open_with(&old, vec![])
        .await
        .find_key("customer-ada")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, keel::Error::Config { field, reason } if field == "master_key" && reason.contains("customer-ada")),
        "{err}"
    );
    let without = common::open(common::builder_without_master_key(&keyspace).feeder(false)).await;
    assert!(
        matches!(without.rewrap_keys().await, Err(keel::Error::Config { ref field, .. }) if field == "master_key")
    );
}

/// The ids in the index of unfinished sagas.
async fn indexed_sagas(store: &KeelScylla) -> Vec<String> {
    let cql = format!("SELECT id FROM {}.sagas_unfinished", store.keyspace());
    let mut ids: Vec<String> = common::column(store, cql).await;
    ids.sort();
    ids
}

fn saga(id: &str, status: keel::saga::SagaStatus) -> keel::saga::SagaRecord {
    keel::saga::SagaRecord {
        id: id.to_owned(),
        revision: 1,
        status,
        deadline: None,
        data: bytes::Bytes::from_static(b"{}"),
    }
}

#[tokio::test]
async fn recovery_reads_an_index_of_the_unfinished_sagas() {
    use keel::saga::{SagaStatus, SagaStore};
    let keyspace = common::fresh_keyspace("keel_saga_index");
    let store = common::open(common::builder(&keyspace).feeder(false)).await;
    for id in ["a", "b", "c"] {
        assert!(store
            .create_saga(&saga(id, SagaStatus::Running))
            .await
            .unwrap());
    }
    assert_eq!(indexed_sagas(&store).await, ["a", "b", "c"]);

    let mut done = saga("a", SagaStatus::Completed);
    done.revision = 2;
    assert!(store.update_saga(&done, 1).await.unwrap());
    let mut stuck = saga("b", SagaStatus::CompensationFailed);
    stuck.revision = 2;
    assert!(store.update_saga(&stuck, 1).await.unwrap());
    assert_eq!(
        indexed_sagas(&store).await,
        ["b", "c"],
        "finished sagas leave the index"
    );

    // A stale entry (creating an existing saga writes its entry, then the creation is
    // refused: the saga is finished), and entries without a saga row: a recent one (a
    // creation in flight, perhaps) and an hour-old one (a creation that failed).
    assert!(!store
        .create_saga(&saga("a", SagaStatus::Running))
        .await
        .unwrap());
    let orphan = |id: &'static str, at: i64| {
        let store = &store;
        let cql = format!(
            "INSERT INTO {keyspace}.sagas_unfinished (bucket, id, indexed_at) VALUES (0, ?, ?)"
        );
        async move { store.session().query_unpaged(cql, (id, at)).await.unwrap() }
    };
    let now = keel::event::now_millis();
    orphan("ghost", now).await;
    orphan("old-ghost", now - 2 * 3_600_000).await;
    assert_eq!(
        indexed_sagas(&store).await,
        ["a", "b", "c", "ghost", "old-ghost"]
    );
    let unfinished: Vec<String> = store
        .list_sagas(true)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(unfinished, ["b", "c"]);
    assert_eq!(
        indexed_sagas(&store).await,
        ["b", "c", "ghost"],
        "the stale entry and the old orphan are deleted; the recent orphan is left"
    );
    let all = store.list_sagas(false).await.unwrap();
    assert_eq!(all.len(), 3, "listing everything still reads every saga");
}

#[tokio::test]
async fn a_version_1_keyspace_is_migrated_and_its_unfinished_sagas_indexed() {
    use keel::saga::{SagaStatus, SagaStore};
    let keyspace = common::fresh_keyspace("keel_migrate");
    let store = common::open(common::builder(&keyspace).feeder(false)).await;
    store
        .create_saga(&saga("running", SagaStatus::Running))
        .await
        .unwrap();
    store
        .create_saga(&saga("finished", SagaStatus::Running))
        .await
        .unwrap();
    let mut finished = saga("finished", SagaStatus::Compensated);
    finished.revision = 2;
    store.update_saga(&finished, 1).await.unwrap();
    // What a version 1 keyspace looks like: no index entries, no checkpoint epochs (a
    // checkpoint saved without one), no snapshot windows (a snapshot saved without one),
    // version 1.
    for cql in [
        format!("TRUNCATE {keyspace}.sagas_unfinished"),
        format!("ALTER TABLE {keyspace}.checkpoints DROP epoch"),
        format!("INSERT INTO {keyspace}.checkpoints (name, position) VALUES ('legacy', 77)"),
        format!("ALTER TABLE {keyspace}.snapshots DROP recent_commands"),
        format!(
            "INSERT INTO {keyspace}.snapshots (stream, version, schema_version, payload, taken_at) VALUES ('legacy', 3, 1, 0x7b7d, 0)"
        ),
        format!(
            "UPDATE {keyspace}.keel_schema SET version = 1 WHERE id = 0 IF version = {}",
            keel_scylla::SCHEMA_VERSION
        ),
    ] {
        store.session().query_unpaged(cql, ()).await.unwrap();
    }

    let refused = common::builder(&keyspace)
        .feeder(false)
        .create_schema(false)
        .build()
        .await;
    match refused {
        Err(Error::Schema { reason, .. }) => assert!(reason.contains("older"), "{reason}"),
        Err(other) => panic!("expected a schema error, got {other}"),
        Ok(_) => panic!("a version 1 keyspace opened without migrating"),
    }
    let migrated = common::open(common::builder(&keyspace).feeder(false)).await;
    assert_eq!(indexed_sagas(&migrated).await, ["running"]);
    let cql = format!("SELECT version FROM {keyspace}.keel_schema WHERE id = 0");
    let version: Vec<i32> = common::column(&migrated, cql).await;
    assert_eq!(version, [keel_scylla::SCHEMA_VERSION]);
    let unfinished = migrated.list_sagas(true).await.unwrap();
    assert_eq!(unfinished.len(), 1);
    assert_eq!(unfinished[0].id, "running");
    // The legacy checkpoint reads back, and takes a fence from its first fenced save on.
    use keel::{CheckpointStore, Fence};
    assert_eq!(migrated.load_checkpoint("legacy").await.unwrap(), Some(77));
    let (old, new) = (Fence::new("legacy", 1), Fence::new("legacy", 2));
    migrated.save_checkpoint("legacy", 80, &new).await.unwrap();
    let stale = migrated.save_checkpoint("legacy", 78, &old).await;
    assert!(
        matches!(stale, Err(keel::Error::Fenced { .. })),
        "{stale:?}"
    );
    assert_eq!(migrated.load_checkpoint("legacy").await.unwrap(), Some(80));
    // The legacy snapshot reads back without a command window; new ones keep theirs.
    use keel::SnapshotStore;
    let legacy = StreamId::new("legacy");
    let old = migrated.load_snapshot(&legacy).await.unwrap().unwrap();
    assert_eq!((old.version, old.recent_commands), (3, None));
    let window = vec![uuid::Uuid::new_v4()];
    migrated
        .save_snapshot(keel::Snapshot {
            version: 4,
            recent_commands: Some(window.clone()),
            ..old
        })
        .await
        .unwrap();
    let new = migrated.load_snapshot(&legacy).await.unwrap().unwrap();
    assert_eq!((new.version, new.recent_commands), (4, Some(window)));
}
