//! The shared store conformance suite, on the memory store.

use std::sync::Arc;

use keel_memory::MemoryStore;

async fn store() -> Arc<MemoryStore> {
    Arc::new(MemoryStore::new())
}

keel::conformance_tests!(events, store);
keel::conformance_tests!(snapshots, store);
keel::conformance_tests!(endings, store);
keel::conformance_tests!(checkpoints, store);
keel::conformance_tests!(leases, store);
keel::conformance_tests!(projections, store);
keel::conformance_tests!(sagas, store);
keel::conformance_tests!(codecs, store);
