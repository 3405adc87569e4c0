//! # keel-scylla
//!
//! Keel's production store: every store trait of `keel` on ScyllaDB, through the `scylla`
//! driver. It speaks only CQL that ScyllaDB and Apache Cassandra 5 both accept, and is tested
//! against Cassandra 5.0 (see `docs/scylla.md` for the design and the differences).
//!
//! - **Events**: one partition per stream and bucket of `bucket_size` versions. An append is
//!   one conditional batch (one Paxos round) guarded by a static `head` column, so the
//!   expected-version check is exact. A timed-out append is resolved by reading back at SERIAL
//!   consistency.
//! - **Feed**: a leased feeder gives committed events dense positions and writes them to the
//!   `feed` table; markers written before each append let it find events whose writer died
//!   before telling anyone.
//! - **Snapshots, checkpoints, leases**: one table each; leases are LWT + TTL with an epoch.
//!
//! ```no_run
//! # async fn run() -> Result<(), keel_scylla::Error> {
//! use keel_scylla::{KeelScylla, Replication};
//!
//! let store = KeelScylla::builder()
//!     .known_node("127.0.0.1:9042")
//!     .keyspace("shop")
//!     .replication(Replication::Simple(1))
//!     .build()
//!     .await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod ending;
mod error;
mod events;
mod feed;
mod keys;
mod kv;
mod projections;
mod retry;
mod sagas;
mod schema;
mod tls;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};

pub use error::Error;
pub use feed::Reconciled;
pub use feed::{FeedStatus, FEED_DEAD_LETTERS};
pub use keys::Rewrapped;
pub use kv::LeaseInfo;
pub use projections::ViewBatch;
pub use schema::{validate_identifier, Replication, SCHEMA_VERSION};

/// Versions per event partition unless configured otherwise.
pub const DEFAULT_BUCKET_SIZE: i64 = 10_000;
/// Positions per feed partition unless configured otherwise.
pub const DEFAULT_FEED_BUCKET_SIZE: i64 = 100_000;

/// The store's settings as data (serde), for configuration files; apply with
/// [`KeelScyllaBuilder::config`]. Missing fields keep the builder's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScyllaConfig {
    /// Nodes, `host:port`.
    pub nodes: Vec<String>,
    /// The keyspace.
    pub keyspace: Option<String>,
    /// `local_serial` (default) or `serial` (multi-data-centre linearisability).
    pub serial_consistency: Option<String>,
    /// Consistency of plain reads and writes and of an LWT's commit: `local_quorum` (default),
    /// `quorum`, `each_quorum`, `all`, `local_one` or `one`.
    pub consistency: Option<String>,
    /// Client-side timeout of an append's LWT, milliseconds.
    pub append_timeout_ms: Option<u64>,
    /// Events per read when loading a stream (1 to 10,000; default 1,000).
    pub read_page_size: Option<i32>,
    /// The largest event an append takes, bytes (default 512 KiB).
    pub max_event_bytes: Option<usize>,
    /// Versions per event partition (fixed once the keyspace exists).
    pub bucket_size: Option<i64>,
    /// Positions per feed partition (fixed once the keyspace exists).
    pub feed_bucket_size: Option<i64>,
    /// Slices of the feed (a power of two; fixed once the keyspace exists).
    pub feed_slices: Option<u32>,
    /// Whether this process runs a feeder.
    pub feeder: Option<bool>,
    /// The feeder lease's time to live, milliseconds.
    pub feeder_lease_ttl_ms: Option<u64>,
    /// Replication of the keyspaces Keel creates: `simple:N` or `DC:N[,DC:N...]`.
    pub replication: Option<String>,
    /// The data centre this process is in: requests go to its nodes first (token-aware).
    pub local_datacenter: Option<String>,
    /// User name for `PasswordAuthenticator`.
    pub username: Option<String>,
    /// Password for `PasswordAuthenticator`.
    pub password: Option<String>,
    /// PEM file of the CA that signed the nodes' certificates: connects with TLS.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// PEM file of this client's certificate, for nodes that require one.
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM file of this client's private key (with `tls_cert_file`).
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Client-side timeout of every request but an append's LWT, milliseconds.
    pub request_timeout_ms: Option<u64>,
    /// Timeout of opening a connection to a node, milliseconds.
    pub connect_timeout_ms: Option<u64>,
}

impl ScyllaConfig {
    /// Reads the settings from `KEEL_*` environment variables; unset ones stay `None`.
    ///
    /// | variable | field |
    /// |---|---|
    /// | `KEEL_SCYLLA_NODES` | `nodes` (comma-separated) |
    /// | `KEEL_KEYSPACE` | `keyspace` |
    /// | `KEEL_SCYLLA_REPLICATION` | `replication` |
    /// | `KEEL_SCYLLA_LOCAL_DC` | `local_datacenter` |
    /// | `KEEL_SCYLLA_USERNAME`, `KEEL_SCYLLA_PASSWORD` | `username`, `password` |
    /// | `KEEL_SCYLLA_TLS_CA`, `KEEL_SCYLLA_TLS_CERT`, `KEEL_SCYLLA_TLS_KEY` | `tls_*_file` |
    /// | `KEEL_SCYLLA_CONSISTENCY`, `KEEL_SCYLLA_SERIAL_CONSISTENCY` | `consistency`, `serial_consistency` |
    /// | `KEEL_SCYLLA_REQUEST_TIMEOUT_MS`, `KEEL_SCYLLA_APPEND_TIMEOUT_MS`, `KEEL_SCYLLA_CONNECT_TIMEOUT_MS` | the timeouts |
    ///
    /// A number that does not parse is an error naming its variable.
    pub fn from_env() -> Result<ScyllaConfig, Error> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over the given variables (for tests and embedding).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<ScyllaConfig, Error> {
        let text = |name: &str| var(name).filter(|v| !v.is_empty());
        let number = |name: &'static str| -> Result<Option<u64>, Error> {
            text(name)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| Error::InvalidSetting {
                        field: name,
                        reason: format!("`{v}` is not a whole number of milliseconds"),
                    })
                })
                .transpose()
        };
        Ok(ScyllaConfig {
            nodes: text("KEEL_SCYLLA_NODES")
                .map(|v| v.split(',').map(|n| n.trim().to_owned()).collect())
                .unwrap_or_default(),
            keyspace: text("KEEL_KEYSPACE"),
            replication: text("KEEL_SCYLLA_REPLICATION"),
            local_datacenter: text("KEEL_SCYLLA_LOCAL_DC"),
            username: text("KEEL_SCYLLA_USERNAME"),
            password: text("KEEL_SCYLLA_PASSWORD"),
            tls_ca_file: text("KEEL_SCYLLA_TLS_CA").map(Into::into),
            tls_cert_file: text("KEEL_SCYLLA_TLS_CERT").map(Into::into),
            tls_key_file: text("KEEL_SCYLLA_TLS_KEY").map(Into::into),
            consistency: text("KEEL_SCYLLA_CONSISTENCY"),
            serial_consistency: text("KEEL_SCYLLA_SERIAL_CONSISTENCY"),
            request_timeout_ms: number("KEEL_SCYLLA_REQUEST_TIMEOUT_MS")?,
            append_timeout_ms: number("KEEL_SCYLLA_APPEND_TIMEOUT_MS")?,
            connect_timeout_ms: number("KEEL_SCYLLA_CONNECT_TIMEOUT_MS")?,
            ..ScyllaConfig::default()
        })
    }
}

/// Where the TLS material of a connection is: see [`KeelScyllaBuilder::tls`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file of the CA (or CAs) that signed the nodes' certificates.
    pub ca_file: std::path::PathBuf,
    /// PEM files of this client's certificate and private key, for nodes that require one.
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Counters of one store, as a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScyllaMetrics {
    /// Appends committed.
    pub appends: u64,
    /// Appends refused for a version conflict.
    pub conflicts: u64,
    /// Appends whose outcome had to be read back (timeouts).
    pub unknown_outcomes: u64,
    /// Events this store's feeder published to the feed.
    pub fed_events: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    appends: AtomicU64,
    conflicts: AtomicU64,
    unknown_outcomes: AtomicU64,
    fed_events: AtomicU64,
}

/// Configures and opens a [`KeelScylla`].
#[derive(Clone, Debug)]
pub struct KeelScyllaBuilder {
    nodes: Vec<String>,
    session: Option<Arc<Session>>,
    keyspace: String,
    replication: Replication,
    bucket_size: i64,
    feed_bucket_size: i64,
    feed_slices: Option<u32>,
    append_timeout: Duration,
    serial: SerialConsistency,
    consistency: Consistency,
    read_page_size: i32,
    max_event_bytes: usize,
    ending_wait: Duration,
    feeder: bool,
    feeder_id: String,
    feeder_lease_ttl: Duration,
    credentials: Option<(String, String)>,
    local_datacenter: Option<String>,
    tls: Option<TlsFiles>,
    request_timeout: Duration,
    connect_timeout: Duration,
    feeder_interval: Duration,
    settle_after: Duration,
    feeder_gather: Duration,
    feeder_gather_max: Duration,
    reconcile_after_outage: bool,
    create_schema: bool,
    master_key: Option<keel::codec::MasterKey>,
    previous_master_keys: Vec<keel::codec::MasterKey>,
}

impl Default for KeelScyllaBuilder {
    fn default() -> Self {
        KeelScyllaBuilder {
            nodes: Vec::new(),
            session: None,
            keyspace: "keel".to_owned(),
            replication: Replication::Simple(1),
            bucket_size: DEFAULT_BUCKET_SIZE,
            feed_bucket_size: DEFAULT_FEED_BUCKET_SIZE,
            feed_slices: None,
            append_timeout: Duration::from_secs(5),
            serial: SerialConsistency::LocalSerial,
            consistency: Consistency::LocalQuorum,
            read_page_size: events::PAGE,
            max_event_bytes: keel::event::DEFAULT_MAX_EVENT_BYTES,
            ending_wait: Duration::from_secs(30),
            feeder: true,
            feeder_id: uuid::Uuid::new_v4().to_string(),
            feeder_lease_ttl: Duration::from_secs(10),
            credentials: None,
            local_datacenter: None,
            tls: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            feeder_interval: Duration::from_millis(100),
            settle_after: Duration::from_secs(60),
            feeder_gather: Duration::from_millis(20),
            feeder_gather_max: Duration::from_millis(160),
            reconcile_after_outage: true,
            create_schema: true,
            master_key: None,
            previous_master_keys: Vec::new(),
        }
    }
}

impl KeelScyllaBuilder {
    /// The key that wraps the data keys this store keeps for payload encryption (its
    /// [`KeyStore`](keel::codec::KeyStore)). Without one, the key store refuses to create or
    /// read keys (shredding still works). Keep it outside the database.
    pub fn master_key(mut self, key: keel::codec::MasterKey) -> Self {
        self.master_key = Some(key);
        self
    }

    /// Master keys that wrapped data keys before the current one: the key store still opens
    /// rows they wrapped, while [`KeelScylla::rewrap_keys`] moves them to the current
    /// [`master_key`](Self::master_key). See `docs/codecs.md`, "Rotating the master key".
    pub fn previous_master_keys(
        mut self,
        keys: impl IntoIterator<Item = keel::codec::MasterKey>,
    ) -> Self {
        self.previous_master_keys = keys.into_iter().collect();
        self
    }

    /// Applies a [`ScyllaConfig`]; a bad value is an error naming its field.
    pub fn config(mut self, config: &ScyllaConfig) -> Result<Self, Error> {
        self = self.known_nodes(config.nodes.iter().cloned());
        if let Some(ks) = &config.keyspace {
            self = self.keyspace(ks.clone());
        }
        if let Some(serial) = &config.serial_consistency {
            self.serial = match serial.as_str() {
                "serial" => SerialConsistency::Serial,
                "local_serial" => SerialConsistency::LocalSerial,
                other => {
                    return Err(Error::InvalidSetting {
                        field: "serial_consistency",
                        reason: format!("`{other}`: use `serial` or `local_serial`"),
                    })
                }
            };
        }
        if let Some(level) = &config.consistency {
            self.consistency = match level.as_str() {
                "local_quorum" => Consistency::LocalQuorum,
                "quorum" => Consistency::Quorum,
                "each_quorum" => Consistency::EachQuorum,
                "all" => Consistency::All,
                "local_one" => Consistency::LocalOne,
                "one" => Consistency::One,
                other => {
                    return Err(Error::InvalidSetting {
                        field: "consistency",
                        reason: format!(
                        "`{other}`: use local_quorum, quorum, each_quorum, all, local_one or one"
                    ),
                    })
                }
            };
        }
        if let Some(size) = config.read_page_size {
            self = self.read_page_size(size);
        }
        if let Some(bytes) = config.max_event_bytes {
            self = self.max_event_bytes(bytes);
        }
        if let Some(ms) = config.append_timeout_ms {
            self = self.append_timeout(Duration::from_millis(ms));
        }
        if let Some(size) = config.bucket_size {
            self = self.bucket_size(size);
        }
        if let Some(size) = config.feed_bucket_size {
            self = self.feed_bucket_size(size);
        }
        if let Some(slices) = config.feed_slices {
            self = self.feed_slices(slices);
        }
        if let Some(feeder) = config.feeder {
            self = self.feeder(feeder);
        }
        if let Some(ms) = config.feeder_lease_ttl_ms {
            self = self.feeder_lease_ttl(Duration::from_millis(ms));
        }
        if let Some(text) = &config.replication {
            self = self.replication(Replication::parse(text)?);
        }
        if let Some(dc) = &config.local_datacenter {
            self = self.local_datacenter(dc.clone());
        }
        match (&config.username, &config.password) {
            (Some(user), Some(password)) => self = self.credentials(user.clone(), password.clone()),
            (None, None) => {}
            _ => {
                return Err(Error::InvalidSetting {
                    field: "username",
                    reason: "give both a username and a password, or neither".into(),
                })
            }
        }
        match (
            &config.tls_ca_file,
            &config.tls_cert_file,
            &config.tls_key_file,
        ) {
            (Some(ca), cert, key) => {
                let client =
                    match (cert, key) {
                        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                        (None, None) => None,
                        _ => return Err(Error::InvalidSetting {
                            field: "tls_cert_file",
                            reason:
                                "a client certificate needs its key file, and a key its certificate"
                                    .into(),
                        }),
                    };
                self = self.tls(TlsFiles {
                    ca_file: ca.clone(),
                    client,
                });
            }
            (None, None, None) => {}
            (None, _, _) => {
                return Err(Error::InvalidSetting {
                    field: "tls_ca_file",
                    reason: "a client certificate is only used with TLS: give the CA file too"
                        .into(),
                })
            }
        }
        if let Some(ms) = config.request_timeout_ms {
            self = self.request_timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = config.connect_timeout_ms {
            self = self.connect_timeout(Duration::from_millis(ms));
        }
        Ok(self)
    }

    /// User name and password for a cluster with `PasswordAuthenticator` on. A wrong pair
    /// fails [`build`](Self::build) with [`Error::Connect`] saying the server refused them.
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some((username.into(), password.into()));
        self
    }

    /// The data centre this process runs in: requests go to its nodes (token-aware, the
    /// replica that owns the row first) and never to another data centre's; `LOCAL_QUORUM`
    /// and `LOCAL_SERIAL` count this data centre's replicas. Without it the driver picks the
    /// data centre of the first node it reaches.
    pub fn local_datacenter(mut self, datacenter: impl Into<String>) -> Self {
        self.local_datacenter = Some(datacenter.into());
        self
    }

    /// Connects with TLS, trusting the CA in `files.ca_file` (and presenting a client
    /// certificate when given). Needs keel-scylla's `tls` cargo feature (OpenSSL); without it
    /// [`build`](Self::build) refuses the setting. A node whose certificate that CA did not
    /// sign fails the connection with an error that says so.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// Client-side timeout of every request except an append's LWT (default 5 s): reads,
    /// the feed's writes, the read-back of an unknown outcome, leases. On expiry the request
    /// fails with a timeout (the server may still run it).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long opening a connection to a node may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// A node to connect to, `host:port`.
    pub fn known_node(mut self, node: impl Into<String>) -> Self {
        self.nodes.push(node.into());
        self
    }

    /// Several nodes to connect to.
    pub fn known_nodes(mut self, nodes: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.nodes.extend(nodes.into_iter().map(Into::into));
        self
    }

    /// An already open session (one per process is the driver's advice); nodes are then ignored.
    pub fn session(mut self, session: Arc<Session>) -> Self {
        self.session = Some(session);
        self
    }

    /// The keyspace (default `keel`); one per tenant. Validated as a plain CQL identifier.
    pub fn keyspace(mut self, keyspace: impl Into<String>) -> Self {
        self.keyspace = keyspace.into();
        self
    }

    /// Replication used when the keyspace is created (default `SimpleStrategy`, factor 1).
    pub fn replication(mut self, replication: Replication) -> Self {
        self.replication = replication;
        self
    }

    /// Versions per event partition (default 10,000). Fixed when the keyspace is created.
    /// An append never spans partitions: it lands in the bucket of its first version, which may
    /// overflow by up to one append; appends larger than the bucket size are refused.
    pub fn bucket_size(mut self, size: i64) -> Self {
        self.bucket_size = size;
        self
    }

    /// Positions per feed partition (default 100,000), a multiple of 1,000 (the feed's page).
    /// Fixed when the keyspace is created.
    pub fn feed_bucket_size(mut self, size: i64) -> Self {
        self.feed_bucket_size = size;
        self
    }

    /// The number of slices the feed is cut into (a power of two up to
    /// [`keel::feed::MAX_SLICES`]). Fixed when the keyspace is created: unset, a new keyspace
    /// gets [`keel::feed::DEFAULT_SLICES`] and an existing one keeps its own; set, a keyspace
    /// with another count is refused. More slices let more processes share the feeding and
    /// the projections; each slice costs a feeder round and a lease of its own.
    pub fn feed_slices(mut self, slices: u32) -> Self {
        self.feed_slices = Some(slices);
        self
    }

    /// Client-side timeout of the append's LWT (default 5 s). On expiry the outcome is read
    /// back at SERIAL consistency.
    pub fn append_timeout(mut self, timeout: Duration) -> Self {
        self.append_timeout = timeout;
        self
    }

    /// `Serial` for multi-data-centre linearisability; `LocalSerial` (default) otherwise.
    pub fn serial_consistency(mut self, serial: SerialConsistency) -> Self {
        self.serial = serial;
        self
    }

    /// Consistency of plain reads and writes and of an LWT's commit phase (default
    /// `LocalQuorum`). Below a quorum, a read may miss a write another node acknowledged: the
    /// feed and the read-back of unknown outcomes rely on quorum reads, so weaker levels suit
    /// only single-node set-ups. SERIAL reads keep their serial level whatever this says.
    pub fn consistency(mut self, consistency: Consistency) -> Self {
        self.consistency = consistency;
        self
    }

    /// Events fetched per read when loading a stream (default 1,000; 1 to 10,000). Larger
    /// pages mean fewer round trips for long histories and more memory per read.
    pub fn read_page_size(mut self, events: i32) -> Self {
        self.read_page_size = events;
        self
    }

    /// The largest event (payload, type and metadata, see [`keel::NewEvent::stored_len`]) an
    /// append takes (default [`keel::event::DEFAULT_MAX_EVENT_BYTES`], 512 KiB); larger ones
    /// are refused with [`keel::Error::TooLarge`] before anything is written. Keep it below
    /// the server's `batch_size_fail_threshold` (Cassandra's default is 50 KiB; the test node
    /// allows 640 KiB) and a tenth of its commit log segment: an append is one batch, and the
    /// feeder writes the event again.
    pub fn max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = bytes;
        self
    }

    /// How long a hard delete, a truncation or an archive waits for the feed to carry the
    /// stream's events before it removes them (default 30 s). The feed is fed by whichever
    /// process runs a feeder; when none does within this time, the operation says so and
    /// removes nothing (its notice is appended: running it again finishes it).
    pub fn ending_wait(mut self, wait: Duration) -> Self {
        self.ending_wait = wait;
        self
    }

    /// Whether this store runs a feeder (default yes). Exactly one feeder per keyspace works
    /// at a time (a lease decides); turning it off suits short-lived tools.
    pub fn feeder(mut self, enabled: bool) -> Self {
        self.feeder = enabled;
        self
    }

    /// A readable name for this process's feeder (its host or service name, say): the lease
    /// holder it records, shown by `feed_status` and `keel feed status`, becomes
    /// `NAME-<uuid>`. The random suffix stays, so two processes given one name still hold
    /// the lease as two holders.
    pub fn feeder_name(mut self, name: impl Into<String>) -> Self {
        self.feeder_id = format!("{}-{}", name.into(), uuid::Uuid::new_v4());
        self
    }

    /// The feeder lease's time to live (default 10 s): how long a dead feeder blocks the feed.
    pub fn feeder_lease_ttl(mut self, ttl: Duration) -> Self {
        self.feeder_lease_ttl = ttl;
        self
    }

    /// How often the feeder scans for appends of other processes (default 100 ms).
    pub fn feeder_interval(mut self, interval: Duration) -> Self {
        self.feeder_interval = interval;
        self
    }

    /// How long the feeder waits after hearing of an append before publishing (default 20 ms),
    /// so that one position allocation covers a burst of appends. It adds that much to the
    /// feed's latency and saves one LWT per append under load.
    pub fn feeder_gather(mut self, gather: Duration) -> Self {
        self.feeder_gather = gather;
        self
    }

    /// The longest the gather grows to under sustained load (default 160 ms). While appends
    /// keep arriving during the feeder's rounds, each round's gather doubles up to this, so
    /// the feeder's position allocations (one LWT each) and feed writes take less of the
    /// cluster's time from the appends; the first round that finds nothing waiting returns to
    /// [`feeder_gather`](Self::feeder_gather). Under load the feed then trails the appends by
    /// up to this much. Set it equal to `feeder_gather` for a fixed wait.
    pub fn feeder_gather_max(mut self, max: Duration) -> Self {
        self.feeder_gather_max = max;
        self
    }

    /// Whether a feeder that takes the lease after no feeder was alive for about an hour (or
    /// ever) reconciles the feed by itself (default yes; see
    /// [`KeelScylla::reconcile_feed`]). That reads every event partition's head and fed
    /// progress in the background, one read per partition, 32 at a time: turn it off for a
    /// keyspace of very many streams whose operators rather run `keel feed reconcile` at a
    /// time of their choosing after such an outage.
    pub fn reconcile_after_outage(mut self, enabled: bool) -> Self {
        self.reconcile_after_outage = enabled;
        self
    }

    /// How long after an append's marker the feeder checks its stream once more (default 60 s).
    /// It must exceed the longest an append can take (3 attempts of `append_timeout` plus their
    /// read-backs); within what is left, appends to a stream reuse its last marker instead of
    /// writing a new one (see `docs/scylla.md`).
    pub fn settle_after(mut self, after: Duration) -> Self {
        self.settle_after = after;
        self
    }

    /// Whether `build` creates the keyspace and tables when missing (default yes). Tools that
    /// must only attach to an existing store (an operator's command) turn it off: a keyspace
    /// without a Keel schema is then an error, and the recorded bucket sizes are adopted.
    pub fn create_schema(mut self, create: bool) -> Self {
        self.create_schema = create;
        self
    }

    /// A session on the configured nodes with the connection settings: credentials, TLS, the
    /// local data centre, the request timeout.
    async fn open_session(&self) -> Result<Session, Error> {
        use scylla::client::execution_profile::ExecutionProfile;
        use scylla::policies::load_balancing::DefaultPolicy;
        let mut policy = DefaultPolicy::builder().token_aware(true);
        if let Some(dc) = &self.local_datacenter {
            policy = policy
                .prefer_datacenter(dc.clone())
                .permit_dc_failover(false);
        }
        let profile = ExecutionProfile::builder()
            .consistency(self.consistency)
            .serial_consistency(Some(self.serial))
            .request_timeout(Some(self.request_timeout))
            .retry_policy(Arc::new(retry::KeelRetry::default()))
            .load_balancing_policy(policy.build())
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&self.nodes)
            .connection_timeout(self.connect_timeout)
            .default_execution_profile_handle(profile.into_handle());
        if let Some((user, password)) = &self.credentials {
            builder = builder.user(user, password);
        }
        if let Some(files) = &self.tls {
            builder = builder.tls_context(Some(tls::context(files)?));
        }
        // The driver retries a refused handshake forever in the background; bound the whole
        // opening so that a wrong password or an untrusted certificate is an error, not a hang.
        let bound = self.connect_timeout * 2;
        let connect = |source| Error::Connect {
            nodes: self.nodes.clone(),
            source: Box::new(source),
        };
        match tokio::time::timeout(bound, builder.build()).await {
            Ok(result) => result.map_err(connect),
            Err(_) => Err(Error::ConnectTimeout {
                nodes: self.nodes.clone(),
                after: bound,
            }),
        }
    }

    /// Validates the settings, connects, creates the schema if missing, prepares every
    /// statement, and starts the feeder.
    pub async fn build(self) -> Result<KeelScylla, Error> {
        validate_identifier("keyspace", &self.keyspace)?;
        for (field, size) in [
            ("bucket_size", self.bucket_size),
            ("feed_bucket_size", self.feed_bucket_size),
        ] {
            if size < 1 {
                return Err(Error::InvalidSetting {
                    field,
                    reason: format!("{size} is not a positive size"),
                });
            }
        }
        if let Some(slices) = self.feed_slices {
            keel::feed::validate_slices(slices).map_err(|e| Error::InvalidSetting {
                field: "feed_slices",
                reason: e.to_string(),
            })?;
        }
        if self.max_event_bytes == 0 {
            return Err(Error::InvalidSetting {
                field: "max_event_bytes",
                reason: "0 bytes would refuse every event".into(),
            });
        }
        if !(1..=10_000).contains(&self.read_page_size) {
            return Err(Error::InvalidSetting {
                field: "read_page_size",
                reason: format!("{} events: use 1 to 10,000", self.read_page_size),
            });
        }
        if self.feed_bucket_size % events::PAGE as i64 != 0 {
            return Err(Error::InvalidSetting {
                field: "feed_bucket_size",
                reason: format!(
                    "{} is not a multiple of the feed page, {}",
                    self.feed_bucket_size,
                    events::PAGE
                ),
            });
        }
        for (field, timeout) in [
            ("append_timeout", self.append_timeout),
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if timeout.is_zero() {
                return Err(Error::InvalidSetting {
                    field,
                    reason: "a zero timeout fails every request".into(),
                });
            }
        }
        let longest_append = events::longest_append(self.append_timeout, self.request_timeout);
        if self.settle_after <= longest_append {
            return Err(Error::InvalidSetting {
                field: "settle_after",
                reason: format!(
                    "{:?} must exceed the longest an append can take ({longest_append:?} with append_timeout {:?} and request_timeout {:?})",
                    self.settle_after, self.append_timeout, self.request_timeout
                ),
            });
        }
        // An append reusing a marker written at T commits by T + reuse + longest_append, which
        // stays before the feeder's recheck at T + settle_after, with 5 s for clock skew.
        let marker_reuse = self
            .settle_after
            .saturating_sub(longest_append + Duration::from_secs(5))
            / 2;
        if self.feeder_lease_ttl < Duration::from_secs(1) {
            return Err(Error::InvalidSetting {
                field: "feeder_lease_ttl",
                reason: "CQL TTLs are whole seconds: use at least 1 s".into(),
            });
        }
        let session = match self.session.clone() {
            Some(s) => s,
            None => {
                if self.nodes.is_empty() {
                    return Err(Error::NoNodes);
                }
                Arc::new(self.open_session().await?)
            }
        };
        let layout = schema::ensure(
            &session,
            &self.keyspace,
            &self.replication,
            (self.bucket_size, self.feed_bucket_size, self.feed_slices),
            self.create_schema,
        )
        .await?;
        let statements = Statements::prepare(&session, &self.keyspace, &self).await?;
        let shared = Arc::new(Shared {
            session,
            keyspace: self.keyspace.clone(),
            bucket_size: layout.bucket_size,
            feed_bucket_size: layout.feed_bucket_size,
            feed_slices: layout.feed_slices,
            st: statements,
            counters: Counters::default(),
            wake: feed::Wake::new(layout.feed_slices),
            markers: std::sync::Mutex::new(std::collections::HashMap::new()),
            marker_reuse,
            master_key: self.master_key.clone(),
            previous_master_keys: self.previous_master_keys.clone(),
            read_page_size: self.read_page_size,
            max_event_bytes: self.max_event_bytes,
            ending_wait: self.ending_wait,
            stuck: std::sync::Mutex::new(std::collections::HashMap::new()),
        });
        let feeder = if self.feeder {
            Some(feed::Feeder::start(
                shared.clone(),
                feed::FeederConfig {
                    id: self.feeder_id.clone(),
                    lease_ttl: self.feeder_lease_ttl,
                    interval: self.feeder_interval,
                    settle_after: self.settle_after,
                    gather: self.feeder_gather,
                    gather_max: self.feeder_gather_max,
                    reconcile_after_outage: self.reconcile_after_outage,
                },
            ))
        } else {
            None
        };
        Ok(KeelScylla {
            shared,
            feeder: Arc::new(feeder),
        })
    }
}

/// Every Keel store trait on ScyllaDB / Cassandra. Cloning is cheap and shares the session
/// and the feeder; the feeder stops when the last clone is dropped (call
/// [`shutdown`](KeelScylla::shutdown) to also hand its lease over at once).
#[derive(Clone)]
pub struct KeelScylla {
    shared: Arc<Shared>,
    feeder: Arc<Option<feed::Feeder>>,
}

pub(crate) struct Shared {
    pub(crate) session: Arc<Session>,
    pub(crate) keyspace: String,
    pub(crate) bucket_size: i64,
    pub(crate) feed_bucket_size: i64,
    /// The feed's slice count, as recorded in the keyspace.
    pub(crate) feed_slices: u32,
    pub(crate) st: Statements,
    pub(crate) counters: Counters,
    pub(crate) wake: feed::Wake,
    /// When this process last wrote a marker for each stream.
    pub(crate) markers: std::sync::Mutex<std::collections::HashMap<StreamKey, std::time::Instant>>,
    pub(crate) marker_reuse: Duration,
    /// Wraps the data keys of the key store.
    pub(crate) master_key: Option<keel::codec::MasterKey>,
    /// Master keys from before a rotation, tried after `master_key`.
    pub(crate) previous_master_keys: Vec<keel::codec::MasterKey>,
    /// Events per read when loading a stream.
    pub(crate) read_page_size: i32,
    /// The largest event an append takes.
    pub(crate) max_event_bytes: usize,
    /// How long an ending waits for the feed before it removes events.
    pub(crate) ending_wait: Duration,
    /// Streams this process's feeder cannot carry past a damaged row: stream -> (version,
    /// reason). Also recorded as dead letters of [`feed::FEED_DEAD_LETTERS`].
    pub(crate) stuck: std::sync::Mutex<std::collections::HashMap<String, (u64, String)>>,
}

pub(crate) type StreamKey = String;

/// An unlogged batch of `statements`, at the consistency they were prepared with: for writes
/// to one partition, which it sends as one request and applies together.
pub(crate) fn partition_batch<'a>(
    statements: impl IntoIterator<Item = &'a PreparedStatement>,
) -> scylla::statement::batch::Batch {
    use scylla::statement::batch::{Batch, BatchType};
    let mut batch = Batch::new(BatchType::Unlogged);
    for statement in statements {
        if let Some(level) = statement.get_consistency() {
            batch.set_consistency(level);
        }
        batch.append_statement(statement.clone());
    }
    batch
}

impl Shared {
    /// Runs a prepared read and returns its rows; failures name the operation.
    pub(crate) async fn select(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        operation: impl Into<String>,
    ) -> keel::Result<scylla::response::query_result::QueryRowsResult> {
        let operation = operation.into();
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(|e| error::store_err(operation.clone(), e))?
            .into_rows_result()
            .map_err(|e| error::store_err(operation, e))
    }
}

impl KeelScylla {
    /// A builder; at least a node (or a session) is needed.
    pub fn builder() -> KeelScyllaBuilder {
        KeelScyllaBuilder::default()
    }

    /// The driver session, for a projection's own tables.
    pub fn session(&self) -> &Arc<Session> {
        &self.shared.session
    }

    /// The keyspace this store lives in.
    pub fn keyspace(&self) -> &str {
        &self.shared.keyspace
    }

    /// The counters so far.
    pub fn metrics(&self) -> ScyllaMetrics {
        let c = &self.shared.counters;
        ScyllaMetrics {
            appends: c.appends.load(Ordering::Relaxed),
            conflicts: c.conflicts.load(Ordering::Relaxed),
            unknown_outcomes: c.unknown_outcomes.load(Ordering::Relaxed),
            fed_events: c.fed_events.load(Ordering::Relaxed),
        }
    }

    /// Whether this store's feeder currently holds at least one slice of the feed.
    pub fn is_feeding(&self) -> bool {
        self.feeding_slices() > 0
    }

    /// How many slices of the feed this store's feeder holds (0 without a feeder).
    pub fn feeding_slices(&self) -> usize {
        self.feeder.as_ref().as_ref().map_or(0, |f| f.held())
    }

    /// Checks the node (reachable, its release), the schema version, and the feeder: healthy
    /// while some process holds the feeder lease; without one, unhealthy when streams marked
    /// in the last hour have committed events the feed lacks (appends waiting for a feeder).
    pub async fn health(&self) -> keel::health::Health {
        let mut health =
            keel::health::Health::new(format!("scylla store `{}`", self.shared.keyspace));
        match self
            .shared
            .session
            .query_unpaged("SELECT release_version FROM system.local", ())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.into_rows_result().map_err(|e| e.to_string()))
            .and_then(|r| {
                r.maybe_first_row::<(Option<String>,)>()
                    .map_err(|e| e.to_string())
            }) {
            Ok(row) => {
                let version = row.and_then(|(v,)| v).unwrap_or_else(|| "unknown".into());
                health.check("node", true, format!("reachable, release {version}"));
            }
            Err(e) => {
                health.check("node", false, format!("unreachable: {e}"));
            }
        }
        let schema = format!(
            "SELECT version FROM {}.keel_schema WHERE id = 0",
            self.shared.keyspace
        );
        match self
            .shared
            .session
            .query_unpaged(schema, ())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.into_rows_result().map_err(|e| e.to_string()))
            .and_then(|r| {
                r.maybe_first_row::<(Option<i32>,)>()
                    .map_err(|e| e.to_string())
            }) {
            Ok(Some((Some(v),))) => {
                health.check(
                    "schema",
                    v == SCHEMA_VERSION,
                    format!("v{v} (this build expects v{SCHEMA_VERSION})"),
                );
            }
            Ok(_) => {
                health.check("schema", false, "no schema version recorded");
            }
            Err(e) => {
                health.check("schema", false, e);
            }
        }
        let (healthy, feeder) = self.feeder_health().await;
        health.check("feeder", healthy, feeder);
        match self.stuck_in_feed().await {
            Ok(stuck) if stuck.is_empty() => {
                health.check("feed", true, "no stream held back");
            }
            Ok(stuck) => {
                let named: Vec<String> = stuck
                    .iter()
                    .map(|l| {
                        format!(
                            "`{}` version {} ({})",
                            l.event.stream, l.event.version, l.error
                        )
                    })
                    .collect();
                health.check(
                    "feed",
                    false,
                    format!(
                        "{} stream(s) held back by a damaged row, the others fed: {}",
                        stuck.len(),
                        named.join("; ")
                    ),
                );
            }
            Err(e) => {
                health.check("feed", false, format!("stuck streams unreadable: {e}"));
            }
        }
        health
    }

    /// Whether some process publishes the feed. Without a feeder, appends wait for one; past
    /// an hour their markers expire, and the next feeder has to reconcile the whole feed.
    async fn feeder_health(&self) -> (bool, String) {
        let slices = self.shared.feed_slices;
        let here = match self.feeder.as_ref() {
            Some(f) if f.held() > 0 => {
                format!("this process feeds {} of {slices} slice(s)", f.held())
            }
            Some(_) => "standby in this process".to_owned(),
            None => "disabled in this process".to_owned(),
        };
        let names: Vec<String> = (0..slices).map(|s| feed::feeder_lease(s, slices)).collect();
        match self.shared.lease_holders(&names).await {
            Ok(holders) if names.iter().all(|n| holders.get(n).is_some_and(Option::is_some)) => {
                let mut feeders: Vec<&String> = holders.values().flatten().collect();
                feeders.sort();
                feeders.dedup();
                (true, format!("{here}; every slice fed, by {} feeder(s)", feeders.len()))
            }
            Ok(_) => match self.shared.unfed_marked_streams(1_000).await {
                Ok((0, _)) => (
                    true,
                    format!("{here}; some slices have no feeder, and no append of the last hour waits for one"),
                ),
                Ok((streams, events)) => (
                    false,
                    format!(
                        "{here}; some slices have no feeder, and {events} event(s) of {streams} stream(s) \
                         appended in the last hour wait: start a process with a feeder"
                    ),
                ),
                Err(e) => (false, format!("{here}; some slices have no feeder ({e})")),
            },
            Err(e) => (false, format!("{here}; feeder leases unreadable: {e}")),
        }
    }

    /// Stops the feeder and releases its lease so another process takes over at once.
    pub async fn shutdown(&self) {
        if let Some(feeder) = self.feeder.as_ref() {
            feeder.shutdown().await;
        }
    }
}

/// Every statement the store runs, prepared once at build.
pub(crate) struct Statements {
    pub(crate) head_cond: PreparedStatement,
    pub(crate) head_new: PreparedStatement,
    pub(crate) insert_event: PreparedStatement,
    pub(crate) read_head: PreparedStatement,
    pub(crate) read_head_serial: PreparedStatement,
    pub(crate) read_events: PreparedStatement,
    pub(crate) read_rows_below: PreparedStatement,
    pub(crate) write_placeholder: PreparedStatement,
    pub(crate) remove_below: PreparedStatement,
    pub(crate) archive_insert: PreparedStatement,
    pub(crate) read_archive: PreparedStatement,
    pub(crate) snapshot_version: PreparedStatement,
    pub(crate) read_commit: PreparedStatement,
    pub(crate) insert_marker: PreparedStatement,
    pub(crate) scan_markers: PreparedStatement,
    pub(crate) meta_init: PreparedStatement,
    pub(crate) meta_read: PreparedStatement,
    pub(crate) meta_heads: PreparedStatement,
    pub(crate) member_join: PreparedStatement,
    pub(crate) member_leave: PreparedStatement,
    pub(crate) member_list: PreparedStatement,
    pub(crate) lease_holders: PreparedStatement,
    pub(crate) append_one_cond: PreparedStatement,
    pub(crate) append_one_new: PreparedStatement,
    pub(crate) meta_allocate: PreparedStatement,
    pub(crate) insert_feed: PreparedStatement,
    pub(crate) read_feed: PreparedStatement,
    pub(crate) insert_progress: PreparedStatement,
    pub(crate) prune_progress: PreparedStatement,
    pub(crate) read_progress: PreparedStatement,
    pub(crate) save_snapshot: PreparedStatement,
    pub(crate) prune_snapshots: PreparedStatement,
    pub(crate) load_snapshot: PreparedStatement,
    pub(crate) save_checkpoint: PreparedStatement,
    pub(crate) claim_checkpoint: PreparedStatement,
    pub(crate) load_checkpoint: PreparedStatement,
    pub(crate) heartbeat_write: PreparedStatement,
    pub(crate) heartbeat_read: PreparedStatement,
    pub(crate) lease_init: PreparedStatement,
    pub(crate) lease_read: PreparedStatement,
    pub(crate) lease_take: PreparedStatement,
    pub(crate) lease_bump: PreparedStatement,
    pub(crate) lease_renew: PreparedStatement,
    pub(crate) lease_release: PreparedStatement,
    pub(crate) save_status: PreparedStatement,
    pub(crate) load_status: PreparedStatement,
    pub(crate) list_status: PreparedStatement,
    pub(crate) request_read: PreparedStatement,
    pub(crate) request_new: PreparedStatement,
    pub(crate) request_replace: PreparedStatement,
    pub(crate) request_take: PreparedStatement,
    pub(crate) add_dead_letter: PreparedStatement,
    pub(crate) dead_letters: PreparedStatement,
    pub(crate) dead_letter_keys: PreparedStatement,
    pub(crate) remove_dead_letter: PreparedStatement,
    pub(crate) saga_create: PreparedStatement,
    pub(crate) saga_update: PreparedStatement,
    pub(crate) saga_load: PreparedStatement,
    pub(crate) saga_list: PreparedStatement,
    pub(crate) saga_index: PreparedStatement,
    pub(crate) saga_unindex: PreparedStatement,
    pub(crate) saga_unfinished: PreparedStatement,
    pub(crate) key_insert: PreparedStatement,
    pub(crate) key_read: PreparedStatement,
    pub(crate) key_delete: PreparedStatement,
    pub(crate) key_id_read: PreparedStatement,
    pub(crate) shredded_insert: PreparedStatement,
    pub(crate) shredded_read: PreparedStatement,
    pub(crate) key_scan: PreparedStatement,
    pub(crate) head_scan: PreparedStatement,
    pub(crate) key_rewrap: PreparedStatement,
    pub(crate) append_timeout: Duration,
}

impl Statements {
    async fn prepare(session: &Session, ks: &str, cfg: &KeelScyllaBuilder) -> Result<Self, Error> {
        let serial = cfg.serial;
        let serial_read = match serial {
            SerialConsistency::Serial => Consistency::Serial,
            SerialConsistency::LocalSerial => Consistency::LocalSerial,
        };
        let consistency = cfg.consistency;
        let request_timeout = cfg.request_timeout;
        let retry_policy: Arc<dyn scylla::policies::retry::RetryPolicy> =
            Arc::new(retry::KeelRetry::default());
        let retry_policy = &retry_policy;
        let prep = |cql: String| async move {
            let mut statement = session
                .prepare(cql.clone())
                .await
                .map_err(|e| Error::Schema {
                    step: format!("prepare `{cql}`"),
                    reason: e.to_string(),
                })?;
            statement.set_consistency(consistency);
            // Every statement is bounded, whatever session it runs on (the append's LWT gets
            // the append timeout where it runs).
            statement.set_request_timeout(Some(request_timeout));
            // Every plain statement of Keel's is idempotent (inserts of fixed keys and values,
            // reads), so the driver may send it to the next node when one is down; `lwt`
            // below turns this off for conditional writes.
            statement.set_is_idempotent(true);
            statement.set_retry_policy(Some(retry_policy.clone()));
            Ok::<_, Error>(statement)
        };
        let lwt = |mut s: PreparedStatement| {
            s.set_serial_consistency(Some(serial));
            s.set_is_idempotent(false);
            s
        };
        let serial_select = |mut s: PreparedStatement| {
            s.set_consistency(serial_read);
            s
        };
        Ok(Statements {
            head_cond: lwt(prep(format!("UPDATE {ks}.events SET head = ? WHERE stream = ? AND bucket = ? IF head = ?")).await?),
            head_new: lwt(prep(format!("UPDATE {ks}.events SET head = ? WHERE stream = ? AND bucket = ? IF head = null")).await?),
            insert_event: prep(format!(
                "INSERT INTO {ks}.events (stream, bucket, version, event_id, event_type, schema_version, payload, metadata, recorded_at, commit_id) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            )).await?,
            read_head: prep(format!("SELECT head FROM {ks}.events WHERE stream = ? AND bucket = ? LIMIT 1")).await?,
            read_head_serial: serial_select(prep(format!("SELECT head FROM {ks}.events WHERE stream = ? AND bucket = ? LIMIT 1")).await?),
            read_events: prep(format!(
                "SELECT version, event_id, event_type, schema_version, payload, metadata, recorded_at \
                 FROM {ks}.events WHERE stream = ? AND bucket = ? AND version >= ? LIMIT ?"
            )).await?,
            read_rows_below: prep(format!(
                "SELECT version, event_id, event_type, schema_version, payload, metadata, recorded_at \
                 FROM {ks}.events WHERE stream = ? AND bucket = ? AND version >= ? AND version < ? LIMIT ?"
            )).await?,
            write_placeholder: prep(format!(
                "UPDATE {ks}.events SET event_id = ?, event_type = ?, schema_version = 1, payload = ?, metadata = null, \
                 recorded_at = ?, commit_id = null WHERE stream = ? AND bucket = ? AND version = ?"
            )).await?,
            remove_below: prep(format!("DELETE FROM {ks}.events WHERE stream = ? AND bucket = ? AND version < ?")).await?,
            archive_insert: prep(format!(
                "INSERT INTO {ks}.events_archive (stream, bucket, version, event_id, event_type, schema_version, payload, metadata, recorded_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            )).await?,
            read_archive: prep(format!(
                "SELECT version, event_id, event_type, schema_version, payload, metadata, recorded_at \
                 FROM {ks}.events_archive WHERE stream = ? AND bucket = ? AND version >= ? LIMIT ?"
            )).await?,
            snapshot_version: prep(format!("SELECT version FROM {ks}.snapshots WHERE stream = ? LIMIT 1")).await?,
            read_commit: serial_select(prep(format!(
                "SELECT commit_id FROM {ks}.events WHERE stream = ? AND bucket = ? AND version = ?"
            )).await?),
            insert_marker: prep(format!(
                "INSERT INTO {ks}.pending (minute, at, marker, stream) VALUES (?, ?, ?, ?) USING TTL 3600"
            )).await?,
            scan_markers: prep(format!("SELECT at, marker, stream FROM {ks}.pending WHERE minute = ? AND at >= ?")).await?,
            meta_init: lwt(prep(format!("INSERT INTO {ks}.feed_meta (id, head) VALUES (?, 0) IF NOT EXISTS")).await?),
            meta_read: serial_select(prep(format!("SELECT head, plan FROM {ks}.feed_meta WHERE id = ?")).await?),
            meta_heads: prep(format!("SELECT id, head FROM {ks}.feed_meta WHERE id IN ?")).await?,
            append_one_cond: lwt(prep(format!(
                "UPDATE {ks}.events SET head = ?, event_id = ?, event_type = ?, schema_version = ?, payload = ?, \
                 metadata = ?, recorded_at = ?, commit_id = ? WHERE stream = ? AND bucket = ? AND version = ? IF head = ?"
            )).await?),
            append_one_new: lwt(prep(format!(
                "UPDATE {ks}.events SET head = ?, event_id = ?, event_type = ?, schema_version = ?, payload = ?, \
                 metadata = ?, recorded_at = ?, commit_id = ? WHERE stream = ? AND bucket = ? AND version = ? IF head = null"
            )).await?),
            meta_allocate: lwt(prep(format!("UPDATE {ks}.feed_meta SET head = ?, plan = ? WHERE id = ? IF head = ?")).await?),
            insert_feed: prep(format!(
                "INSERT INTO {ks}.feed (bucket, position, stream, version, event_id, event_type, schema_version, payload, metadata, recorded_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            )).await?,
            read_feed: prep(format!(
                "SELECT position, stream, version, event_id, event_type, schema_version, payload, metadata, recorded_at \
                 FROM {ks}.feed WHERE bucket = ? AND position >= ? AND position < ?"
            )).await?,
            insert_progress: prep(format!("INSERT INTO {ks}.feed_progress (stream, version) VALUES (?, ?)")).await?,
            prune_progress: prep(format!("DELETE FROM {ks}.feed_progress WHERE stream = ? AND version < ?")).await?,
            read_progress: prep(format!("SELECT version FROM {ks}.feed_progress WHERE stream = ? LIMIT 1")).await?,
            save_snapshot: prep(format!(
                "INSERT INTO {ks}.snapshots (stream, version, schema_version, payload, taken_at, recent_commands) VALUES (?, ?, ?, ?, ?, ?)"
            )).await?,
            prune_snapshots: prep(format!("DELETE FROM {ks}.snapshots WHERE stream = ? AND version < ?")).await?,
            load_snapshot: prep(format!(
                "SELECT version, schema_version, payload, taken_at, recent_commands FROM {ks}.snapshots WHERE stream = ? LIMIT 1"
            )).await?,
            // Every write to a checkpoint row is conditional on its epoch (the fence).
            save_checkpoint: lwt(prep(format!(
                "UPDATE {ks}.checkpoints SET position = ?, epoch = ?, updated_at = ? WHERE name = ? IF epoch <= ?"
            )).await?),
            claim_checkpoint: lwt(prep(format!(
                "UPDATE {ks}.checkpoints SET position = ?, epoch = ?, updated_at = ? WHERE name = ? IF epoch = null"
            )).await?),
            load_checkpoint: serial_select(prep(format!("SELECT position FROM {ks}.checkpoints WHERE name = ?")).await?),
            heartbeat_write: prep(format!(
                "INSERT INTO {ks}.checkpoints (name, position, updated_at) VALUES (?, ?, ?) USING TTL {}",
                crate::feed::HEARTBEAT_TTL_SECS
            )).await?,
            heartbeat_read: prep(format!("SELECT updated_at FROM {ks}.checkpoints WHERE name = ?")).await?,
            member_join: prep(format!(
                "INSERT INTO {ks}.members (work, member, joined_at) VALUES (?, ?, ?) USING TTL ?"
            )).await?,
            member_leave: prep(format!("DELETE FROM {ks}.members WHERE work = ? AND member = ?")).await?,
            member_list: prep(format!("SELECT member FROM {ks}.members WHERE work = ?")).await?,
            lease_holders: prep(format!("SELECT name, holder FROM {ks}.leases WHERE name IN ?")).await?,
            lease_init: lwt(prep(format!("INSERT INTO {ks}.leases (name, epoch) VALUES (?, 0) IF NOT EXISTS")).await?),
            lease_read: serial_select(prep(format!("SELECT holder, epoch FROM {ks}.leases WHERE name = ?")).await?),
            lease_take: lwt(prep(format!(
                "UPDATE {ks}.leases USING TTL ? SET holder = ? WHERE name = ? IF holder = null AND epoch = ?"
            )).await?),
            lease_bump: prep(format!("UPDATE {ks}.leases SET epoch = ? WHERE name = ?")).await?,
            lease_renew: lwt(prep(format!(
                "UPDATE {ks}.leases USING TTL ? SET holder = ? WHERE name = ? IF holder = ? AND epoch = ?"
            )).await?),
            lease_release: lwt(prep(format!("DELETE holder FROM {ks}.leases WHERE name = ? IF holder = ? AND epoch = ?")).await?),
            save_status: prep(format!("INSERT INTO {ks}.projection_status (name, status) VALUES (?, ?)")).await?,
            load_status: prep(format!("SELECT status FROM {ks}.projection_status WHERE name = ?")).await?,
            list_status: prep(format!("SELECT status FROM {ks}.projection_status")).await?,
            // Not SERIAL: a request written a moment ago is seen on the next step; the take
            // itself is conditional.
            request_read: prep(format!("SELECT control, request_id FROM {ks}.projection_requests WHERE name = ?")).await?,
            request_new: lwt(prep(format!(
                "INSERT INTO {ks}.projection_requests (name, control, request_id) VALUES (?, ?, ?) IF NOT EXISTS"
            )).await?),
            request_replace: lwt(prep(format!(
                "UPDATE {ks}.projection_requests SET control = ?, request_id = ? WHERE name = ? IF request_id = ?"
            )).await?),
            request_take: lwt(prep(format!("DELETE FROM {ks}.projection_requests WHERE name = ? IF request_id = ?")).await?),
            add_dead_letter: prep(format!(
                "INSERT INTO {ks}.dead_letters (projection, at, id, letter) VALUES (?, ?, ?, ?)"
            )).await?,
            dead_letters: prep(format!("SELECT letter FROM {ks}.dead_letters WHERE projection = ?")).await?,
            dead_letter_keys: prep(format!("SELECT at, id, letter FROM {ks}.dead_letters WHERE projection = ?")).await?,
            remove_dead_letter: prep(format!(
                "DELETE FROM {ks}.dead_letters WHERE projection = ? AND at = ? AND id = ?"
            ))
            .await?,
            saga_create: lwt(prep(format!(
                "INSERT INTO {ks}.sagas (id, revision, status, deadline, data) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
            )).await?),
            saga_update: lwt(prep(format!(
                "UPDATE {ks}.sagas SET revision = ?, status = ?, deadline = ?, data = ? WHERE id = ? IF revision = ?"
            )).await?),
            saga_load: prep(format!("SELECT id, revision, status, deadline, data FROM {ks}.sagas WHERE id = ?")).await?,
            saga_list: prep(format!("SELECT id, revision, status, deadline, data FROM {ks}.sagas")).await?,
            saga_index: prep(format!("INSERT INTO {ks}.sagas_unfinished (bucket, id, indexed_at) VALUES (?, ?, ?)")).await?,
            saga_unindex: prep(format!("DELETE FROM {ks}.sagas_unfinished WHERE bucket = ? AND id = ?")).await?,
            saga_unfinished: prep(format!("SELECT id, indexed_at FROM {ks}.sagas_unfinished WHERE bucket = ?")).await?,
            key_insert: lwt(prep(format!(
                "INSERT INTO {ks}.keys (subject, key_id, wrapped, created_at) VALUES (?, ?, ?, ?) IF NOT EXISTS"
            )).await?),
            key_read: serial_select(prep(format!("SELECT key_id, wrapped FROM {ks}.keys WHERE subject = ?")).await?),
            key_delete: lwt(prep(format!("DELETE FROM {ks}.keys WHERE subject = ? IF key_id = ?")).await?),
            key_id_read: serial_select(prep(format!("SELECT key_id FROM {ks}.keys WHERE subject = ?")).await?),
            shredded_insert: prep(format!("INSERT INTO {ks}.shredded_keys (key_id, shredded_at) VALUES (?, ?)")).await?,
            shredded_read: prep(format!("SELECT key_id FROM {ks}.shredded_keys WHERE key_id = ?")).await?,
            key_scan: prep(format!("SELECT subject, key_id, wrapped FROM {ks}.keys")).await?,
            head_scan: prep(format!("SELECT DISTINCT stream, bucket, head FROM {ks}.events")).await?,
            key_rewrap: lwt(prep(format!("UPDATE {ks}.keys SET wrapped = ? WHERE subject = ? IF key_id = ? AND wrapped = ?")).await?),
            append_timeout: cfg.append_timeout,
        })
    }
}

/// The store as a part of a service: its feeder (when [`feeder`](KeelScyllaBuilder::feeder)
/// is on) is what runs in the background. It starts with the store, so `start` does nothing;
/// `shutdown` is [`KeelScylla::shutdown`] (the feeder's slices go to the other
/// processes at once); the store still reads and appends afterwards.
#[async_trait::async_trait]
impl keel::lifecycle::Component for KeelScylla {
    fn name(&self) -> String {
        format!("scylla store `{}`", self.shared.keyspace)
    }

    fn start(&self) {}

    async fn shutdown(&self) {
        self.shutdown().await;
    }

    async fn health(&self) -> keel::health::Health {
        KeelScylla::health(self).await
    }
}
