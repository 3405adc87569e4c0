//! Keel's benchmarks live in `benches/`; run them with `./scripts/bench`.
