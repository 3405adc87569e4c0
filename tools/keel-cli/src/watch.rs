//! `--watch`: print again every second until Ctrl-C.

use std::future::Future;
use std::time::Duration;

/// Runs `print` once, or with `watch` every second until Ctrl-C: the screen is cleared before
/// each text frame; under `--json` each frame is one more JSON document.
pub(crate) async fn every_second<F, Fut>(
    watch: bool,
    json: bool,
    mut print: F,
) -> Result<(), Box<dyn std::error::Error>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error>>>,
{
    if !watch {
        return print().await;
    }
    let mut stop = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        if !json {
            print!("\x1b[2J\x1b[H"); // clear the screen, cursor home
        }
        print().await?;
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
