//! The domains behind Keel's examples, as a library so their tests run with `cargo test`.
//!
//! - [`bank`]: an `Account` aggregate with an overdraft rule (`cargo run --example bank`).
//! - [`blog`]: posts and two projections, posts by author and by tag (`cargo run --example blog`).

pub mod bank;
pub mod blog;
pub mod store;
