//! The domains behind Keel's examples, as a library so their tests run with `cargo test`.
//!
//! - [`bank`]: an `Account` aggregate with an overdraft rule (`cargo run --example bank`).

pub mod bank;
pub mod store;
