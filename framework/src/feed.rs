//! The feed in slices: every committed event of every stream, split by stream into a fixed
//! number of slices, and the [`Cursor`] a consumer keeps over them.
//!
//! A store's feed is cut into [`EventStore::feed_slices`](crate::EventStore::feed_slices)
//! slices (a power of two). A stream belongs to one slice, [`slice_of`] its id, so all of a
//! stream's events are in one slice, in version order. Each slice numbers its events with its
//! own dense positions from 1. Slices are what lets the read side spread over processes: each
//! slice is fed, read and checkpointed on its own, so different processes can own different
//! slices.
//!
//! # Order
//! Within a stream, events are read in version order; within a slice, in position order.
//! **Across slices there is no order**: two events of different streams in different slices
//! may be read in either order, whatever order they were committed in. A projection that
//! needs one total order across streams has two honest options: keep the streams that must be
//! ordered together in one stream (an aggregate is a consistency boundary for that reason),
//! or run on a store with a single slice. Merging slices by commit time looks like a total
//! order but is not one: writers stamp their own events, and a slice can publish an event
//! committed before one already read from another slice.
//!
//! ```
//! use keel::feed::{slice_of, Cursor};
//! use keel::StreamId;
//!
//! let stream = StreamId::new("account-7");
//! let slice = slice_of(&stream, 64);
//! assert!(slice < 64);
//! assert_eq!(slice, slice_of(&stream, 64), "a stream's slice never changes");
//! assert_eq!(slice_of(&stream, 1), 0);
//!
//! let mut cursor = Cursor::new();
//! cursor.advance(slice, 3);
//! assert_eq!(cursor.get(slice), 3);
//! assert_eq!(cursor.next(slice), 4, "reading resumes after the last position consumed");
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::event::StreamId;

/// Where a write landed: a stream and the version of its last event. A command's reply
/// carries it ([`Executed::written`](crate::Executed::written)) so that a later query can wait
/// until a projection has applied that write: read-your-writes, with
/// [`Visibility`](crate::projection::Visibility) or
/// [`ProjectionManager::wait_for`](crate::projection::ProjectionManager::wait_for).
///
/// It names the write, not a feed position: on a store whose feed is filled after the append
/// (ScyllaDB), the position is not known when the command returns. It serialises as
/// `{"stream": "...", "version": N}`, so a client can hand it back to the next request.
///
/// ```
/// use keel::feed::Written;
/// let written = Written::new("account-7", 3);
/// let json = serde_json::to_string(&written).unwrap();
/// assert_eq!(json, r#"{"stream":"account-7","version":3}"#);
/// assert_eq!(serde_json::from_str::<Written>(&json).unwrap(), written);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Written {
    /// The stream written to.
    pub stream: StreamId,
    /// The version of the write's last event.
    pub version: u64,
}

impl Written {
    /// The write that left `stream` at `version`.
    pub fn new(stream: impl AsRef<str>, version: u64) -> Self {
        Written {
            stream: StreamId::new(stream),
            version,
        }
    }
}

/// The number of slices a store uses unless configured otherwise.
pub const DEFAULT_SLICES: u32 = 64;

/// The most slices a store may have: more would make one feeder per slice too many tasks and
/// leases for one keyspace.
pub const MAX_SLICES: u32 = 1024;

/// Checks a slice count: a power of two from 1 to [`MAX_SLICES`].
pub fn validate_slices(slices: u32) -> Result<u32> {
    if slices.is_power_of_two() && slices <= MAX_SLICES {
        Ok(slices)
    } else {
        Err(Error::Invalid {
            type_name: "feed slices",
            reason: format!("{slices} is not a power of two from 1 to {MAX_SLICES}"),
        })
    }
}

/// The slice of `stream` when the feed has `slices` slices (a power of two).
///
/// Stable across processes, builds and platforms, since every store and every process must
/// agree on it: the 64-bit FNV-1a hash of the stream id's UTF-8 bytes, mixed by the 64-bit
/// MurmurHash3 finaliser, modulo `slices`. Other implementations (a reader in another
/// language) can compute it from this description.
pub fn slice_of(stream: &StreamId, slices: u32) -> u32 {
    debug_assert!(slices.is_power_of_two(), "slice counts are powers of two");
    if slices <= 1 {
        return 0;
    }
    (hash(stream.as_str().as_bytes()) & (u64::from(slices) - 1)) as u32
}

fn hash(bytes: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    // FNV's low bits follow the last bytes too closely for ids that differ by a counter at
    // the end ("order-1", "order-2"); the finaliser spreads every input bit over all of them.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// How far a consumer got in each slice: the last position it consumed per slice (0, or
/// absent, for a slice it consumed nothing of). Also used for the feed's heads (the last
/// position published per slice), so that lag is a difference of two cursors.
///
/// A cursor is what a projection checkpoints and what a command's reply can carry for
/// read-your-writes: "the read model has applied everything up to here".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor {
    positions: BTreeMap<u32, u64>,
}

impl Cursor {
    /// A cursor at the start of every slice.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last position consumed in `slice` (0: none).
    pub fn get(&self, slice: u32) -> u64 {
        self.positions.get(&slice).copied().unwrap_or(0)
    }

    /// The position to read `slice` from: one after the last consumed.
    pub fn next(&self, slice: u32) -> u64 {
        self.get(slice) + 1
    }

    /// Sets the last position consumed in `slice`, forwards or back (a reset moves back).
    pub fn set(&mut self, slice: u32, position: u64) {
        if position == 0 {
            self.positions.remove(&slice);
        } else {
            self.positions.insert(slice, position);
        }
    }

    /// Moves `slice` forward to `position`; a position at or behind the cursor changes nothing.
    pub fn advance(&mut self, slice: u32, position: u64) {
        if position > self.get(slice) {
            self.set(slice, position);
        }
    }

    /// Moves the cursor past a feed event (one read with a position).
    pub fn consume(&mut self, event: &crate::RecordedEvent) {
        if let Some(position) = event.position {
            self.advance(event.slice, position);
        }
    }

    /// The slices with a position, and their positions, by slice.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.positions.iter().map(|(&s, &p)| (s, p))
    }

    /// The sum of the positions: for the feed's heads, the number of events in the feed.
    pub fn total(&self) -> u64 {
        self.positions.values().sum()
    }

    /// Whether this cursor is at or past `other` in every slice: everything `other` names
    /// has been consumed.
    pub fn covers(&self, other: &Cursor) -> bool {
        other.iter().all(|(slice, p)| self.get(slice) >= p)
    }

    /// How many events of `heads` this cursor has not consumed, over all slices.
    pub fn behind(&self, heads: &Cursor) -> u64 {
        heads
            .iter()
            .map(|(slice, head)| head.saturating_sub(self.get(slice)))
            .sum()
    }

    /// Only the given slices of this cursor.
    pub fn restricted_to(&self, slices: &[u32]) -> Cursor {
        Cursor {
            positions: self
                .positions
                .iter()
                .filter(|(s, _)| slices.contains(s))
                .map(|(&s, &p)| (s, p))
                .collect(),
        }
    }
}

impl FromIterator<(u32, u64)> for Cursor {
    fn from_iter<I: IntoIterator<Item = (u32, u64)>>(iter: I) -> Self {
        let mut cursor = Cursor::new();
        for (slice, position) in iter {
            cursor.set(slice, position);
        }
        cursor
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("{")?;
        for (i, (slice, position)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{slice}: {position}")?;
        }
        f.write_str("}")
    }
}

/// Every slice of a store with `slices` slices, in order.
pub fn all_slices(slices: u32) -> Vec<u32> {
    (0..slices.max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_stable_and_spread() {
        // Fixed values: a change of the function would move every stream of every keyspace.
        assert_eq!(
            slice_of(&StreamId::new("a"), 64),
            slice_of(&StreamId::new("a"), 64)
        );
        let pinned: Vec<u32> = ["order-1", "order-2", "account-7", "x"]
            .iter()
            .map(|s| slice_of(&StreamId::new(*s), 1024))
            .collect();
        assert_eq!(pinned, [421, 939, 808, 5]);
        // A counter suffix spreads evenly: 6,400 streams over 64 slices, none far off 100.
        let mut counts = [0u32; 64];
        for i in 0..6_400 {
            counts[slice_of(&StreamId::new(format!("order-{i}")), 64) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (60..=140).contains(&c)),
            "{counts:?}"
        );
        // Fewer slices are the same hash with fewer bits: a slice of 64 maps into its slice of 8.
        for i in 0..100 {
            let s = StreamId::new(format!("s{i}"));
            assert_eq!(slice_of(&s, 64) % 8, slice_of(&s, 8));
        }
    }

    #[test]
    fn slice_counts_are_powers_of_two_within_the_maximum() {
        for ok in [1, 2, 64, 1024] {
            assert_eq!(validate_slices(ok).unwrap(), ok);
        }
        for bad in [0, 3, 48, 2048] {
            assert!(validate_slices(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cursors_advance_compare_and_count() {
        let mut cursor = Cursor::new();
        cursor.advance(2, 5);
        cursor.advance(2, 3);
        assert_eq!(cursor.get(2), 5);
        assert_eq!(cursor.get(7), 0);
        let heads: Cursor = [(0, 4), (2, 9)].into_iter().collect();
        assert_eq!(cursor.behind(&heads), 4 + 4);
        assert!(!cursor.covers(&heads));
        cursor.set(0, 4);
        cursor.set(2, 9);
        assert!(cursor.covers(&heads) && cursor.behind(&heads) == 0);
        assert_eq!(heads.total(), 13);
        assert_eq!(cursor.to_string(), "{0: 4, 2: 9}");
        let json = serde_json::to_string(&cursor).unwrap();
        assert_eq!(serde_json::from_str::<Cursor>(&json).unwrap(), cursor);
        cursor.set(2, 0);
        assert_eq!(cursor.iter().collect::<Vec<_>>(), [(0, 4)]);
    }
}
