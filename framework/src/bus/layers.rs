//! The layers Keel ships: tracing, metrics, timeout, retry on conflict, validation, caching.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::Instant as CacheInstant;

use dashmap::DashMap;
use futures::future::BoxFuture;
use tracing::Instrument;

use super::{Kind, Layer, Message, Reply, Request, Service};
use crate::error::{Error, Result};
use crate::retry::Backoff;

/// What a layer does around the service it wraps. Every shipped layer implements this and
/// gets [`Layer`] for free.
trait Around: Clone + Send + Sync + 'static {
    fn around(
        &self,
        inner: Arc<dyn Service>,
        request: Request,
    ) -> BoxFuture<'static, Result<Reply>>;
}

struct Wrapped<L> {
    layer: L,
    inner: Arc<dyn Service>,
}

impl<L: Around> Service for Wrapped<L> {
    fn call(&self, request: Request) -> BoxFuture<'static, Result<Reply>> {
        self.layer.around(self.inner.clone(), request)
    }
}

impl<L: Around> Layer for L {
    fn layer(&self, inner: Arc<dyn Service>) -> Arc<dyn Service> {
        Arc::new(Wrapped {
            layer: self.clone(),
            inner,
        })
    }
}

/// One `keel.dispatch` span per message, with its kind, type and correlation id; errors are
/// logged at `warn` inside it.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl Around for TraceLayer {
    fn around(
        &self,
        inner: Arc<dyn Service>,
        request: Request,
    ) -> BoxFuture<'static, Result<Reply>> {
        let span = tracing::info_span!(
            "keel.dispatch",
            kind = request.kind.as_str(),
            r#type = request.type_name(),
            correlation_id = request.metadata.correlation_id.map(tracing::field::display),
        );
        Box::pin(
            async move {
                let result = inner.call(request).await;
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "dispatch failed");
                }
                result
            }
            .instrument(span),
        )
    }
}

/// Counters of one message type, as seen by a [`MetricsLayer`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DispatchStats {
    /// Dispatches.
    pub count: u64,
    /// Dispatches that ended in an error.
    pub failures: u64,
    /// Sum of dispatch latencies.
    pub total_latency: Duration,
}

/// Counts dispatches, failures and latency per message type, both through the `metrics`
/// facade (names in [`crate::metrics`]) and in a snapshot ([`MetricsLayer::snapshot`]).
/// Clones share the counters: keep one to read them.
///
/// The facade's handles of a message type are registered at its first dispatch, with the
/// recorder installed at that time, and reused after that.
#[derive(Clone, Debug, Default)]
pub struct MetricsLayer {
    types: Arc<DashMap<(std::any::TypeId, Kind), Arc<TypeMetrics>, foldhash::fast::RandomState>>,
}

/// The counters and facade handles of one message type.
#[derive(Debug)]
struct TypeMetrics {
    type_name: &'static str,
    count: AtomicU64,
    failures: AtomicU64,
    latency_nanos: AtomicU64,
    dispatched: metrics::Counter,
    failed: metrics::Counter,
    seconds: metrics::Histogram,
}

impl TypeMetrics {
    fn register(kind: Kind, type_name: &'static str) -> Self {
        let kind = kind.as_str();
        let labels = [("kind", kind), ("type", type_name)];
        TypeMetrics {
            type_name,
            count: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency_nanos: AtomicU64::new(0),
            dispatched: metrics::counter!(crate::metrics::DISPATCHED, &labels),
            failed: metrics::counter!(crate::metrics::DISPATCH_FAILURES, &labels),
            seconds: metrics::histogram!(crate::metrics::DISPATCH_SECONDS, &labels),
        }
    }

    fn record(&self, failed: bool, elapsed: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.latency_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        self.dispatched.increment(1);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
            self.failed.increment(1);
        }
        self.seconds.record(elapsed.as_secs_f64());
    }
}

impl MetricsLayer {
    /// A layer with empty counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters so far, by message type name (a type dispatched both as a command and as
    /// a query counts both).
    pub fn snapshot(&self) -> HashMap<&'static str, DispatchStats> {
        let mut stats: HashMap<&'static str, DispatchStats> = HashMap::new();
        for entry in self.types.iter() {
            let t = entry.value();
            let s = stats.entry(t.type_name).or_default();
            s.count += t.count.load(Ordering::Relaxed);
            s.failures += t.failures.load(Ordering::Relaxed);
            s.total_latency += Duration::from_nanos(t.latency_nanos.load(Ordering::Relaxed));
        }
        stats
    }

    fn of(&self, request: &Request) -> Arc<TypeMetrics> {
        let key = (request.message.as_any().type_id(), request.kind);
        if let Some(found) = self.types.get(&key) {
            return found.clone();
        }
        self.types
            .entry(key)
            .or_insert_with(|| Arc::new(TypeMetrics::register(request.kind, request.type_name())))
            .clone()
    }
}

impl Around for MetricsLayer {
    fn around(
        &self,
        inner: Arc<dyn Service>,
        request: Request,
    ) -> BoxFuture<'static, Result<Reply>> {
        let metrics = self.of(&request);
        Box::pin(async move {
            let started = Instant::now();
            let result = inner.call(request).await;
            metrics.record(result.is_err(), started.elapsed());
            result
        })
    }
}

/// Fails a dispatch with [`Error::Timeout`] when it takes longer than the limit. The handler's
/// future is dropped at that point.
#[derive(Clone, Copy, Debug)]
pub struct TimeoutLayer {
    limit: Duration,
}

impl TimeoutLayer {
    /// A layer with this limit per dispatch.
    pub fn new(limit: Duration) -> Self {
        TimeoutLayer { limit }
    }
}

impl Around for TimeoutLayer {
    fn around(
        &self,
        inner: Arc<dyn Service>,
        request: Request,
    ) -> BoxFuture<'static, Result<Reply>> {
        let limit = self.limit;
        Box::pin(async move {
            let type_name = request.type_name();
            match tokio::time::timeout(limit, inner.call(request)).await {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout {
                    operation: type_name.to_owned(),
                    after: limit,
                }),
            }
        })
    }
}

/// Sends a command again when retrying it is safe and may help, with the shared
/// [`Backoff`] (exponential, capped, jittered). See [the retry rule](crate::retry):
///
/// - [`Error::Unavailable`]: the store refused before writing anything. Always retried.
/// - [`Error::UnknownOutcome`]: retried only when the command carries a
///   [`command_id`](crate::Metadata::command_id), which makes the re-send a no-op if the first
///   attempt landed.
/// - [`Error::Conflict`]: not retried unless [`conflicts`](RetryLayer::conflicts) is set. The
///   [`Repository`](crate::Repository) already retried it (reloading and deciding again), so
///   a retry here would only multiply its attempts.
///
/// Anything else (a rejection, a validation error, a timeout of this bus) is final.
#[derive(Clone, Copy, Debug)]
pub struct RetryLayer {
    max_retries: u32,
    backoff: Backoff,
    conflicts: bool,
}

impl RetryLayer {
    /// Up to `max_retries` more attempts, waiting as `backoff` says (a bare [`Duration`] is
    /// the first delay, doubled each time up to 1 s, with jitter).
    pub fn new(max_retries: u32, backoff: impl Into<Backoff>) -> Self {
        RetryLayer {
            max_retries,
            backoff: backoff.into(),
            conflicts: false,
        }
    }

    /// Also retries [`Error::Conflict`]: for handlers that append through an
    /// [`EventStore`](crate::EventStore) directly, whose conflict nothing below retried.
    /// Handlers that go through a [`Repository`](crate::Repository) should not need it.
    pub fn conflicts(mut self) -> Self {
        self.conflicts = true;
        self
    }

    fn retries(&self, error: &Error, request: &Request) -> bool {
        match error {
            Error::Unavailable { .. } => true,
            Error::UnknownOutcome { .. } => request.metadata.command_id.is_some(),
            Error::Conflict { .. } => self.conflicts,
            _ => false,
        }
    }
}

impl Around for RetryLayer {
    fn around(
        &self,
        inner: Arc<dyn Service>,
        request: Request,
    ) -> BoxFuture<'static, Result<Reply>> {
        let this = *self;
        Box::pin(async move {
            let mut attempt = 0;
            let mut delays = this.backoff.delays();
            loop {
                match inner.call(request.clone()).await {
                    Err(e) if attempt < this.max_retries && this.retries(&e, &request) => {
                        attempt += 1;
                        tracing::debug!(
                            r#type = request.type_name(),
                            attempt,
                            error = %e,
                            "retrying"
                        );
                        tokio::time::sleep(delays.next().unwrap_or_default()).await;
                    }
                    other => return other,
                }
            }
        })
    }
}

/// Refuses a message whose own `validate` fails, with [`Error::Invalid`], before any handler
/// runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct ValidateLayer;

impl Around for ValidateLayer {
    fn around(
        &self,
        inner: Arc<dyn Service>,
        request: Request,
    ) -> BoxFuture<'static, Result<Reply>> {
        match request.message.validate() {
            Ok(()) => inner.call(request),
            Err(reason) => {
                let type_name = request.type_name();
                Box::pin(async move { Err(Error::Invalid { type_name, reason }) })
            }
        }
    }
}

/// A cached query, keyed by its value: equal hashes are not enough to share an answer.
#[derive(Clone)]
struct CacheKey {
    hash: u64,
    query: Arc<dyn Message>,
}

impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.query.same_query(&*other.query)
    }
}

impl Eq for CacheKey {}

type Entries = quick_cache::sync::Cache<CacheKey, (CacheInstant, Reply)>;

/// Caches successful query results for a time to live, keyed by the query's value (its type,
/// and equality: queries whose hashes collide still get their own answers). Commands pass
/// through untouched.
///
/// At most `capacity` results are kept (10,000 by default), the least recently used pushed
/// out first; an expired result is dropped when next asked for. The cache is sharded, so
/// concurrent lookups do not wait on one lock.
#[derive(Clone)]
pub struct CacheLayer {
    ttl: Duration,
    entries: Arc<Entries>,
}

impl std::fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLayer")
            .field("ttl", &self.ttl)
            .field("capacity", &self.entries.capacity())
            .field("cached", &self.entries.len())
            .finish()
    }
}

impl CacheLayer {
    /// A cache keeping results for `ttl`, at most 10,000 of them.
    pub fn new(ttl: Duration) -> Self {
        CacheLayer {
            ttl,
            entries: Arc::new(Entries::new(10_000)),
        }
    }

    /// Sets how many results are kept at most (0 keeps none). Call it before the layer is
    /// cloned into a bus: it starts an empty cache.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.entries = Arc::new(Entries::new(capacity.max(1)));
        if capacity == 0 {
            self.ttl = Duration::ZERO;
        }
        self
    }

    /// Forgets every cached result (after a write that makes them stale, say).
    pub fn clear(&self) {
        self.entries.clear();
    }

    /// Results kept now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no result is kept now.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Around for CacheLayer {
    fn around(
        &self,
        inner: Arc<dyn Service>,
        request: Request,
    ) -> BoxFuture<'static, Result<Reply>> {
        let key = match (request.kind, request.message.query_hash()) {
            (Kind::Query, Some(hash)) if !self.ttl.is_zero() => CacheKey {
                hash,
                query: request.message.clone(),
            },
            _ => return inner.call(request),
        };
        // A query that must see a write (read-your-writes) is answered afresh; its answer
        // replaces what was kept.
        let fresh = request.metadata.user.contains_key(super::FRESH);
        if let Some((at, reply)) = self.entries.get(&key).filter(|_| !fresh) {
            if at.elapsed() < self.ttl {
                return Box::pin(async move { Ok(reply) });
            }
            self.entries.remove(&key);
        }
        let entries = self.entries.clone();
        Box::pin(async move {
            let reply = inner.call(request).await?;
            entries.insert(key, (CacheInstant::now(), reply.clone()));
            Ok(reply)
        })
    }
}
