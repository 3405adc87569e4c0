//! Typed configuration for the buses and the repository: serde, loadable from JSON or from
//! the environment, validated with errors that name the field. Defaults are listed in
//! `docs/configuration.md`.
//!
//! ```
//! use keel::config::KeelConfig;
//!
//! let config = KeelConfig::from_json(r#"{ "commands": { "timeout_ms": 2000 }, "repository": { "snapshot_every": 100 } }"#)?;
//! assert_eq!(config.commands.timeout_ms, Some(2000));
//! assert_eq!(config.commands.retry_attempts, 3); // a default
//!
//! let bad = KeelConfig::from_json(r#"{ "repository": { "snapshot_every": 0 } }"#).unwrap_err();
//! assert!(bad.to_string().contains("repository.snapshot_every"));
//! # Ok::<(), keel::Error>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The largest payload a codec decompresses unless configured otherwise: 64 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 << 20;

/// How many of a stream's last commands a repository remembers by id unless configured
/// otherwise: 128.
pub const DEFAULT_COMMAND_WINDOW: usize = 128;

/// How many aggregates a repository keeps in memory between commands unless configured
/// otherwise: 10,000.
pub const DEFAULT_CACHE_ENTRIES: usize = 10_000;

/// How a bus dispatches: which layers it gets, with which settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// Limit per dispatch in milliseconds (`null`: none). Default 5,000.
    pub timeout_ms: Option<u64>,
    /// Retries after a version conflict (0: none). Default 3.
    pub retry_attempts: u32,
    /// First backoff between retries in milliseconds, doubled each time. Default 5.
    pub retry_backoff_ms: u64,
    /// Whether messages' own `validate` runs before the handler. Default true.
    pub validation: bool,
    /// One span per dispatch. Default true.
    pub tracing: bool,
    /// Queries only: cache results this many milliseconds (`null`: no cache). Default null.
    pub cache_ttl_ms: Option<u64>,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            timeout_ms: Some(5_000),
            retry_attempts: 3,
            retry_backoff_ms: 5,
            validation: true,
            tracing: true,
            cache_ttl_ms: None,
        }
    }
}

/// How the repository loads and saves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepositoryConfig {
    /// Snapshot every this many events (`null`: never). Default null.
    pub snapshot_every: Option<u64>,
    /// Retries of a command after a version conflict. Default 3.
    pub max_retries: u32,
    /// First backoff between retries in milliseconds, doubled each time. Default 1.
    pub retry_backoff_ms: u64,
    /// How many of a stream's last commands are remembered by id, so that a re-sent command
    /// is applied once (0: off). Default 128.
    pub command_window: usize,
    /// How many aggregates are kept in memory between commands (0: no cache). Default 10,000.
    pub cache_entries: usize,
    /// How long a cached aggregate is used, in milliseconds (`null`: no limit). Default null.
    pub cache_max_age_ms: Option<u64>,
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        RepositoryConfig {
            snapshot_every: None,
            max_retries: 3,
            retry_backoff_ms: 1,
            command_window: DEFAULT_COMMAND_WINDOW,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            cache_max_age_ms: None,
        }
    }
}

/// How payloads are stored: see [`Codec`](crate::codec::Codec) and
/// [`Codec::from_config`](crate::codec::Codec::from_config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PayloadConfig {
    /// Compress (LZ4) payloads longer than this many bytes (`null`: never). Default null.
    pub compress_above_bytes: Option<usize>,
    /// Encrypt payloads (AES-256-GCM) with a key per stream. Default false.
    pub encrypt: bool,
    /// How long keys read from the key store are reused, in milliseconds. Default 60,000.
    pub key_cache_ttl_ms: u64,
    /// The largest payload decompressed; larger ones read as corrupt. Default 64 MiB.
    pub max_payload_bytes: usize,
}

impl Default for PayloadConfig {
    fn default() -> Self {
        PayloadConfig {
            compress_above_bytes: None,
            encrypt: false,
            key_cache_ttl_ms: 60_000,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// Keel's configuration: the command bus, the query bus, the repository, payloads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeelConfig {
    /// The command bus.
    pub commands: BusConfig,
    /// The query bus.
    pub queries: BusConfig,
    /// The repository.
    pub repository: RepositoryConfig,
    /// How payloads are stored.
    pub payloads: PayloadConfig,
}

fn refuse(field: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

impl BusConfig {
    fn validate(&self, prefix: &str) -> Result<()> {
        if self.timeout_ms == Some(0) {
            return Err(refuse(
                &format!("{prefix}.timeout_ms"),
                "0 would fail every dispatch; use null for no limit",
            ));
        }
        if self.retry_backoff_ms > 60_000 {
            return Err(refuse(
                &format!("{prefix}.retry_backoff_ms"),
                "more than a minute between retries",
            ));
        }
        if self.cache_ttl_ms == Some(0) {
            return Err(refuse(
                &format!("{prefix}.cache_ttl_ms"),
                "0 caches nothing; use null for no cache",
            ));
        }
        if prefix == "commands" && self.cache_ttl_ms.is_some() {
            return Err(refuse("commands.cache_ttl_ms", "commands are never cached"));
        }
        Ok(())
    }
}

impl KeelConfig {
    /// Checks every field; the error names the first bad one (`commands.timeout_ms`).
    pub fn validate(&self) -> Result<()> {
        self.commands.validate("commands")?;
        self.queries.validate("queries")?;
        if self.repository.cache_max_age_ms == Some(0) {
            return Err(refuse(
                "repository.cache_max_age_ms",
                "0 would never use a cached aggregate; use cache_entries = 0 to turn the cache off",
            ));
        }
        if self.repository.snapshot_every == Some(0) {
            return Err(refuse(
                "repository.snapshot_every",
                "0 events; use null to turn snapshots off",
            ));
        }
        if self.repository.retry_backoff_ms > 60_000 {
            return Err(refuse(
                "repository.retry_backoff_ms",
                "more than a minute between retries",
            ));
        }
        if self.payloads.max_payload_bytes == 0 {
            return Err(refuse(
                "payloads.max_payload_bytes",
                "0 bytes would refuse every compressed payload",
            ));
        }
        if self.payloads.max_payload_bytes > u32::MAX as usize {
            return Err(refuse(
                "payloads.max_payload_bytes",
                "more than 4 GiB; a stored payload records its length in 32 bits",
            ));
        }
        Ok(())
    }

    /// Reads a JSON document (missing fields take their defaults, unknown fields are refused)
    /// and validates it.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: KeelConfig =
            serde_json::from_str(text).map_err(|e| refuse("(document)", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a JSON file.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| refuse("(file)", format!("{}: {e}", path.display())))?;
        Self::from_json(&text)
    }

    /// Reads `KEEL_<SECTION>_<FIELD>` variables over the defaults, e.g.
    /// `KEEL_COMMANDS_TIMEOUT_MS=2000`, `KEEL_REPOSITORY_SNAPSHOT_EVERY=100`,
    /// `KEEL_QUERIES_CACHE_TTL_MS=null`. Values are JSON scalars.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(std::env::vars())
    }

    /// [`from_env`](Self::from_env) over the given variables.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let mut doc = serde_json::to_value(KeelConfig::default())
            .map_err(|e| refuse("(defaults)", e.to_string()))?;
        for (key, value) in vars {
            let Some(rest) = key.strip_prefix("KEEL_") else {
                continue;
            };
            let rest = rest.to_ascii_lowercase();
            let Some((section, field)) = ["commands", "queries", "repository", "payloads"]
                .iter()
                .find_map(|s| {
                    rest.strip_prefix(&format!("{s}_"))
                        .map(|f| (*s, f.to_owned()))
                })
            else {
                continue;
            };
            let name = format!("{section}.{field}");
            let Some(slot) = doc[section].get_mut(&field) else {
                return Err(refuse(&name, format!("unknown setting (from {key})")));
            };
            *slot = serde_json::from_str(&value)
                .or_else(|_| serde_json::from_str(&format!("\"{value}\"")))
                .map_err(|e| refuse(&name, e.to_string()))?;
        }
        let config: KeelConfig =
            serde_json::from_value(doc).map_err(|e| refuse("(environment)", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }
}
