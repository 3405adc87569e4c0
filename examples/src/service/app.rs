//! What one service process holds: the buses, the read models, the long-running components,
//! assembled for its role and store.

use std::sync::Arc;
use std::time::Duration;

use keel::bus::{MetricsLayer, TimeoutLayer, TraceLayer, ValidateLayer};
use keel::feed::Written;
use keel::lifecycle::Components;
use keel::projection::{Projection, ProjectionManager, ProjectionStore, Visibility};
use keel::{Command, CommandBus, Query, QueryBus, Repository};
use keel_scylla::{KeelScylla, ScyllaConfig};
use serde::Serialize;

use super::throttle::RebuildThrottle;
use super::{Options, Role, StoreKind};
use crate::bank::{Account, AccountCommand};
use crate::blog::{IndexBy, Post, PostCommand, PostIndex};
use crate::store::AllStores;

/// Open an account with a first deposit.
#[derive(Clone, Debug)]
pub struct OpenAccount {
    /// The account's id.
    pub id: String,
    /// Its owner.
    pub owner: String,
    /// The first deposit, in cents.
    pub initial: u64,
}

/// Put money into an account.
#[derive(Clone, Debug)]
pub struct Deposit {
    /// The account's id.
    pub id: String,
    /// How much, in cents.
    pub amount: u64,
}

/// Take money out of an account.
#[derive(Clone, Debug)]
pub struct Withdraw {
    /// The account's id.
    pub id: String,
    /// How much, in cents.
    pub amount: u64,
}

/// Any change to a post.
#[derive(Clone, Debug)]
pub struct WritePost {
    /// The post's id.
    pub id: String,
    /// The change.
    pub command: PostCommand,
}

// Every command answers with its write, which a later read can wait for.
impl Command for OpenAccount {
    type Output = Written;
    fn validate(&self) -> Result<(), String> {
        if self.owner.trim().is_empty() {
            return Err("the owner's name is empty".into());
        }
        Ok(())
    }
}
impl Command for Deposit {
    type Output = Written;
}
impl Command for Withdraw {
    type Output = Written;
}
impl Command for WritePost {
    type Output = Written;
    fn validate(&self) -> Result<(), String> {
        match &self.command {
            PostCommand::Create { author, .. } if author.trim().is_empty() => {
                Err("the author's name is empty".into())
            }
            PostCommand::Tag { tag } if tag.trim().is_empty() => Err("the tag is empty".into()),
            _ => Ok(()),
        }
    }
}

/// An account as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct AccountView {
    /// Its id.
    pub id: String,
    /// Its owner.
    pub owner: String,
    /// Its balance, in cents.
    pub balance: u64,
    /// Its stream's version.
    pub version: u64,
}

/// One account, by id (`None`: never opened).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct AccountById(pub String);

impl Query for AccountById {
    type Output = Option<AccountView>;
}

/// Titles of the posts with a tag.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PostsWithTag(pub String);

/// Titles of an author's posts.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PostsBy(pub String);

/// The answer of a post index, and which generation of it answered.
#[derive(Clone, Debug, Serialize)]
pub struct Titles {
    /// The generation read (it changes when a rebuild switches).
    pub generation: u64,
    /// The titles, sorted.
    pub titles: Vec<String>,
}

impl Query for PostsWithTag {
    type Output = Titles;
}
impl Query for PostsBy {
    type Output = Titles;
}

/// The projection behind [`PostsWithTag`].
pub const POSTS_BY_TAG: &str = "posts_by_tag";
/// The projection behind [`PostsBy`].
pub const POSTS_BY_AUTHOR: &str = "posts_by_author";

/// One process's parts.
pub struct App {
    /// What it runs.
    pub role: Role,
    /// `memory` or `scylla`.
    pub store_name: &'static str,
    /// The projection manager's id in leases and status (also when this process runs none).
    pub manager_id: String,
    /// Commands go here.
    pub commands: CommandBus,
    /// Queries go here.
    pub queries: QueryBus,
    /// Waits for a projection to apply a write.
    pub visibility: Visibility,
    /// Projection status and requests, shared with whichever process runs the manager.
    pub projections: Arc<dyn ProjectionStore>,
    /// The long-running parts this process runs.
    pub components: Components,
    /// The ScyllaDB store, when on it.
    pub scylla: Option<KeelScylla>,
    /// Renders `/metrics` (the Prometheus text format).
    pub metrics: Option<super::Metrics>,
    /// The longest a read waits for its write (`?after=`).
    pub wait_limit: Duration,
}

impl App {
    /// Opens the store and assembles the parts of `options.role`.
    pub async fn build(
        options: &Options,
        metrics: Option<super::Metrics>,
    ) -> Result<App, keel::BoxError> {
        let manager_id = format!(
            "{}-{}",
            options.name,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let runs_projector = options.role != Role::Api;
        let lease_ttl = Duration::from_millis(options.lease_ttl_ms);
        let (all, scylla): (Arc<dyn AllStores>, Option<KeelScylla>) = match options.store {
            StoreKind::Memory => {
                if options.role != Role::All {
                    return Err(format!(
                        "`--role {}` needs `--store scylla`: the memory store lives inside one \
                         process, so an API and a projector cannot share it",
                        options.role
                    )
                    .into());
                }
                (Arc::new(keel_memory::MemoryStore::new()), None)
            }
            StoreKind::Scylla => {
                let config = ScyllaConfig::from_env()?;
                let mut builder = KeelScylla::builder()
                    .config(&config)?
                    .keyspace(options.keyspace.clone())
                    .feeder(runs_projector)
                    .feeder_name(&options.name)
                    .feeder_lease_ttl(lease_ttl);
                if config.nodes.is_empty() {
                    builder = builder.known_node("127.0.0.1:9042");
                }
                if let Ok(hex) = std::env::var("KEEL_MASTER_KEY") {
                    builder = builder.master_key(keel::codec::MasterKey::from_hex(&hex)?);
                }
                let store = builder.build().await.map_err(|e| {
                    format!(
                        "cannot open keyspace `{}` on ScyllaDB: {e}",
                        options.keyspace
                    )
                })?;
                (Arc::new(store.clone()), Some(store))
            }
        };

        let (by_author, by_tag) = match &scylla {
            None => (
                PostIndex::in_memory(IndexBy::Author),
                PostIndex::in_memory(IndexBy::Tag),
            ),
            Some(store) => (
                PostIndex::in_scylla(IndexBy::Author, store).await?,
                PostIndex::in_scylla(IndexBy::Tag, store).await?,
            ),
        };

        let mut components = Components::new();
        if let Some(store) = &scylla {
            components = components.with(store.clone());
        }
        if runs_projector {
            let mut manager =
                ProjectionManager::builder(all.clone(), all.clone(), all.clone(), all.clone())
                    .id(manager_id.clone())
                    .poll_interval(Duration::from_millis(50))
                    .lease_ttl(lease_ttl);
            for index in [by_author.clone(), by_tag.clone()] {
                let projection: Arc<dyn Projection> = match options.rebuild_rate {
                    0 => index,
                    rate => Arc::new(RebuildThrottle::new(index, all.clone(), rate)),
                };
                manager = manager.projection(projection);
            }
            components = components.with(manager.build());
        }

        Ok(App {
            role: options.role,
            store_name: options.store.name(),
            manager_id,
            commands: command_bus(all.clone())?,
            queries: query_bus(all.clone(), by_author, by_tag)?,
            visibility: Visibility::new(all.clone(), all.clone()),
            projections: all,
            components,
            scylla,
            metrics,
            wait_limit: Duration::from_millis(options.wait_limit_ms),
        })
    }
}

/// Commands go through the bus's layers (spans, metrics, validation, a time limit) to the
/// repositories. The repositories retry version conflicts themselves; no layer retries on
/// top (a retry after a timeout could apply a command twice).
fn command_bus(all: Arc<dyn AllStores>) -> keel::Result<CommandBus> {
    let accounts = Repository::<Account>::new(all.clone());
    let posts = Repository::<Post>::new(all);
    let (open, deposit, withdraw) = (accounts.clone(), accounts.clone(), accounts);
    Ok(CommandBus::builder()
        .layer(TraceLayer)
        .layer(MetricsLayer::new())
        .layer(ValidateLayer)
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .command(move |c: OpenAccount, meta| {
            let repo = open.clone();
            async move {
                let cmd = AccountCommand::Open {
                    owner: c.owner,
                    initial: c.initial,
                };
                Ok(repo.execute_with(&c.id, cmd, &meta).await?.written())
            }
        })?
        .command(move |c: Deposit, meta| {
            let repo = deposit.clone();
            async move {
                let cmd = AccountCommand::Deposit { amount: c.amount };
                Ok(repo.execute_with(&c.id, cmd, &meta).await?.written())
            }
        })?
        .command(move |c: Withdraw, meta| {
            let repo = withdraw.clone();
            async move {
                let cmd = AccountCommand::Withdraw { amount: c.amount };
                Ok(repo.execute_with(&c.id, cmd, &meta).await?.written())
            }
        })?
        .command(move |w: WritePost, meta| {
            let repo = posts.clone();
            async move { Ok(repo.execute_with(&w.id, w.command, &meta).await?.written()) }
        })?
        .build())
}

/// Accounts are read from their aggregate (a real bank would keep a projection); posts from
/// the two indexes.
fn query_bus(
    all: Arc<dyn AllStores>,
    by_author: Arc<PostIndex>,
    by_tag: Arc<PostIndex>,
) -> keel::Result<QueryBus> {
    let accounts = Repository::<Account>::new(all);
    // A read that waited for its write (`ask_after` marks it fresh) reads the active
    // generation from the store: a rebuild may have switched it since the cached read.
    let titles = |index: Arc<PostIndex>, what: &'static str| {
        move |key: String, meta: keel::Metadata| {
            let index = index.clone();
            async move {
                let fresh = meta.user.contains_key(keel::bus::FRESH);
                let read = match fresh {
                    true => index.query_fresh(&key).await,
                    false => index.query(&key).await,
                };
                let (generation, titles) = read.map_err(|e| keel::Error::store("blog", what, e))?;
                Ok(Titles { generation, titles })
            }
        }
    };
    let (with_tag, by) = (
        titles(by_tag, "query posts by tag"),
        titles(by_author, "query posts by author"),
    );
    Ok(QueryBus::builder()
        .layer(TraceLayer)
        .layer(MetricsLayer::new())
        .query(move |AccountById(id), _| {
            let repo = accounts.clone();
            async move {
                let loaded = repo.load(&id).await?;
                Ok(loaded.state.owner.clone().map(|owner| AccountView {
                    id,
                    owner,
                    balance: loaded.state.balance,
                    version: loaded.version,
                }))
            }
        })?
        .query(move |PostsWithTag(tag), meta| with_tag(tag, meta))?
        .query(move |PostsBy(author), meta| by(author, meta))?
        .build())
}
