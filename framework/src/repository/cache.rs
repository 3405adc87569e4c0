//! The aggregate cache: a command on an aggregate this repository decided on before skips the
//! load (snapshot read and replay) and decides on the state it kept.
//!
//! Keeping state is safe because the append is exact: a command decided on a cached version
//! that another process has moved past gets [`Error::Conflict`](crate::Error::Conflict), the
//! entry is dropped, and the retry loads the stream. Each cached stream has a *slot*; a
//! command takes the entry out of its slot for its length and puts it back only when its
//! outcome is known (appended, or nothing changed), so an unknown outcome, a failed append or
//! a panic leaves the slot empty. The slot itself stays in the cache: a command costs one
//! lookup and no allocation, and the next one on the stream loads into the same slot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, UnitWeighter};

use super::window::CommandWindow;
use super::Loaded;
use crate::event::StreamId;

/// An aggregate's state as the last command left it.
pub(crate) struct Entry<A> {
    pub(crate) loaded: Loaded<A>,
    pub(crate) window: CommandWindow,
    /// The store's [`cache_epoch`](crate::EventStore::cache_epoch) when it was loaded.
    pub(crate) epoch: u64,
    /// When its state was last read from the store: `max_age` counts from here, so a busy
    /// entry is not kept alive forever by its own commands.
    pub(crate) loaded_at: Instant,
}

/// Counts evictions (entries pushed out by the bound), not removals.
#[derive(Clone, Default)]
struct CountEvictions(Arc<AtomicU64>);

impl<K, V> Lifecycle<K, V> for CountEvictions {
    type RequestState = ();

    fn begin_request(&self) {}

    fn on_evict(&self, _: &mut (), _: K, _: V) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a stream's entry is kept; empty while a command has it, or after one failed.
pub(crate) type Slot<A> = Arc<Mutex<Option<Entry<A>>>>;

type Inner<A> = Cache<StreamId, Slot<A>, UnitWeighter, DefaultHashBuilder, CountEvictions>;

/// At most `capacity` aggregates, least recently used (with scan resistance) evicted first.
pub(crate) struct AggregateCache<A> {
    entries: Inner<A>,
    evictions: CountEvictions,
    max_age: Option<Duration>,
}

impl<A> AggregateCache<A> {
    /// `None` when `capacity` is 0 (the cache is off).
    pub(crate) fn new(capacity: usize, max_age: Option<Duration>) -> Option<Self> {
        if capacity == 0 {
            return None;
        }
        let evictions = CountEvictions::default();
        let entries = Cache::with(
            capacity,
            capacity as u64,
            UnitWeighter,
            DefaultHashBuilder::default(),
            evictions.clone(),
        );
        Some(AggregateCache {
            entries,
            evictions,
            max_age,
        })
    }

    /// Takes the entry of `stream` out of its slot, if one is kept and still good for
    /// `epoch`; gives the slot too (when the stream has one), to put the entry back into.
    pub(crate) fn take(
        &self,
        stream: &StreamId,
        epoch: u64,
    ) -> (Option<Entry<A>>, Option<Slot<A>>) {
        let Some(slot) = self.entries.get(stream) else {
            return (None, None);
        };
        let entry = lock(&slot).take().filter(|entry| {
            entry.epoch == epoch
                && self
                    .max_age
                    .is_none_or(|age| entry.loaded_at.elapsed() < age)
        });
        (entry, Some(slot))
    }

    /// Keeps `entry` for `stream`: in `slot` when the command took one (unless a concurrent
    /// command left a later version there), else in a new slot.
    pub(crate) fn keep(&self, stream: &StreamId, slot: Option<&Slot<A>>, entry: Entry<A>) {
        match slot {
            Some(slot) => {
                let mut kept = lock(slot);
                if kept
                    .as_ref()
                    .is_none_or(|other| other.loaded.version <= entry.loaded.version)
                {
                    *kept = Some(entry);
                }
            }
            None => self
                .entries
                .insert(stream.clone(), Arc::new(Mutex::new(Some(entry)))),
        }
    }

    /// Drops the entry of `stream`, if any.
    pub(crate) fn forget(&self, stream: &StreamId) {
        self.entries.remove(stream);
    }

    /// Drops every entry.
    pub(crate) fn clear(&self) {
        self.entries.clear();
    }

    /// Streams with a slot now (an entry, or one being used or reloaded).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries pushed out by the bound so far.
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.0.load(Ordering::Relaxed)
    }
}

fn lock<T>(slot: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while a slot is locked (it is only moved in or out).
    slot.lock().unwrap_or_else(|p| p.into_inner())
}
