//! Identifier validation and the schema: created idempotently, versioned, checked on start.

use scylla::client::session::Session;

use crate::error::Error;

/// The schema version this code creates and expects. Bump it with a migration step in
/// `schema::ensure` when a table changes.
///
/// - 1: the first schema.
/// - 2: `shredded_keys`, and `sagas_unfinished`, the index of unfinished sagas (filled from
///   `sagas` when a version 1 keyspace is migrated).
/// - 3: `checkpoints.epoch`, the fence of the lease a checkpoint was saved under.
/// - 4: `snapshots.recent_commands`, the repository's command window at the snapshot.
/// - 5: the feed in slices: `keel_schema.feed_slices` (a keyspace from before is migrated in
///   place as one slice: its feed is slice 0 of 1), `feed_meta` rows per slice, feed
///   partitions per slice, and `members`, the live feeders and projection workers.
/// - 6: `events_archive`, where archived streams' events go (a new table: nothing to migrate).
pub const SCHEMA_VERSION: i32 = 6;

/// How a keyspace's data is laid out: fixed when the keyspace is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) bucket_size: i64,
    pub(crate) feed_bucket_size: i64,
    pub(crate) feed_slices: u32,
}

/// Checks a user-supplied name against the plain CQL identifier rule Keel allows: a lowercase
/// letter, then lowercase letters, digits or `_`, 48 characters at most. Names are never
/// quoted, so anything else (quotes, dots, spaces, semicolons) is refused before any CQL is
/// built with it.
pub fn validate_identifier(what: &'static str, name: &str) -> Result<(), Error> {
    let refuse = |reason| {
        Err(Error::InvalidIdentifier {
            what,
            name: name.to_owned(),
            reason,
        })
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return refuse("it is empty"),
        Some(c) if !c.is_ascii_lowercase() => {
            return refuse("it must start with a lowercase letter")
        }
        Some(_) => {}
    }
    if name.len() > 48 {
        return refuse("it is longer than 48 characters");
    }
    if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        return refuse("it may hold only lowercase letters, digits and `_`");
    }
    if RESERVED.binary_search(&name).is_ok() {
        return refuse("it is a reserved CQL word, which the server refuses unquoted");
    }
    if name.starts_with("system") {
        return refuse("names starting with `system` belong to the server's own keyspaces");
    }
    Ok(())
}

/// The words that CQL reserves in ScyllaDB or Cassandra 5 (the union, sorted): neither server
/// accepts them as unquoted names, and Keel never quotes.
const RESERVED: &[&str] = &[
    "add",
    "aggregate",
    "all",
    "allow",
    "alter",
    "and",
    "any",
    "apply",
    "asc",
    "authorize",
    "batch",
    "begin",
    "by",
    "columnfamily",
    "create",
    "default",
    "delete",
    "desc",
    "describe",
    "drop",
    "each_quorum",
    "entries",
    "execute",
    "from",
    "full",
    "grant",
    "if",
    "in",
    "index",
    "infinity",
    "insert",
    "into",
    "is",
    "keyspace",
    "keyspaces",
    "limit",
    "local_one",
    "local_quorum",
    "materialized",
    "mbean",
    "mbeans",
    "modify",
    "nan",
    "norecursive",
    "not",
    "null",
    "of",
    "on",
    "one",
    "or",
    "order",
    "password",
    "primary",
    "quorum",
    "rename",
    "replace",
    "revoke",
    "schema",
    "scylla_clustering_bound",
    "scylla_counter_shard_list",
    "scylla_timeuuid_list_index",
    "select",
    "set",
    "table",
    "three",
    "to",
    "token",
    "truncate",
    "two",
    "unlogged",
    "unset",
    "update",
    "use",
    "using",
    "view",
    "where",
    "with",
];

/// The replication of a new keyspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replication {
    /// `SimpleStrategy` with this replication factor (tests, single data centre).
    Simple(u32),
    /// `NetworkTopologyStrategy` with a replication factor per data centre.
    NetworkTopology(Vec<(String, u32)>),
}

impl Replication {
    /// Reads the text form used by configuration files and the environment: `simple:N`, or
    /// `DC:N[,DC:N...]` for `NetworkTopologyStrategy`.
    ///
    /// ```
    /// use keel_scylla::Replication;
    /// assert_eq!(Replication::parse("simple:1").unwrap(), Replication::Simple(1));
    /// assert_eq!(
    ///     Replication::parse("dc1:3,dc2:3").unwrap(),
    ///     Replication::NetworkTopology(vec![("dc1".into(), 3), ("dc2".into(), 3)])
    /// );
    /// assert!(Replication::parse("dc1").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Replication, Error> {
        let bad = |reason: String| Error::InvalidSetting {
            field: "replication",
            reason,
        };
        let mut dcs = Vec::new();
        for part in text.split(',').map(str::trim) {
            let (name, factor) = part
                .split_once(':')
                .ok_or_else(|| bad(format!("`{part}`: write `simple:N` or `DC:N[,DC:N...]`")))?;
            let factor: u32 = factor
                .trim()
                .parse()
                .ok()
                .filter(|f| *f > 0)
                .ok_or_else(|| bad(format!("`{part}`: the factor must be a positive number")))?;
            dcs.push((name.trim().to_owned(), factor));
        }
        match dcs.as_slice() {
            [(name, factor)] if name == "simple" => Ok(Replication::Simple(*factor)),
            _ if dcs.iter().any(|(name, _)| name == "simple") => Err(bad(format!(
                "`{text}`: `simple` stands alone, without data centres"
            ))),
            _ => {
                let replication = Replication::NetworkTopology(dcs);
                replication.to_cql()?;
                Ok(replication)
            }
        }
    }

    pub(crate) fn to_cql(&self) -> Result<String, Error> {
        match self {
            Replication::Simple(rf) => Ok(format!(
                "{{'class': 'SimpleStrategy', 'replication_factor': {rf}}}"
            )),
            Replication::NetworkTopology(dcs) => {
                let mut parts = vec!["'class': 'NetworkTopologyStrategy'".to_owned()];
                for (dc, rf) in dcs {
                    // Data-centre names are quoted strings in CQL; allow the usual characters only.
                    if dc.is_empty()
                        || !dc
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        return Err(Error::InvalidSetting {
                            field: "replication",
                            reason: format!("data-centre name `{dc}` may hold only letters, digits, `_` and `-`"),
                        });
                    }
                    parts.push(format!("'{dc}': {rf}"));
                }
                Ok(format!("{{{}}}", parts.join(", ")))
            }
        }
    }
}

/// Whether the server is ScyllaDB (which has `system.scylla_local`) rather than Cassandra.
pub(crate) async fn is_scylla(session: &Session) -> bool {
    session
        .query_unpaged("SELECT key FROM system.scylla_local LIMIT 1", ())
        .await
        .is_ok()
}

/// The tables of one keyspace. `{ks}` is replaced by the validated keyspace name.
const TABLES: &[(&str, &str)] = &[
    (
        "events",
        "CREATE TABLE IF NOT EXISTS {ks}.events (
            stream text, bucket bigint, version bigint,
            head bigint STATIC,
            event_id uuid, event_type text, schema_version int,
            payload blob, metadata blob, recorded_at timestamp, commit_id uuid,
            PRIMARY KEY ((stream, bucket), version)
        ) WITH CLUSTERING ORDER BY (version ASC)",
    ),
    (
        // Archived streams' events, as they were in `events` (same buckets).
        "events_archive",
        "CREATE TABLE IF NOT EXISTS {ks}.events_archive (
            stream text, bucket bigint, version bigint,
            event_id uuid, event_type text, schema_version int,
            payload blob, metadata blob, recorded_at timestamp,
            PRIMARY KEY ((stream, bucket), version)
        ) WITH CLUSTERING ORDER BY (version ASC)",
    ),
    (
        "pending",
        "CREATE TABLE IF NOT EXISTS {ks}.pending (
            minute bigint, at bigint, marker uuid, stream text,
            PRIMARY KEY ((minute), at, marker)
        ) WITH CLUSTERING ORDER BY (at ASC, marker ASC)",
    ),
    (
        "feed",
        "CREATE TABLE IF NOT EXISTS {ks}.feed (
            bucket bigint, position bigint,
            stream text, version bigint,
            event_id uuid, event_type text, schema_version int,
            payload blob, metadata blob, recorded_at timestamp,
            PRIMARY KEY ((bucket), position)
        ) WITH CLUSTERING ORDER BY (position ASC)",
    ),
    (
        "feed_meta",
        "CREATE TABLE IF NOT EXISTS {ks}.feed_meta (
            id int PRIMARY KEY, head bigint, plan blob
        )",
    ),
    (
        "feed_progress",
        "CREATE TABLE IF NOT EXISTS {ks}.feed_progress (
            stream text, version bigint,
            PRIMARY KEY ((stream), version)
        ) WITH CLUSTERING ORDER BY (version DESC)",
    ),
    (
        "snapshots",
        "CREATE TABLE IF NOT EXISTS {ks}.snapshots (
            stream text, version bigint, schema_version int, payload blob, taken_at timestamp,
            recent_commands frozen<list<uuid>>,
            PRIMARY KEY ((stream), version)
        ) WITH CLUSTERING ORDER BY (version DESC)",
    ),
    (
        "checkpoints",
        "CREATE TABLE IF NOT EXISTS {ks}.checkpoints (
            name text PRIMARY KEY, position bigint, updated_at timestamp, epoch bigint
        )",
    ),
    (
        "leases",
        "CREATE TABLE IF NOT EXISTS {ks}.leases (
            name text PRIMARY KEY, holder text, epoch bigint
        )",
    ),
    (
        "projection_status",
        "CREATE TABLE IF NOT EXISTS {ks}.projection_status (
            name text PRIMARY KEY, status blob
        )",
    ),
    (
        "projection_requests",
        "CREATE TABLE IF NOT EXISTS {ks}.projection_requests (
            name text PRIMARY KEY, control blob, request_id uuid
        )",
    ),
    (
        "dead_letters",
        "CREATE TABLE IF NOT EXISTS {ks}.dead_letters (
            projection text, at bigint, id uuid, letter blob,
            PRIMARY KEY ((projection), at, id)
        )",
    ),
    (
        "sagas",
        "CREATE TABLE IF NOT EXISTS {ks}.sagas (
            id text PRIMARY KEY, revision bigint, status text, deadline bigint, data blob
        )",
    ),
    (
        // An index of the unfinished sagas, so recovery reads these instead of every saga
        // ever run. Spread over `SAGA_BUCKETS` partitions; entries are deleted when a saga
        // finishes, and the index is advisory (a saga row is always read before acting), so a
        // short gc_grace_seconds keeps tombstones from piling up: a deleted entry that comes
        // back on a replica that missed the delete is found finished and deleted again.
        "sagas_unfinished",
        "CREATE TABLE IF NOT EXISTS {ks}.sagas_unfinished (
            bucket int, id text, indexed_at bigint,
            PRIMARY KEY ((bucket), id)
        ) WITH gc_grace_seconds = 3600",
    ),
    (
        "keys",
        "CREATE TABLE IF NOT EXISTS {ks}.keys (
            subject text PRIMARY KEY, key_id uuid, wrapped blob, created_at timestamp
        )",
    ),
    (
        "shredded_keys",
        "CREATE TABLE IF NOT EXISTS {ks}.shredded_keys (
            key_id uuid PRIMARY KEY, shredded_at timestamp
        )",
    ),
    (
        "keel_schema",
        "CREATE TABLE IF NOT EXISTS {ks}.keel_schema (
            id int PRIMARY KEY, version int, bucket_size bigint, feed_bucket_size bigint,
            feed_slices int
        )",
    ),
    (
        // Who shares a kind of work right now (the feed's slices, a projection's slices): a
        // row per live process, written with a TTL and refreshed while it lives, so that each
        // knows how many share the work and takes its fair part.
        "members",
        "CREATE TABLE IF NOT EXISTS {ks}.members (
            work text, member text, joined_at timestamp,
            PRIMARY KEY ((work), member)
        )",
    ),
];

/// Creates the keyspace and tables if missing, records the schema version and the layout
/// (bucket sizes, feed slices), and refuses to run against a keyspace created with another
/// layout (rows would be looked for in the wrong partitions). `feed_slices` is `None` when the
/// build did not name a slice count: a new keyspace gets the default, an existing one keeps
/// its own.
///
/// With `create` false nothing is created: the keyspace must already hold a Keel schema, and
/// its recorded layout is adopted (returned) instead of compared.
pub(crate) async fn ensure(
    session: &Session,
    keyspace: &str,
    replication: &Replication,
    wanted: (i64, i64, Option<u32>),
    create: bool,
) -> Result<Layout, Error> {
    let (bucket_size, feed_bucket_size, feed_slices) = wanted;
    if create {
        let layout = Layout {
            bucket_size,
            feed_bucket_size,
            feed_slices: feed_slices.unwrap_or(keel::feed::DEFAULT_SLICES),
        };
        create_all(session, keyspace, replication, layout).await?;
    }
    let stored = read_layout(session, keyspace).await?;
    let (version, stored) = match stored {
        (version, _) if version < SCHEMA_VERSION && create => {
            migrate(session, keyspace, version).await?;
            read_layout(session, keyspace).await?
        }
        other => other,
    };
    if version < SCHEMA_VERSION {
        return Err(Error::Schema {
            step: "check schema version".into(),
            reason: format!("keyspace `{keyspace}` has schema v{version}, older than this keel-scylla (v{SCHEMA_VERSION}), and create_schema is off: open it once with create_schema on to migrate it"),
        });
    }
    if version > SCHEMA_VERSION {
        return Err(Error::Schema {
            step: "check schema version".into(),
            reason: format!("keyspace `{keyspace}` has schema v{version}, newer than this keel-scylla (v{SCHEMA_VERSION}): upgrade keel-scylla"),
        });
    }
    if create && (stored.bucket_size, stored.feed_bucket_size) != (bucket_size, feed_bucket_size) {
        return Err(Error::Schema {
            step: "check bucket sizes".into(),
            reason: format!(
                "keyspace `{keyspace}` was created with bucket_size {} and feed_bucket_size {}; \
                 this store was configured with {bucket_size} and {feed_bucket_size}. Bucket sizes cannot change once data exists",
                stored.bucket_size, stored.feed_bucket_size
            ),
        });
    }
    if let Some(wanted) = feed_slices.filter(|&n| n != stored.feed_slices) {
        return Err(Error::Schema {
            step: "check feed slices".into(),
            reason: format!(
                "keyspace `{keyspace}` has a feed of {} slice(s); this store was configured with {wanted}. \
                 The slice count cannot change once data exists (leave it unset to adopt the keyspace's)",
                stored.feed_slices
            ),
        });
    }
    Ok(stored)
}

/// The schema version and layout recorded in a keyspace. A keyspace from before slices (no
/// `feed_slices`) has one.
async fn read_layout(session: &Session, keyspace: &str) -> Result<(i32, Layout), Error> {
    let mut read = scylla::statement::unprepared::Statement::new(format!(
        "SELECT version, bucket_size, feed_bucket_size, feed_slices FROM {keyspace}.keel_schema WHERE id = 0"
    ));
    read.set_consistency(scylla::statement::Consistency::Serial);
    let missing = |reason: String| Error::Schema {
        step: "read schema version".into(),
        reason: format!("keyspace `{keyspace}` holds no Keel schema ({reason})"),
    };
    let current = match session.query_unpaged(read, ()).await {
        Ok(result) => result
            .into_rows_result()
            .map_err(|e| e.to_string())
            .and_then(|rows| {
                rows.maybe_first_row::<(i32, i64, i64, Option<i32>)>()
                    .map_err(|e| e.to_string())
            }),
        Err(e) => Err(e.to_string()),
    };
    let row = match current {
        Ok(row) => row,
        // A keyspace from before v5 has no `feed_slices` column until it is migrated.
        Err(e) if e.contains("feed_slices") => {
            let mut read = scylla::statement::unprepared::Statement::new(format!(
                "SELECT version, bucket_size, feed_bucket_size FROM {keyspace}.keel_schema WHERE id = 0"
            ));
            read.set_consistency(scylla::statement::Consistency::Serial);
            session
                .query_unpaged(read, ())
                .await
                .map_err(|e| missing(e.to_string()))?
                .into_rows_result()
                .map_err(|e| missing(e.to_string()))?
                .maybe_first_row::<(i32, i64, i64)>()
                .map_err(|e| missing(e.to_string()))?
                .map(|(v, b, f)| (v, b, f, None))
        }
        Err(e) => return Err(missing(e)),
    };
    let Some((version, bucket_size, feed_bucket_size, slices)) = row else {
        return Err(missing("no version row".into()));
    };
    let feed_slices = match slices {
        None => 1,
        Some(n) => keel::feed::validate_slices(n.max(0) as u32).map_err(|e| Error::Schema {
            step: "read feed slices".into(),
            reason: format!("keyspace `{keyspace}` records {n} feed slices: {e}"),
        })?,
    };
    Ok((
        version,
        Layout {
            bucket_size,
            feed_bucket_size,
            feed_slices,
        },
    ))
}

/// Brings a keyspace from schema `from` to [`SCHEMA_VERSION`]. The tables are already there
/// (`create_all` ran); what is left is data. Every step is idempotent, so processes starting
/// together may all run it.
async fn migrate(session: &Session, keyspace: &str, from: i32) -> Result<(), Error> {
    use futures::TryStreamExt;
    let step = |what: &str| {
        let what = what.to_owned();
        move |e: String| Error::Schema {
            step: what.clone(),
            reason: e,
        }
    };
    if from < 2 {
        // Index the unfinished sagas of a version 1 keyspace.
        let what = "migrate to v2: index the unfinished sagas";
        let mut rows = session
            .query_iter(format!("SELECT id, status FROM {keyspace}.sagas"), ())
            .await
            .map_err(|e| step(what)(e.to_string()))?
            .rows_stream::<(String, String)>()
            .map_err(|e| step(what)(e.to_string()))?;
        let insert = session
            .prepare(format!(
                "INSERT INTO {keyspace}.sagas_unfinished (bucket, id, indexed_at) VALUES (?, ?, ?)"
            ))
            .await
            .map_err(|e| step(what)(e.to_string()))?;
        while let Some((id, status)) = rows
            .try_next()
            .await
            .map_err(|e| step(what)(e.to_string()))?
        {
            if !matches!(status.as_str(), "completed" | "compensated") {
                session
                    .execute_unpaged(
                        &insert,
                        (crate::sagas::bucket(&id), &id, keel::event::now_millis()),
                    )
                    .await
                    .map_err(|e| step(what)(e.to_string()))?;
            }
        }
    }
    if from < 3 {
        // The checkpoint's fence.
        add_column(session, keyspace, "checkpoints", "epoch", "bigint")
            .await
            .map_err(step("migrate to v3: add checkpoints.epoch"))?;
    }
    if from < 4 {
        // Snapshots from before it read with no command window: the repository then replays
        // their stream from the start when it looks for a command id.
        add_column(
            session,
            keyspace,
            "snapshots",
            "recent_commands",
            "frozen<list<uuid>>",
        )
        .await
        .map_err(step("migrate to v4: add snapshots.recent_commands"))?;
    }
    if from < 5 {
        // The feed from before slices is slice 0 of 1: its rows, its `feed_meta` row (id 0)
        // and its progress read as they are.
        add_column(session, keyspace, "keel_schema", "feed_slices", "int")
            .await
            .map_err(step("migrate to v5: add keel_schema.feed_slices"))?;
        session
            .query_unpaged(
                format!("UPDATE {keyspace}.keel_schema SET feed_slices = 1 WHERE id = 0 IF feed_slices = null"),
                (),
            )
            .await
            .map_err(|e| step("migrate to v5: record one feed slice")(e.to_string()))?;
    }
    session
        .query_unpaged(
            format!("UPDATE {keyspace}.keel_schema SET version = ? WHERE id = 0 IF version = ?"),
            (SCHEMA_VERSION, from),
        )
        .await
        .map_err(|e| step("record the migrated schema version")(e.to_string()))?;
    tracing::info!(keyspace, from, to = SCHEMA_VERSION, "schema migrated");
    Ok(())
}

/// `ALTER TABLE .. ADD`, idempotently: `ADD` fails on a column that exists (a migration that
/// ran half, or a process migrating beside this one), so look first and accept the race.
async fn add_column(
    session: &Session,
    keyspace: &str,
    table: &str,
    column: &str,
    cql_type: &str,
) -> Result<(), String> {
    let columns = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ?",
            (keyspace, table),
        )
        .await
        .map_err(|e| e.to_string())?
        .into_rows_result()
        .map_err(|e| e.to_string())?
        .rows::<(String,)>()
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if columns.iter().any(|(c,)| c == column) {
        return Ok(());
    }
    let alter = format!("ALTER TABLE {keyspace}.{table} ADD {column} {cql_type}");
    match session.query_unpaged(alter, ()).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let reason = e.to_string();
            if reason.contains("conflicts with an existing column")
                || reason.contains("already exists")
            {
                Ok(())
            } else {
                Err(reason)
            }
        }
    }
}

async fn create_all(
    session: &Session,
    keyspace: &str,
    replication: &Replication,
    layout: Layout,
) -> Result<(), Error> {
    let schema = |step: &str| {
        let step = step.to_owned();
        move |e: scylla::errors::ExecutionError| Error::Schema {
            step: step.clone(),
            reason: e.to_string(),
        }
    };
    // ScyllaDB keyspaces default to tablets in recent releases, and LWT needs vnodes there.
    let tablets = if is_scylla(session).await {
        " AND tablets = {'enabled': false}"
    } else {
        ""
    };
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {}{tablets}",
                replication.to_cql()?
            ),
            (),
        )
        .await
        .map_err(schema("create keyspace"))?;
    for (name, cql) in TABLES {
        session
            .query_unpaged(cql.replace("{ks}", keyspace), ())
            .await
            .map_err(schema(&format!("create table {name}")))?;
    }
    // A keyspace of an older version has a `keel_schema` without `feed_slices`, which
    // `CREATE TABLE IF NOT EXISTS` leaves as it is; the migration adds it.
    if read_layout(session, keyspace).await.is_ok() {
        return Ok(());
    }
    // Record the version and layout once; every later start compares against them.
    let insert = format!(
        "INSERT INTO {keyspace}.keel_schema (id, version, bucket_size, feed_bucket_size, feed_slices) \
         VALUES (0, ?, ?, ?, ?) IF NOT EXISTS"
    );
    session
        .query_unpaged(
            insert,
            (
                SCHEMA_VERSION,
                layout.bucket_size,
                layout.feed_bucket_size,
                layout.feed_slices as i32,
            ),
        )
        .await
        .map_err(schema("record schema version"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_follow_the_plain_cql_rule() {
        assert!(validate_identifier("keyspace", "tenant_42").is_ok());
        for bad in [
            "",
            "Tenant",
            "1abc",
            "a-b",
            "a b",
            "ks; DROP KEYSPACE x",
            "x\"y",
            "ks.t",
        ] {
            assert!(
                validate_identifier("keyspace", bad).is_err(),
                "{bad:?} must be refused"
            );
        }
        assert!(validate_identifier("keyspace", &"a".repeat(49)).is_err());
        assert!(validate_identifier("keyspace", &"a".repeat(48)).is_ok());
    }

    #[test]
    fn replication_renders_and_refuses_odd_dc_names() {
        assert_eq!(
            Replication::Simple(3).to_cql().unwrap(),
            "{'class': 'SimpleStrategy', 'replication_factor': 3}"
        );
        let nts = Replication::NetworkTopology(vec![("dc1".into(), 3)]);
        assert!(nts.to_cql().unwrap().contains("'dc1': 3"));
        let bad = Replication::NetworkTopology(vec![("dc1'} AND x = {'".into(), 3)]);
        assert!(bad.to_cql().is_err());
    }
}
