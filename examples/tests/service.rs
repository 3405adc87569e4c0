//! The example service, started as a real process and spoken to over real HTTP (reqwest):
//! the API on both stores, an API and a projector in two processes through a rebuild and a
//! projector killed in the middle of one, and a shutdown by SIGTERM under load.
//!
//! The ScyllaDB cases use the node of `scripts/scylla-node` (or `KEEL_SCYLLA_NODES`), each in
//! a keyspace of its own, dropped at the end.

use std::collections::BTreeMap;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use keel::EventStore;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// One service process.
struct Service {
    child: Child,
    base: String,
    manager: String,
}

impl Service {
    /// Starts the service with `args` on a free port and waits until it listens.
    async fn start(args: &[&str]) -> Service {
        let mut child = Command::new(env!("CARGO_BIN_EXE_service"))
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the service binary");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut base, mut manager) = (None, None);
        let started = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(id) = line.split("manager ").nth(1) {
                    manager = Some(id.trim().to_owned());
                }
                if let Some(address) = line.strip_prefix("listening on ") {
                    base = Some(address.trim().to_owned());
                    return;
                }
            }
        })
        .await;
        assert!(
            started.is_ok(),
            "the service {args:?} did not start listening"
        );
        let base = base.unwrap_or_else(|| panic!("the service {args:?} exited before listening"));
        // Keep reading stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Service {
            child,
            base,
            manager: manager.expect("the service names its manager"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `signal` (`TERM`, `KILL`) to the process.
    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the service runs").to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    async fn exit_within(&mut self, bound: Duration) -> ExitStatus {
        tokio::time::timeout(bound, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the service did not exit within {bound:?}"))
            .unwrap()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap()
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request
        .send()
        .await
        .expect("the request reaches the service");
    let status = response.status();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// Everything the API promises, over HTTP, on one running service.
async fn the_api_keeps_its_promises(service: &Service) {
    let http = client();
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let account = format!("acc-{run}");
    let post = |path: &str, body: Value| http.post(service.url(path)).json(&body);

    let (status, opened) = send(post(
        "/accounts",
        json!({"id": account, "owner": "Ada", "initial": 1000}),
    ))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{opened}");
    assert_eq!(opened["version"], 1);
    let (status, _) = send(post(
        &format!("/accounts/{account}/deposits"),
        json!({"amount": 500}),
    ))
    .await;
    assert_eq!(status, StatusCode::OK);

    // Rejected by the aggregate: 422, with the aggregate's reason.
    let (status, refused) = send(post(
        &format!("/accounts/{account}/withdrawals"),
        json!({"amount": 5000}),
    ))
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(refused["error"], "rejected");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("balance 1500, requested 5000"),
        "{refused}"
    );
    let (status, _) = send(post(
        "/accounts",
        json!({"id": account, "owner": "Bob", "initial": 1}),
    ))
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "opening twice");

    // Invalid: a body that does not parse, a command that fails validation.
    let (status, body) = send(post("/accounts", json!({"id": "x"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("owner"),
        "{body}"
    );
    let (status, body) = send(post(
        "/accounts",
        json!({"id": format!("blank-{run}"), "owner": "  "}),
    ))
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("OpenAccount"),
        "{body}"
    );

    // Reads: the account, and one that was never opened.
    let (status, read) = send(http.get(service.url(&format!("/accounts/{account}")))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (read["balance"].clone(), read["version"].clone()),
        (json!(1500), json!(2))
    );
    let (status, body) = send(http.get(service.url(&format!("/accounts/none-{run}")))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found");

    // Read-your-writes: a post, then a read by its tag that waits for it (no sleep).
    let tag = format!("rust-{run}");
    let (status, written) = send(post(
        "/posts",
        json!({"id": format!("{run}-1"), "author": format!("ada-{run}"), "title": "Paxos for the impatient", "tags": [tag]}),
    ))
    .await;
    assert_eq!(status, StatusCode::CREATED, "{written}");
    let after = written["after"].as_str().unwrap().to_owned();
    let (status, tagged) = send(
        http.get(service.url(&format!("/tags/{tag}/posts")))
            .query(&[("after", after.as_str())]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{tagged}");
    assert_eq!(tagged["titles"], json!(["Paxos for the impatient"]));
    let (status, retitled) = send(post(
        &format!("/posts/{run}-1/title"),
        json!({"title": "Paxos, patiently"}),
    ))
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, by_author) = send(
        http.get(service.url(&format!("/authors/ada-{run}/posts")))
            .query(&[("after", retitled["after"].as_str().unwrap())]),
    )
    .await;
    assert_eq!(by_author["titles"], json!(["Paxos, patiently"]));

    // A write that never comes: the read gives up after its wait with 504.
    let (status, body) = send(
        http.get(service.url(&format!("/tags/{tag}/posts")))
            .query(&[
                ("after", format!("post-{run}-1@99").as_str()),
                ("wait_ms", "300"),
            ]),
    )
    .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("posts_by_tag"),
        "{body}"
    );
    let (status, _) = send(
        http.get(service.url(&format!("/tags/{tag}/posts")))
            .query(&[("after", "no-version")]),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The operator's endpoints.
    let (status, health) = send(http.get(service.url("/health"))).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["healthy"], true);
    let components: Vec<&str> = health["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["component"].as_str().unwrap())
        .collect();
    assert!(components.contains(&"projection manager"), "{health}");
    let metrics = http
        .get(service.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"keel_dispatch_total{kind="command",type="OpenAccount"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_api_answers_over_http_on_the_memory_store() {
    let mut service = Service::start(&["--store", "memory"]).await;
    the_api_keeps_its_promises(&service).await;
    service.signal("TERM");
    assert!(service.exit_within(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn the_memory_store_refuses_to_split_the_roles() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_service"))
        .args([
            "--store",
            "memory",
            "--role",
            "api",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`--role api` needs `--store scylla`"),
        "{stderr}"
    );
}

// ---- ScyllaDB: one keyspace per test, processes sharing it ----

/// The ScyllaDB cases share one node: they run one at a time.
static NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Keyspace(String);

impl Keyspace {
    fn new() -> Keyspace {
        Keyspace(format!(
            "keel_svc_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ))
    }

    /// The arguments of a process on this keyspace. Reads wait up to a minute for their
    /// writes: a loaded two-core machine can stall the node for seconds, and a write that is
    /// lost still fails the test.
    fn args<'a>(&'a self, role: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "--store",
            "scylla",
            "--keyspace",
            &self.0,
            "--role",
            role,
            "--wait-limit-ms",
            "60000",
        ];
        args.extend_from_slice(extra);
        args
    }

    /// The keyspace's store, without a feeder, for reading what the service wrote.
    async fn store(&self) -> keel_scylla::KeelScylla {
        let nodes = std::env::var("KEEL_SCYLLA_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into());
        keel_scylla::KeelScylla::builder()
            .known_nodes(nodes.split(','))
            .keyspace(self.0.clone())
            .feeder(false)
            .build()
            .await
            .expect("open the test keyspace")
    }

    async fn drop(self) {
        let store = self.store().await;
        store
            .session()
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", self.0), ())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_api_answers_over_http_on_scylla() {
    let _node = NODE.lock().await;
    let keyspace = Keyspace::new();
    let mut service = Service::start(&keyspace.args("all", &[])).await;
    the_api_keeps_its_promises(&service).await;
    let (_, health) = send(client().get(service.url("/health"))).await;
    assert_eq!(health["store"], "scylla");
    assert!(health["feeding_slices"].as_u64().unwrap() > 0, "{health}");
    service.signal("TERM");
    assert!(service.exit_within(Duration::from_secs(20)).await.success());
    keyspace.drop().await;
}

/// Writes `count` posts tagged `tag` through `api` and waits (read-your-writes) until the
/// tag's index shows each; returns the titles, sorted.
async fn seed_posts(api: &Service, tag: &str, count: usize) -> Vec<String> {
    let http = client();
    let mut titles = Vec::new();
    let mut afters = Vec::new();
    for n in 0..count {
        let title = format!("post {n:04}");
        let (status, body) = send(http.post(api.url("/posts")).json(&json!({
            "id": format!("{tag}-{n}"), "author": "ada", "title": title, "tags": [tag],
        })))
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        titles.push(title);
        afters.push(body["after"].as_str().unwrap().to_owned());
    }
    for after in afters {
        let (status, body) = send(
            http.get(api.url(&format!("/tags/{tag}/posts")))
                .query(&[("after", after.as_str()), ("wait_ms", "60000")]),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    titles.sort();
    titles
}

/// The status `api` reports for `projection`.
async fn status_of(api: &Service, projection: &str) -> Value {
    let (status, list) = send(client().get(api.url("/projections"))).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list.as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == projection)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn request_rebuild(api: &Service, projection: &str) {
    let (status, body) =
        send(client().post(api.url(&format!("/projections/{projection}/rebuild")))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

/// Polls `check` every 50 ms until it holds, failing after `bound` with `what`.
async fn eventually<F, Fut>(bound: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rebuilt(status: &Value, generation: u64) -> bool {
    status["generation"].as_u64() == Some(generation)
        && status["rebuild"].is_null()
        && status["state"] == "running"
}

#[tokio::test]
async fn a_rebuild_in_the_projector_never_gives_the_api_an_empty_or_mixed_answer() {
    let _node = NODE.lock().await;
    let keyspace = Keyspace::new();
    let projector = Service::start(&keyspace.args("projector", &["--rebuild-rate", "150"])).await;
    let api = Service::start(&keyspace.args("api", &[])).await;
    let expected = seed_posts(&api, "rust", 150).await;

    request_rebuild(&api, "posts_by_tag").await;
    let http = client();
    let mut answers: BTreeMap<u64, usize> = BTreeMap::new();
    let mut answered_during_rebuild = 0;
    let mut switched_at = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, body) = send(http.get(api.url("/tags/rust/posts"))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let titles: Vec<String> = serde_json::from_value(body["titles"].clone()).unwrap();
        assert_eq!(
            titles, expected,
            "an answer of generation {} differs from the full one",
            body["generation"]
        );
        *answers
            .entry(body["generation"].as_u64().unwrap())
            .or_default() += 1;
        let state = status_of(&api, "posts_by_tag").await;
        if !state["rebuild"].is_null() {
            answered_during_rebuild += 1;
        }
        if switched_at.is_none() && rebuilt(&state, 2) {
            switched_at = Some(Instant::now());
        }
        // Past the API's generation cache (a second) after the switch, it reads the new one.
        if switched_at.is_some_and(|at| at.elapsed() > Duration::from_secs(2)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rebuild did not finish: {state}"
        );
    }
    assert!(
        answered_during_rebuild > 0,
        "no query ran during the rebuild: {answers:?}"
    );
    assert!(
        answers.contains_key(&1) && answers.contains_key(&2),
        "{answers:?}"
    );
    let (_, last) = send(http.get(api.url("/tags/rust/posts"))).await;
    assert_eq!(
        last["generation"], 2,
        "the API still reads the old generation"
    );
    drop((projector, api));
    keyspace.drop().await;
}

#[tokio::test]
async fn a_projector_killed_mid_rebuild_finishes_it_after_a_restart() {
    let _node = NODE.lock().await;
    let keyspace = Keyspace::new();
    let projector_args = keyspace.args(
        "projector",
        &["--rebuild-rate", "40", "--lease-ttl-ms", "2000"],
    );
    let mut projector = Service::start(&projector_args).await;
    let api = Service::start(&keyspace.args("api", &[])).await;
    let expected = seed_posts(&api, "db", 120).await;

    request_rebuild(&api, "posts_by_tag").await;
    eventually(Duration::from_secs(60), "the rebuild under way", || async {
        let state = status_of(&api, "posts_by_tag").await;
        state["rebuild"]["done"]
            .as_u64()
            .is_some_and(|done| done >= 10)
    })
    .await;
    projector.signal("KILL");
    projector.exit_within(Duration::from_secs(10)).await;
    let state = status_of(&api, "posts_by_tag").await;
    assert!(
        !state["rebuild"].is_null(),
        "the rebuild ended before the kill: {state}"
    );

    let restarted = Service::start(&projector_args).await;
    eventually(Duration::from_secs(90), "the rebuild completed", || async {
        let state = status_of(&api, "posts_by_tag").await;
        rebuilt(&state, 2) && state["owner"] == restarted.manager.as_str()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await; // the API's generation cache
    let (_, answer) = send(client().get(api.url("/tags/db/posts"))).await;
    assert_eq!(answer["generation"], 2, "{answer}");
    let titles: Vec<String> = serde_json::from_value(answer["titles"].clone()).unwrap();
    assert_eq!(titles, expected);
    drop((restarted, api));
    keyspace.drop().await;
}

#[tokio::test]
async fn sigterm_under_load_loses_no_acknowledged_command_and_hands_over_the_leases() {
    let _node = NODE.lock().await;
    let keyspace = Keyspace::new();
    // Leases that live 30 s: a takeover within a few seconds is a release, not an expiry.
    let ttl = ["--lease-ttl-ms", "30000"];
    let mut first = Service::start(&keyspace.args("all", &ttl)).await;
    let second = Service::start(&keyspace.args("projector", &ttl)).await;
    eventually(
        Duration::from_secs(30),
        "the first process holds the projections",
        || async {
            let state = status_of(&first, "posts_by_tag").await;
            state["owner"] == first.manager.as_str()
        },
    )
    .await;

    let http = client();
    let accounts: Vec<String> = (0..6).map(|n| format!("load-{n}")).collect();
    for id in &accounts {
        let (status, _) = send(
            http.post(first.url("/accounts"))
                .json(&json!({"id": id, "owner": "Ada"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let base = Arc::new(first.base.clone());
    let mut load = Vec::new();
    for id in accounts.clone() {
        let (http, base) = (http.clone(), base.clone());
        load.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            loop {
                let sent = http
                    .post(format!("{base}/accounts/{id}/deposits"))
                    .json(&json!({"amount": 1}))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let body: Value = r.json().await.unwrap();
                        acked.push(body["version"].as_u64().unwrap());
                    }
                    _ => return (id, acked), // refused or gone: the process is stopping
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    first.signal("TERM");
    let stopped_at = Instant::now();
    let exit = first.exit_within(Duration::from_secs(20)).await;
    assert!(exit.success(), "the service failed its shutdown: {exit}");

    // Every acknowledged deposit is stored, at the version its reply named.
    let store = keyspace.store().await;
    let mut acknowledged = 0;
    for task in load {
        let (id, acked) = task.await.unwrap();
        acknowledged += acked.len();
        let stream = keel::StreamId::new(format!("account-{id}"));
        let events: Vec<_> = store.read_stream(&stream, 1).try_collect().await.unwrap();
        for version in acked {
            let event = events
                .iter()
                .find(|e| e.version == version)
                .unwrap_or_else(|| panic!("acknowledged deposit {id} v{version} is not stored"));
            assert_eq!(&*event.event_type, "Deposited");
        }
    }
    assert!(
        acknowledged > 0,
        "no deposit was acknowledged before the signal"
    );

    // The leases were released: the second process takes over at once, not after 30 s.
    eventually(
        Duration::from_secs(10),
        "the second process took every lease",
        || async {
            let tag = status_of(&second, "posts_by_tag").await;
            let author = status_of(&second, "posts_by_author").await;
            let (_, health) = send(client().get(second.url("/health"))).await;
            tag["owner"] == second.manager.as_str()
                && author["owner"] == second.manager.as_str()
                && health["feeding_slices"].as_u64() == Some(keel::feed::DEFAULT_SLICES as u64)
        },
    )
    .await;
    assert!(stopped_at.elapsed() < Duration::from_secs(30));
    drop(second);
    keyspace.drop().await;
}
