//! The Prometheus endpoint serves what Keel records, scraped over HTTP on loopback.

use keel::bus::MetricsLayer;
use keel::{Command, CommandBus};

#[derive(Clone, Debug)]
struct Ping;
impl Command for Ping {
    type Output = ();
}

#[derive(Clone, Debug)]
struct Fail;
impl Command for Fail {
    type Output = ();
}

#[tokio::test]
async fn the_endpoint_serves_keel_metrics() {
    let addr = keel_examples::metrics::serve_prometheus().await.unwrap();
    let bus = CommandBus::builder()
        .layer(MetricsLayer::new())
        .command(|_: Ping, _| async { Ok(()) })
        .unwrap()
        .command(|_: Fail, _| async {
            Err(keel::Error::Invalid {
                type_name: "Fail",
                reason: "no".into(),
            })
        })
        .unwrap()
        .build();
    for _ in 0..4 {
        bus.send(Ping).await.unwrap();
    }
    bus.send(Fail).await.unwrap_err();
    let body = keel_examples::metrics::scrape(addr).await.unwrap();
    let value = |prefix: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{body}"))
    };
    assert_eq!(
        value(r#"keel_dispatch_total{kind="command",type="Ping"}"#),
        4.0
    );
    assert_eq!(
        value(r#"keel_dispatch_total{kind="command",type="Fail"}"#),
        1.0
    );
    assert_eq!(
        value(r#"keel_dispatch_failures_total{kind="command",type="Fail"}"#),
        1.0
    );
    assert!(
        body.contains("keel_dispatch_seconds"),
        "latency is exported too"
    );
}
