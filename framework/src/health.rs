//! Health reports: what a component checked, and whether each check passed.
//!
//! Stores and managers offer `health()`; the operator's `keel health` command prints them and
//! exits non-zero when any is unhealthy.

use serde::{Deserialize, Serialize};

/// One check of a [`Health`] report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked (`node`, `schema`, `projection posts_by_tag`, ...).
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// A component's health: healthy when every check passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The component (`scylla store`, `projection manager`, `saga orchestrator`).
    pub component: String,
    /// The checks, in the order they ran.
    pub checks: Vec<Check>,
}

impl Health {
    /// An empty report for `component`.
    pub fn new(component: impl Into<String>) -> Self {
        Health {
            component: component.into(),
            checks: Vec::new(),
        }
    }

    /// Adds a check.
    pub fn check(
        &mut self,
        name: impl Into<String>,
        ok: bool,
        detail: impl Into<String>,
    ) -> &mut Self {
        self.checks.push(Check {
            name: name.into(),
            ok,
            detail: detail.into(),
        });
        self
    }

    /// Whether every check passed.
    pub fn is_healthy(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}
