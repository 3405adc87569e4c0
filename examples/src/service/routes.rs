//! The HTTP API: commands are POSTs sent through the `CommandBus`, reads are GETs asked of
//! the `QueryBus`, and the operator's endpoints (`/health`, `/metrics`, `/projections`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel::feed::Written;
use keel::projection::{Control, ProjectionStatus};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::app::{
    AccountById, App, Deposit, OpenAccount, PostsBy, PostsWithTag, Titles, Withdraw, WritePost,
    POSTS_BY_AUTHOR, POSTS_BY_TAG,
};
use super::errors::ApiError;
use super::Role;
use crate::blog::PostCommand;

type Shared = State<Arc<App>>;
type Reply<T> = Result<T, ApiError>;

/// The routes of `app.role`: an API serves commands and queries, a projector only the
/// operator's endpoints, `all` both.
pub fn router(app: Arc<App>) -> Router {
    let mut router = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/projections", get(projections))
        .route("/projections/{name}/rebuild", post(rebuild));
    if app.role != Role::Projector {
        router = router
            .route("/accounts", post(open_account))
            .route("/accounts/{id}", get(account))
            .route("/accounts/{id}/deposits", post(deposit))
            .route("/accounts/{id}/withdrawals", post(withdraw))
            .route("/posts", post(create_post))
            .route("/posts/{id}", axum::routing::delete(delete_post))
            .route("/posts/{id}/title", post(retitle_post))
            .route("/posts/{id}/tags", post(tag_post))
            .route("/tags/{tag}/posts", get(posts_with_tag))
            .route("/authors/{author}/posts", get(posts_by));
    }
    router
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(app)
}

/// A span per request, and one line when it is answered.
async fn trace_request(request: Request, next: Next) -> Response {
    let span =
        tracing::info_span!("http", method = %request.method(), path = %request.uri().path());
    async move {
        let started = Instant::now();
        let response = next.run(request).await;
        tracing::info!(
            status = response.status().as_u16(),
            micros = started.elapsed().as_micros() as u64,
            "answered"
        );
        response
    }
    .instrument(span)
    .await
}

/// A JSON body whose parse errors are answered like every other error (400, JSON body),
/// instead of axum's plain-text 415/422.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => Err(ApiError::BadRequest(describe(rejection))),
        }
    }
}

fn describe(rejection: JsonRejection) -> String {
    format!(
        "the request body is not the JSON expected: {}",
        rejection.body_text()
    )
}

/// What a command answers: its write, and the token that makes a later read wait for it.
#[derive(Debug, Serialize)]
pub struct Accepted {
    /// The stream written.
    pub stream: String,
    /// Its version after the command.
    pub version: u64,
    /// Pass as `?after=` to a read that must show this write.
    pub after: String,
}

impl From<Written> for Accepted {
    fn from(written: Written) -> Self {
        Accepted {
            after: format!("{}@{}", written.stream, written.version),
            stream: written.stream.to_string(),
            version: written.version,
        }
    }
}

#[derive(Deserialize)]
struct NewAccount {
    id: String,
    owner: String,
    #[serde(default)]
    initial: u64,
}

#[derive(Deserialize)]
struct Amount {
    amount: u64,
}

async fn open_account(State(app): Shared, Body(a): Body<NewAccount>) -> Reply<impl IntoResponse> {
    let command = OpenAccount {
        id: a.id,
        owner: a.owner,
        initial: a.initial,
    };
    let written = app.commands.send(command).await?;
    Ok((StatusCode::CREATED, Json(Accepted::from(written))))
}

async fn deposit(
    State(app): Shared,
    Path(id): Path<String>,
    Body(a): Body<Amount>,
) -> Reply<Json<Accepted>> {
    let written = app
        .commands
        .send(Deposit {
            id,
            amount: a.amount,
        })
        .await?;
    Ok(Json(written.into()))
}

async fn withdraw(
    State(app): Shared,
    Path(id): Path<String>,
    Body(a): Body<Amount>,
) -> Reply<Json<Accepted>> {
    let written = app
        .commands
        .send(Withdraw {
            id,
            amount: a.amount,
        })
        .await?;
    Ok(Json(written.into()))
}

async fn account(
    State(app): Shared,
    Path(id): Path<String>,
) -> Reply<Json<super::app::AccountView>> {
    match app.queries.ask(AccountById(id.clone())).await? {
        Some(view) => Ok(Json(view)),
        None => Err(ApiError::NotFound(format!("account {id}"))),
    }
}

#[derive(Deserialize)]
struct NewPost {
    id: String,
    author: String,
    title: String,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize)]
struct NewTitle {
    title: String,
}

#[derive(Deserialize)]
struct NewTag {
    tag: String,
}

async fn write_post(app: &App, id: String, command: PostCommand) -> Reply<Accepted> {
    Ok(app.commands.send(WritePost { id, command }).await?.into())
}

async fn create_post(State(app): Shared, Body(p): Body<NewPost>) -> Reply<impl IntoResponse> {
    let command = PostCommand::Create {
        author: p.author,
        title: p.title,
        tags: p.tags,
    };
    let accepted = write_post(&app, p.id, command).await?;
    Ok((StatusCode::CREATED, Json(accepted)))
}

async fn retitle_post(
    State(app): Shared,
    Path(id): Path<String>,
    Body(t): Body<NewTitle>,
) -> Reply<Json<Accepted>> {
    let command = PostCommand::Retitle { title: t.title };
    Ok(Json(write_post(&app, id, command).await?))
}

async fn tag_post(
    State(app): Shared,
    Path(id): Path<String>,
    Body(t): Body<NewTag>,
) -> Reply<Json<Accepted>> {
    Ok(Json(
        write_post(&app, id, PostCommand::Tag { tag: t.tag }).await?,
    ))
}

async fn delete_post(State(app): Shared, Path(id): Path<String>) -> Reply<Json<Accepted>> {
    Ok(Json(write_post(&app, id, PostCommand::Delete).await?))
}

/// `?after=STREAM@VERSION` (from a command's reply) makes a read wait until the projection
/// shows that write, up to `wait_ms` (default and cap: the service's `--wait-limit-ms`).
#[derive(Deserialize)]
struct Freshness {
    after: Option<String>,
    wait_ms: Option<u64>,
}

impl Freshness {
    fn written(&self) -> Result<Option<Written>, ApiError> {
        let Some(token) = &self.after else {
            return Ok(None);
        };
        let bad = || ApiError::BadRequest(format!("`after={token}` is not STREAM@VERSION"));
        let (stream, version) = token.rsplit_once('@').ok_or_else(bad)?;
        let version = version.parse().map_err(|_| bad())?;
        if stream.is_empty() {
            return Err(bad());
        }
        Ok(Some(Written::new(stream, version)))
    }

    fn timeout(&self, app: &App) -> Duration {
        let limit = app.wait_limit;
        self.wait_ms
            .map_or(limit, |ms| Duration::from_millis(ms).min(limit))
    }
}

async fn ask_index<Q: keel::Query<Output = Titles>>(
    app: &App,
    projection: &str,
    freshness: Freshness,
    query: Q,
) -> Reply<Json<Titles>> {
    let titles = match freshness.written()? {
        None => app.queries.ask(query).await?,
        Some(written) => {
            let timeout = freshness.timeout(app);
            app.queries
                .ask_after(&app.visibility, projection, &written, timeout, query)
                .await?
        }
    };
    Ok(Json(titles))
}

async fn posts_with_tag(
    State(app): Shared,
    Path(tag): Path<String>,
    Query(freshness): Query<Freshness>,
) -> Reply<Json<Titles>> {
    ask_index(&app, POSTS_BY_TAG, freshness, PostsWithTag(tag)).await
}

async fn posts_by(
    State(app): Shared,
    Path(author): Path<String>,
    Query(freshness): Query<Freshness>,
) -> Reply<Json<Titles>> {
    ask_index(&app, POSTS_BY_AUTHOR, freshness, PostsBy(author)).await
}

/// `GET /health`: 200 when every component is healthy, 503 otherwise.
#[derive(Serialize)]
struct HealthReport {
    healthy: bool,
    role: Role,
    store: &'static str,
    manager: String,
    /// Feed slices this process's feeder holds (ScyllaDB).
    feeding_slices: Option<usize>,
    components: Vec<keel::health::Health>,
}

async fn health(State(app): Shared) -> impl IntoResponse {
    let components = app.components.health().await;
    let healthy = components.iter().all(keel::health::Health::is_healthy);
    let report = HealthReport {
        healthy,
        role: app.role,
        store: app.store_name,
        manager: app.manager_id.clone(),
        feeding_slices: app.scylla.as_ref().map(|s| s.feeding_slices()),
        components,
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}

async fn metrics(State(app): Shared) -> Response {
    match &app.metrics {
        #[cfg(feature = "prometheus")]
        Some(handle) => handle.render().into_response(),
        #[cfg(not(feature = "prometheus"))]
        Some(never) => match *never {},
        None => ApiError::NotFound("metrics recorder in this process".into()).into_response(),
    }
}

/// Every projection's status as its manager last published it (from the store: the API
/// answers this too).
async fn projections(State(app): Shared) -> Reply<Json<Vec<ProjectionStatus>>> {
    Ok(Json(app.projections.list_status().await?))
}

#[derive(Serialize)]
struct Requested {
    projection: String,
    request: uuid::Uuid,
}

/// Leaves a rebuild request for whichever process runs the projection's manager.
async fn rebuild(State(app): Shared, Path(name): Path<String>) -> Reply<impl IntoResponse> {
    if ![POSTS_BY_TAG, POSTS_BY_AUTHOR].contains(&name.as_str()) {
        return Err(ApiError::NotFound(format!("projection {name}")));
    }
    let request = keel::projection::Request::new(Control::Rebuild);
    app.projections.request(&name, request).await?;
    tracing::info!(projection = %name, request = %request.id, "rebuild requested");
    Ok((
        StatusCode::ACCEPTED,
        Json(Requested {
            projection: name,
            request: request.id,
        }),
    ))
}
