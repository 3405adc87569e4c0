//! The command window: the ids of a stream's last K commands, which tell a re-sent command
//! from a new one.
//!
//! The ids live in the events themselves ([`Metadata::command_id`](crate::Metadata), written
//! in the same atomic append as the events) and, so that a load need not replay the whole
//! stream to find them, in every snapshot and cached aggregate. The window is exact: the ids
//! of the last K commands that appended events to the stream, whichever way the stream was
//! loaded (from the start, from a snapshot, from the cache).

use std::collections::VecDeque;

use uuid::Uuid;

/// The ids of the last `capacity` commands of one stream, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CommandWindow {
    ids: VecDeque<Uuid>,
    capacity: usize,
}

impl CommandWindow {
    /// An empty window (a stream with no commands yet).
    pub(crate) fn new(capacity: usize) -> Self {
        CommandWindow {
            ids: VecDeque::new(),
            capacity,
        }
    }

    /// The window a snapshot kept (oldest first); the newest `capacity` of them.
    pub(crate) fn from_ids(ids: &[Uuid], capacity: usize) -> Self {
        let mut window = Self::new(capacity);
        let skip = ids.len().saturating_sub(capacity);
        window.ids.extend(&ids[skip..]);
        window
    }

    /// Records the command id of the next event of the stream. The events of one command
    /// share its id and count once; events appended without a command id do not count.
    pub(crate) fn record(&mut self, id: Option<Uuid>) {
        let Some(id) = id else { return };
        if self.capacity == 0 || self.ids.back() == Some(&id) {
            return;
        }
        if self.ids.len() == self.capacity {
            self.ids.pop_front();
        }
        self.ids.push_back(id);
    }

    /// Whether `id` is among the last `capacity` commands.
    pub(crate) fn contains(&self, id: Uuid) -> bool {
        self.ids.contains(&id)
    }

    /// The ids, oldest first, as a snapshot keeps them.
    pub(crate) fn to_vec(&self) -> Vec<Uuid> {
        self.ids.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u128) -> Vec<Uuid> {
        (1..=n).map(Uuid::from_u128).collect()
    }

    #[test]
    fn keeps_the_last_k_commands_counting_each_once() {
        let mut window = CommandWindow::new(3);
        for id in ids(5) {
            // Two events per command.
            window.record(Some(id));
            window.record(Some(id));
            window.record(None);
        }
        assert_eq!(window.to_vec(), ids(5)[2..]);
        assert!(!window.contains(Uuid::from_u128(2)));
        assert!(window.contains(Uuid::from_u128(3)));
    }

    #[test]
    fn a_smaller_window_keeps_the_newest_of_a_snapshot() {
        let window = CommandWindow::from_ids(&ids(5), 2);
        assert_eq!(window.to_vec(), ids(5)[3..]);
        let mut off = CommandWindow::from_ids(&ids(5), 0);
        off.record(Some(Uuid::from_u128(9)));
        assert!(off.to_vec().is_empty());
    }
}
