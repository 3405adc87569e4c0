//! Metric names Keel records through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! Install any recorder (Prometheus, StatsD, OpenTelemetry) and these appear; without one,
//! recording costs next to nothing. Install it at start-up, before building repositories and codecs:
//! they register their handles once, with the recorder installed at that moment. Components also offer in-process snapshots
//! ([`Repository::metrics`](crate::Repository::metrics),
//! [`MetricsLayer::snapshot`](crate::bus::MetricsLayer::snapshot)).
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `keel_dispatch_total` | counter | `kind` (command/query), `type` |
//! | `keel_dispatch_failures_total` | counter | `kind`, `type` |
//! | `keel_dispatch_seconds` | histogram | `kind`, `type` |
//! | `keel_loads_total` | counter | `aggregate` |
//! | `keel_events_replayed_total` | counter | `aggregate` |
//! | `keel_load_seconds` | histogram | `aggregate` |
//! | `keel_appends_total` | counter | `aggregate` |
//! | `keel_events_per_append` | histogram | `aggregate` |
//! | `keel_conflicts_total` | counter | `aggregate` |
//! | `keel_retries_total` | counter | `aggregate` |
//! | `keel_snapshots_total` | counter | `aggregate` |
//! | `keel_payloads_compressed_total` | counter | |
//! | `keel_payloads_encrypted_total` | counter | |
//! | `keel_payloads_unreadable_total` | counter | `reason` (shredded/tampered/corrupt/sealed) |
//! | `keel_subjects_shredded_total` | counter | |
//! | `keel_projection_events_shredded_total` | counter | `projection` |
//!
//! # Spans
//!
//! | span | level | fields |
//! |---|---|---|
//! | `keel.dispatch` (`TraceLayer`) | info | `kind`, `type`, `correlation_id` |
//! | `keel.load` | debug | `aggregate`, `stream`, `version` (recorded when loaded) |
//! | `keel.append` | debug | `aggregate`, `stream`, `expected`, `events`, `event_type` (the first event's), `version` (recorded when appended), `correlation_id` |
//! | `keel_scylla.append` | debug | `stream`, `events` |
//! | `keel.project` | debug | `projection`, `generation`, `from`, `events` (one per batch) |
//! | `keel.saga` / `keel.saga_step` | info | `saga`, `correlation_id`; `step`, `undo`, `command` |

/// Commands and queries dispatched.
pub const DISPATCHED: &str = "keel_dispatch_total";
/// Commands and queries that ended in an error.
pub const DISPATCH_FAILURES: &str = "keel_dispatch_failures_total";
/// Dispatch latency.
pub const DISPATCH_SECONDS: &str = "keel_dispatch_seconds";
/// Aggregates loaded.
pub const LOADS: &str = "keel_loads_total";
/// Events applied while loading aggregates.
pub const EVENTS_REPLAYED: &str = "keel_events_replayed_total";
/// Aggregate load latency.
pub const LOAD_SECONDS: &str = "keel_load_seconds";
/// Successful appends.
pub const APPENDS: &str = "keel_appends_total";
/// Events per successful append.
pub const EVENTS_PER_APPEND: &str = "keel_events_per_append";
/// Appends refused for a version conflict.
pub const CONFLICTS: &str = "keel_conflicts_total";
/// Commands retried after a conflict.
pub const RETRIES: &str = "keel_retries_total";
/// Snapshots written.
pub const SNAPSHOTS: &str = "keel_snapshots_total";
/// Counter: commands decided on a cached aggregate (label `aggregate`).
pub const CACHE_HITS: &str = "keel_aggregate_cache_hits_total";
/// Counter: commands that loaded their aggregate with the cache on (label `aggregate`).
pub const CACHE_MISSES: &str = "keel_aggregate_cache_misses_total";
/// Counter: conflicts of commands decided on cached state (label `aggregate`).
pub const CACHE_CONFLICTS: &str = "keel_aggregate_cache_conflicts_total";
/// Payloads a codec compressed.
pub const PAYLOADS_COMPRESSED: &str = "keel_payloads_compressed_total";
/// Payloads a codec encrypted.
pub const PAYLOADS_ENCRYPTED: &str = "keel_payloads_encrypted_total";
/// Payloads read that could not be opened.
pub const PAYLOADS_UNREADABLE: &str = "keel_payloads_unreadable_total";
/// Subjects whose keys were deleted.
pub const SUBJECTS_SHREDDED: &str = "keel_subjects_shredded_total";
/// Shredded events a projection skipped.
pub const PROJECTION_SHREDDED: &str = "keel_projection_events_shredded_total";
