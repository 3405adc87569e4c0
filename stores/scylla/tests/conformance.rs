//! The shared store conformance suite, on a real CQL node.

mod common;

keel::conformance_tests!(events, common::shared_store);
keel::conformance_tests!(snapshots, common::shared_store);
keel::conformance_tests!(endings, common::shared_store);
keel::conformance_tests!(checkpoints, common::shared_store);
keel::conformance_tests!(leases, common::shared_store);
keel::conformance_tests!(projections, common::shared_store);
keel::conformance_tests!(sagas, common::shared_store);
keel::conformance_tests!(codecs, common::shared_store);
