//! [`Generations`]: an in-memory read model with blue/green generations.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::store::Fence;

/// An in-memory read model kept per generation: queries read the active one while a rebuild
/// fills the next. Cloning shares the data.
#[derive(Debug)]
pub struct Generations<M> {
    inner: Arc<RwLock<State<M>>>,
}

#[derive(Debug)]
struct State<M> {
    active: u64,
    models: BTreeMap<u64, M>,
    /// The highest lease epoch a fenced update was made under, per lease: managers sharing a
    /// projection's slices write under one lease per slice, each with its own epochs.
    epochs: BTreeMap<String, u64>,
}

impl<M> Clone for Generations<M> {
    fn clone(&self) -> Self {
        Generations {
            inner: self.inner.clone(),
        }
    }
}

impl<M: Default> Default for Generations<M> {
    fn default() -> Self {
        Generations {
            inner: Arc::new(RwLock::new(State {
                active: 1,
                models: BTreeMap::new(),
                epochs: BTreeMap::new(),
            })),
        }
    }
}

impl<M: Default> Generations<M> {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State<M>> {
        // Updates are single closures over plain data; a panic inside one leaves a model
        // no worse than a half-applied batch, which replay repairs.
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `generation` empty.
    pub fn reset(&self, generation: u64) {
        self.write().models.insert(generation, M::default());
    }

    /// Changes `generation` (creating it empty if needed).
    pub fn update<R>(&self, generation: u64, f: impl FnOnce(&mut M) -> R) -> R {
        f(self.write().models.entry(generation).or_default())
    }

    /// Changes `generation` under `fence`, the lease of the manager writing: refused with
    /// [`Error::Fenced`](crate::Error::Fenced) (and nothing changed) once an update under a
    /// higher epoch was made, so a manager that stalled past its lease cannot write after its
    /// successor. Epochs are compared per lease name, so managers sharing the projection's
    /// slices (one lease per slice) fence each other slice by slice. The check and the change
    /// happen under one lock.
    ///
    /// ```
    /// # use keel::{projection::Generations, Fence};
    /// let counts: Generations<u64> = Generations::default();
    /// counts.update_fenced(&Fence::new("projection/counts", 2), 1, |n| *n += 1).unwrap();
    /// let stale = counts.update_fenced(&Fence::new("projection/counts", 1), 1, |n| *n += 1);
    /// assert!(stale.unwrap_err().is_fenced());
    /// assert_eq!(counts.read(|n| *n), 1);
    /// // Another slice's lease has epochs of its own.
    /// counts.update_fenced(&Fence::new("projection/counts/s7", 1), 1, |n| *n += 1).unwrap();
    /// assert_eq!(counts.read(|n| *n), 2);
    /// ```
    pub fn update_fenced<R>(
        &self,
        fence: &Fence,
        generation: u64,
        f: impl FnOnce(&mut M) -> R,
    ) -> crate::Result<R> {
        let mut state = self.write();
        let seen = state.epochs.get(&fence.name).copied().unwrap_or(0);
        let epoch = fence.check(seen)?;
        state.epochs.insert(fence.name.clone(), epoch);
        Ok(f(state.models.entry(generation).or_default()))
    }

    /// Makes `generation` the one [`read`](Generations::read) sees, and drops older ones.
    pub fn activate(&self, generation: u64) {
        let mut state = self.write();
        state.models.entry(generation).or_default();
        state.active = generation;
        state.models.retain(|g, _| *g >= generation);
    }

    /// Reads the active generation.
    pub fn read<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        self.read_active(|_, model| f(model))
    }

    /// Reads the active generation, and says which one it is (one lock: the two agree).
    pub fn read_active<R>(&self, f: impl FnOnce(u64, &M) -> R) -> R {
        let state = self.inner.read().unwrap_or_else(|p| p.into_inner());
        match state.models.get(&state.active) {
            Some(model) => f(state.active, model),
            None => f(state.active, &M::default()),
        }
    }

    /// The active generation.
    pub fn active(&self) -> u64 {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).active
    }
}
