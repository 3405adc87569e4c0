//! Exposing Keel's metrics on a Prometheus endpoint, and scraping it.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Installs the Prometheus recorder with its HTTP listener on `127.0.0.1:<free port>` and
/// returns the address. Every metric Keel records from now on is served there.
pub async fn serve_prometheus() -> Result<SocketAddr, keel::BoxError> {
    // Ask the OS for a free loopback port, then hand it to the exporter.
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?;
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;
    // The listener starts on a background task; wait until it answers.
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(addr);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("the Prometheus endpoint on {addr} did not come up").into())
}

/// Scrapes `http://<addr>/metrics` with a plain HTTP/1.0 GET and returns the body.
pub async fn scrape(addr: SocketAddr) -> Result<String, keel::BoxError> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("scrape failed: {}", head.lines().next().unwrap_or_default()).into());
    }
    Ok(body.to_owned())
}
