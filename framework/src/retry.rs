//! One backoff policy for every retry in Keel: exponential from a first delay, capped, with
//! jitter so that writers who collided once do not collide again in step.
//!
//! Which layer retries what (one rule, so that retries never multiply):
//!
//! - **Version conflicts** are retried by the [`Repository`](crate::Repository) alone: only
//!   it can reload the aggregate and decide the command again. A conflict that leaves the
//!   repository has used up its retries and is final.
//! - **[`RetryLayer`](crate::bus::RetryLayer)** on the command bus retries what no layer
//!   below it could: a store that refused before writing anything
//!   ([`Error::Unavailable`](crate::Error::Unavailable)), and, for a command that carries a
//!   [`command_id`](crate::Metadata::command_id), an append whose outcome is unknown
//!   ([`Error::UnknownOutcome`](crate::Error::UnknownOutcome)): the repository's command
//!   window turns the re-send into a no-op if the first attempt landed. It retries conflicts
//!   only when told to ([`RetryLayer::conflicts`](crate::bus::RetryLayer::conflicts)), for
//!   handlers that append without a repository.
//! - **The [`SagaOrchestrator`](crate::saga::SagaOrchestrator)** retries a failed step or
//!   compensation up to its attempt limit, each time with the same command id.
//! - **Stores** do not retry appends (the ScyllaDB store reads an unknown LWT outcome back,
//!   which is not a retry).
//!
//! ```
//! use std::time::Duration;
//! use keel::retry::Backoff;
//!
//! let backoff = Backoff::new(Duration::from_millis(10)).max(Duration::from_millis(50));
//! let delays: Vec<Duration> = backoff.delays().take(5).collect();
//! // 10, 20, 40, 50, 50 ms, each stretched by up to as much again at random.
//! assert!(delays[0] >= Duration::from_millis(10) && delays[0] < Duration::from_millis(20));
//! assert!(delays[4] >= Duration::from_millis(50) && delays[4] < Duration::from_millis(100));
//! ```

use std::time::Duration;

/// The cap on one delay unless [`Backoff::max`] says otherwise.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Exponential backoff: `first`, then doubling on each attempt up to `max`, each delay
/// stretched by a random part of itself (up to 2x) unless jitter is turned off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    jitter: bool,
}

impl Backoff {
    /// Starts at `first`, capped at [`DEFAULT_MAX_DELAY`] (or at `first` when that is
    /// longer), with jitter.
    pub fn new(first: Duration) -> Self {
        Backoff {
            first,
            max: DEFAULT_MAX_DELAY.max(first),
            jitter: true,
        }
    }

    /// Caps one delay at `max` (before jitter).
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max.max(self.first);
        self
    }

    /// Exactly `first`, `2 * first`, ..., up to `max`: for tests that count time.
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// The first delay.
    pub fn first(&self) -> Duration {
        self.first
    }

    /// The delay before retry number `retry` (1 for the first), for a caller that keeps its
    /// attempt count elsewhere (a saga's, stored with it).
    pub fn delay(&self, retry: u32) -> Duration {
        self.delays()
            .nth(retry.saturating_sub(1) as usize)
            .unwrap_or(self.max)
    }

    /// The delays before the 1st, 2nd, ... retry, without end.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + 'static {
        let builder = backon::ExponentialBuilder::new()
            .with_min_delay(self.first)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .without_max_times();
        let builder = if self.jitter {
            builder.with_jitter()
        } else {
            builder
        };
        backon::BackoffBuilder::build(builder)
    }
}

impl From<Duration> for Backoff {
    /// [`Backoff::new`]: a bare duration is the first delay.
    fn from(first: Duration) -> Self {
        Backoff::new(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let ms = Duration::from_millis;
        let exact: Vec<_> = Backoff::new(ms(1))
            .max(ms(5))
            .without_jitter()
            .delays()
            .take(6)
            .collect();
        assert_eq!(exact, [ms(1), ms(2), ms(4), ms(5), ms(5), ms(5)]);
    }

    #[test]
    fn jitter_stays_within_one_delay_and_varies() {
        let ms = Duration::from_millis;
        let backoff = Backoff::new(ms(100));
        let firsts: Vec<_> = (0..32).map(|_| backoff.delays().next().unwrap()).collect();
        assert!(firsts.iter().all(|d| *d >= ms(100) && *d < ms(200)));
        assert!(
            firsts.iter().any(|d| *d != firsts[0]),
            "32 jittered delays were all {:?}",
            firsts[0]
        );
    }

    #[test]
    fn a_zero_backoff_never_sleeps() {
        assert!(Backoff::new(Duration::ZERO)
            .max(Duration::ZERO)
            .delays()
            .take(10)
            .all(|d| d.is_zero()));
    }
}
