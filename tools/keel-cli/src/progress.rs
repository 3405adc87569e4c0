//! Progress bars for the long scans (`feed reconcile`, `subjects rewrap`, `stream archive`), on stderr: hidden
//! under `--json` and when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner counting `what` (the total is unknown until the scan ends).
pub(crate) fn counter(what: &str, json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {pos} {msg} ({per_sec}, {elapsed})")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// A bar of `total` `what` (a stream archive, whose length is known).
pub(crate) fn bar(total: u64, what: &str, json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ({per_sec}, eta {eta})")
    {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar
}
