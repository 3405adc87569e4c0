//! A blog: posts with an author and tags, and two read models, posts by author and posts by
//! tag, kept by projections in memory or in ScyllaDB tables.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::TryStreamExt;
use keel::projection::{ActiveGeneration, Generations, Projection};
use keel::{Aggregate, BoxError, DomainEvent, RecordedEvent};
use keel_scylla::{KeelScylla, ViewBatch};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlValue;
use serde::{Deserialize, Serialize};

/// A post's state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Post {
    /// Who wrote it (`None`: not created).
    pub author: Option<String>,
    /// Its title.
    pub title: String,
    /// Its tags.
    pub tags: BTreeSet<String>,
    /// Whether it was deleted.
    pub deleted: bool,
}

/// What a post can be asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum PostCommand {
    /// Write a new post.
    Create {
        author: String,
        title: String,
        tags: Vec<String>,
    },
    /// Change its title.
    Retitle { title: String },
    /// Add a tag.
    Tag { tag: String },
    /// Delete it.
    Delete,
}

/// What happened to a post.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PostEvent {
    /// A post was written.
    Created {
        author: String,
        title: String,
        tags: Vec<String>,
    },
    /// Its title changed.
    Retitled { title: String },
    /// A tag was added.
    Tagged { tag: String },
    /// It was deleted.
    Deleted,
}

impl DomainEvent for PostEvent {
    fn event_type(&self) -> &'static str {
        match self {
            PostEvent::Created { .. } => "Created",
            PostEvent::Retitled { .. } => "Retitled",
            PostEvent::Tagged { .. } => "Tagged",
            PostEvent::Deleted => "Deleted",
        }
    }
}

/// Why a post refuses a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PostError {
    /// Create twice.
    #[error("the post already exists")]
    Exists,
    /// Anything on a post that does not exist (or was deleted).
    #[error("no such post")]
    Missing,
    /// An empty title.
    #[error("a title cannot be empty")]
    EmptyTitle,
}

impl Aggregate for Post {
    const TYPE: &'static str = "post";
    type Command = PostCommand;
    type Event = PostEvent;
    type Error = PostError;

    fn handle(&self, command: PostCommand) -> Result<Vec<PostEvent>, PostError> {
        let exists = self.author.is_some() && !self.deleted;
        match command {
            PostCommand::Create { .. } if self.author.is_some() => Err(PostError::Exists),
            PostCommand::Create { title, .. } | PostCommand::Retitle { title }
                if title.trim().is_empty() =>
            {
                Err(PostError::EmptyTitle)
            }
            PostCommand::Create {
                author,
                title,
                tags,
            } => Ok(vec![PostEvent::Created {
                author,
                title,
                tags,
            }]),
            _ if !exists => Err(PostError::Missing),
            PostCommand::Retitle { title } => Ok(vec![PostEvent::Retitled { title }]),
            PostCommand::Tag { tag } if self.tags.contains(&tag) => Ok(vec![]),
            PostCommand::Tag { tag } => Ok(vec![PostEvent::Tagged { tag }]),
            PostCommand::Delete => Ok(vec![PostEvent::Deleted]),
        }
    }

    fn apply(&mut self, event: &PostEvent) {
        match event {
            PostEvent::Created {
                author,
                title,
                tags,
            } => {
                self.author = Some(author.clone());
                self.title = title.clone();
                self.tags = tags.iter().cloned().collect();
            }
            PostEvent::Retitled { title } => self.title = title.clone(),
            PostEvent::Tagged { tag } => {
                self.tags.insert(tag.clone());
            }
            PostEvent::Deleted => self.deleted = true,
        }
    }
}

/// Which index a [`PostIndex`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexBy {
    /// Posts by author: `posts_by_author`.
    Author,
    /// Posts by tag: `posts_by_tag`.
    Tag,
}

/// One post as the indexes know it.
#[derive(Clone, Debug, Default)]
struct Row {
    author: String,
    title: String,
    tags: BTreeSet<String>,
}

/// The in-memory model: the posts, and titles by key (author or tag).
#[derive(Default)]
struct Model {
    posts: BTreeMap<String, Row>,
    index: BTreeMap<String, BTreeMap<String, String>>,
}

/// A denormalised index of posts (by author or by tag), in memory or in ScyllaDB tables.
pub struct PostIndex {
    by: IndexBy,
    backend: Backend,
}

enum Backend {
    Memory(Generations<Model>),
    Scylla(Box<ScyllaIndex>),
}

/// The ScyllaDB tables of one index: the posts it knows, and the index table, both keyed by
/// generation so a rebuild fills new partitions while queries read the old ones.
struct ScyllaIndex {
    store: KeelScylla,
    /// The generation this process activated (its own manager's switch, seen at once).
    active: AtomicU64,
    /// The generation the projection's manager made active, wherever it runs (read from the
    /// store, cached for a second): readers in a process without the manager follow it.
    shared: ActiveGeneration,
    read_post: PreparedStatement,
    put_post: PreparedStatement,
    drop_post: PreparedStatement,
    put_entry: PreparedStatement,
    drop_entry: PreparedStatement,
    query: PreparedStatement,
    scan_posts: PreparedStatement,
}

impl PostIndex {
    /// An index kept in memory.
    pub fn in_memory(by: IndexBy) -> Arc<Self> {
        Arc::new(PostIndex {
            by,
            backend: Backend::Memory(Generations::default()),
        })
    }

    /// An index kept in ScyllaDB tables of the store's keyspace (created if missing).
    pub async fn in_scylla(by: IndexBy, store: &KeelScylla) -> Result<Arc<Self>, BoxError> {
        let (ks, key) = (store.keyspace(), by.key());
        let session = store.session();
        let posts = format!("{ks}.blog_{}_posts", by.table());
        let index = format!("{ks}.blog_{}", by.table());
        session
            .query_unpaged(
                format!(
                    "CREATE TABLE IF NOT EXISTS {posts} (generation bigint, post text, author text, title text, \
                     tags set<text>, PRIMARY KEY ((generation, post)))"
                ),
                (),
            )
            .await?;
        session
            .query_unpaged(
                format!(
                    "CREATE TABLE IF NOT EXISTS {index} (generation bigint, {key} text, post text, title text, \
                     PRIMARY KEY ((generation, {key}), post))"
                ),
                (),
            )
            .await?;
        let prep = |cql: String| async move { session.prepare(cql).await };
        let scylla = ScyllaIndex {
            store: store.clone(),
            active: AtomicU64::new(1),
            shared: ActiveGeneration::new(Arc::new(store.clone()), by.name()),
            read_post: prep(format!(
                "SELECT author, title, tags FROM {posts} WHERE generation = ? AND post = ?"
            ))
            .await?,
            put_post: prep(format!(
                "INSERT INTO {posts} (generation, post, author, title, tags) VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            drop_post: prep(format!(
                "DELETE FROM {posts} WHERE generation = ? AND post = ?"
            ))
            .await?,
            put_entry: prep(format!(
                "INSERT INTO {index} (generation, {key}, post, title) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            drop_entry: prep(format!(
                "DELETE FROM {index} WHERE generation = ? AND {key} = ? AND post = ?"
            ))
            .await?,
            query: prep(format!(
                "SELECT title FROM {index} WHERE generation = ? AND {key} = ?"
            ))
            .await?,
            scan_posts: prep(format!(
                "SELECT generation, post, author, tags FROM {posts}"
            ))
            .await?,
        };
        Ok(Arc::new(PostIndex {
            by,
            backend: Backend::Scylla(Box::new(scylla)),
        }))
    }

    /// Titles of the posts under `key` (an author or a tag), sorted, from the active generation.
    pub async fn titles(&self, key: &str) -> Result<Vec<String>, BoxError> {
        Ok(self.query(key).await?.1)
    }

    /// The generation that answered, and the titles of the posts under `key`, sorted. One
    /// read of one generation: an answer is never a mix of two.
    pub async fn query(&self, key: &str) -> Result<(u64, Vec<String>), BoxError> {
        self.query_in(key, false).await
    }

    /// [`query`](Self::query), with the active generation read from the store rather than
    /// from its one-second cache: for a read after waiting for a write
    /// (`QueryBus::ask_after`), which the projection's manager may have applied to a
    /// generation it switched to since.
    pub async fn query_fresh(&self, key: &str) -> Result<(u64, Vec<String>), BoxError> {
        self.query_in(key, true).await
    }

    async fn query_in(&self, key: &str, fresh: bool) -> Result<(u64, Vec<String>), BoxError> {
        let (generation, mut titles) = match &self.backend {
            Backend::Memory(model) => model.read_active(|generation, m| {
                let titles = m
                    .index
                    .get(key)
                    .map(|posts| posts.values().cloned().collect())
                    .unwrap_or_default();
                (generation, titles)
            }),
            Backend::Scylla(s) => {
                let generation = match fresh {
                    true => s
                        .active
                        .load(Ordering::SeqCst)
                        .max(s.shared.refresh().await?),
                    false => self.active_generation().await?,
                };
                let rows = s
                    .store
                    .session()
                    .execute_unpaged(&s.query, (generation as i64, key))
                    .await?
                    .into_rows_result()?;
                let titles = rows
                    .rows::<(String,)>()?
                    .map(|r| r.map(|(t,)| t))
                    .collect::<Result<Vec<_>, _>>()?;
                (generation, titles)
            }
        };
        titles.sort();
        Ok((generation, titles))
    }

    /// The generation queries read now: the newest of the one this process activated and the
    /// one the projection's manager (in any process) made active.
    pub async fn active_generation(&self) -> Result<u64, BoxError> {
        match &self.backend {
            Backend::Memory(model) => Ok(model.active()),
            Backend::Scylla(s) => Ok(s.active.load(Ordering::SeqCst).max(s.shared.get().await?)),
        }
    }

    /// The generations that have rows in the ScyllaDB tables (empty for the memory backend,
    /// which keeps only the generations it may still need).
    pub async fn stored_generations(&self) -> Result<BTreeSet<u64>, BoxError> {
        let mut found = BTreeSet::new();
        if let Backend::Scylla(s) = &self.backend {
            let mut rows = s
                .store
                .session()
                .execute_iter(s.scan_posts.clone(), ())
                .await?
                .rows_stream::<(i64, String, Option<String>, Option<Vec<String>>)>()?;
            while let Some((generation, ..)) = rows.try_next().await? {
                found.insert(generation as u64);
            }
        }
        Ok(found)
    }

    /// Deletes the rows of generations up to `retired`: every post row, and its index entries
    /// (found from the post row's author or tags). A paged scan of the posts table, once per
    /// rebuild, which itself read the whole history.
    async fn drop_generations_through(
        &self,
        s: &ScyllaIndex,
        retired: u64,
    ) -> Result<u64, BoxError> {
        let session = s.store.session();
        let mut rows = session
            .execute_iter(s.scan_posts.clone(), ())
            .await?
            .rows_stream::<(i64, String, Option<String>, Option<Vec<String>>)>()?;
        let mut dropped = 0;
        while let Some((generation, post, author, tags)) = rows.try_next().await? {
            if generation as u64 > retired {
                continue;
            }
            let row = Row {
                author: author.unwrap_or_default(),
                title: String::new(),
                tags: tags.unwrap_or_default().into_iter().collect(),
            };
            let text = |s: &str| CqlValue::Text(s.to_owned());
            let mut batch = ViewBatch::new();
            for key in self.keys(&row) {
                batch.add(
                    &s.drop_entry,
                    vec![CqlValue::BigInt(generation), text(&key), text(&post)],
                );
            }
            batch.add(
                &s.drop_post,
                vec![CqlValue::BigInt(generation), text(&post)],
            );
            batch.execute(session).await?;
            dropped += 1;
        }
        Ok(dropped)
    }

    fn keys(&self, row: &Row) -> Vec<String> {
        match self.by {
            IndexBy::Author => vec![row.author.clone()],
            IndexBy::Tag => row.tags.iter().cloned().collect(),
        }
    }

    /// The post's row before and after `event`.
    fn evolve(before: Option<Row>, event: &PostEvent) -> Option<Row> {
        match event {
            PostEvent::Created {
                author,
                title,
                tags,
            } => Some(Row {
                author: author.clone(),
                title: title.clone(),
                tags: tags.iter().cloned().collect(),
            }),
            PostEvent::Retitled { title } => before.map(|r| Row {
                title: title.clone(),
                ..r
            }),
            PostEvent::Tagged { tag } => before.map(|mut r| {
                r.tags.insert(tag.clone());
                r
            }),
            PostEvent::Deleted => None,
        }
    }
}

impl IndexBy {
    fn name(self) -> &'static str {
        match self {
            IndexBy::Author => "posts_by_author",
            IndexBy::Tag => "posts_by_tag",
        }
    }
    fn table(self) -> &'static str {
        match self {
            IndexBy::Author => "posts_by_author",
            IndexBy::Tag => "posts_by_tag",
        }
    }
    fn key(self) -> &'static str {
        match self {
            IndexBy::Author => "author",
            IndexBy::Tag => "tag",
        }
    }
}

#[async_trait]
impl Projection for PostIndex {
    fn name(&self) -> &str {
        self.by.name()
    }

    fn handles(&self, event_type: &str) -> bool {
        matches!(event_type, "Created" | "Retitled" | "Tagged" | "Deleted")
    }

    async fn apply(&self, generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        if !event.stream.as_str().starts_with("post-") {
            return Ok(());
        }
        let post = event.stream.as_str().to_owned();
        let decoded: PostEvent = event.decode()?;
        match &self.backend {
            Backend::Memory(model) => model.update(generation, |m| {
                let before = m.posts.remove(&post);
                if let Some(old) = &before {
                    for key in self.keys(old) {
                        m.index.entry(key).or_default().remove(&post);
                    }
                }
                if let Some(row) = Self::evolve(before, &decoded) {
                    for key in self.keys(&row) {
                        m.index
                            .entry(key)
                            .or_default()
                            .insert(post.clone(), row.title.clone());
                    }
                    m.posts.insert(post.clone(), row);
                }
            }),
            Backend::Scylla(s) => {
                let g = generation as i64;
                let session = s.store.session();
                let rows = session
                    .execute_unpaged(&s.read_post, (g, &post))
                    .await?
                    .into_rows_result()?;
                let before = rows
                    .maybe_first_row::<(Option<String>, Option<String>, Option<Vec<String>>)>()?
                    .map(|(author, title, tags)| Row {
                        author: author.unwrap_or_default(),
                        title: title.unwrap_or_default(),
                        tags: tags.unwrap_or_default().into_iter().collect(),
                    });
                // Every write is an upsert or delete keyed by the post: replaying is harmless.
                // The statements of one batch share a timestamp, and a delete wins a tie, so
                // only keys the post left are deleted; keys it keeps are overwritten.
                let after = Self::evolve(before.clone(), &decoded);
                let kept: BTreeSet<String> = after
                    .as_ref()
                    .map(|r| self.keys(r).into_iter().collect())
                    .unwrap_or_default();
                let mut batch = ViewBatch::new();
                let text = |s: &str| CqlValue::Text(s.to_owned());
                if let Some(old) = &before {
                    for key in self.keys(old).into_iter().filter(|k| !kept.contains(k)) {
                        batch.add(
                            &s.drop_entry,
                            vec![CqlValue::BigInt(g), text(&key), text(&post)],
                        );
                    }
                }
                match after {
                    Some(row) => {
                        for key in &kept {
                            batch.add(
                                &s.put_entry,
                                vec![
                                    CqlValue::BigInt(g),
                                    text(key),
                                    text(&post),
                                    text(&row.title),
                                ],
                            );
                        }
                        let tags = CqlValue::Set(row.tags.iter().map(|t| text(t)).collect());
                        batch.add(
                            &s.put_post,
                            vec![
                                CqlValue::BigInt(g),
                                text(&post),
                                text(&row.author),
                                text(&row.title),
                                tags,
                            ],
                        );
                    }
                    None => {
                        batch.add(&s.drop_post, vec![CqlValue::BigInt(g), text(&post)]);
                    }
                }
                batch.execute(session).await?;
            }
        }
        Ok(())
    }

    async fn reset(&self, generation: u64) -> Result<(), BoxError> {
        if let Backend::Memory(model) = &self.backend {
            model.reset(generation);
        }
        // ScyllaDB: a new generation is new partitions, empty by construction.
        Ok(())
    }

    async fn activate(&self, generation: u64) -> Result<(), BoxError> {
        match &self.backend {
            Backend::Memory(model) => model.activate(generation),
            // Queries of this process read the new generation from now on; those of other
            // processes within a second. The old rows stay until `retire`.
            Backend::Scylla(s) => s.active.store(generation, Ordering::SeqCst),
        }
        Ok(())
    }

    async fn retire(&self, generation: u64) -> Result<(), BoxError> {
        if let Backend::Scylla(s) = &self.backend {
            self.drop_generations_through(s, generation).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel::testing::AggregateTest;

    fn created() -> PostEvent {
        PostEvent::Created {
            author: "ada".into(),
            title: "Hello".into(),
            tags: vec!["rust".into()],
        }
    }

    #[test]
    fn a_post_is_created_once() {
        AggregateTest::<Post>::given(vec![created()])
            .when(PostCommand::Create {
                author: "bob".into(),
                title: "Again".into(),
                tags: vec![],
            })
            .then_expect_error(PostError::Exists);
    }

    #[test]
    fn tagging_twice_changes_nothing() {
        AggregateTest::<Post>::given(vec![created()])
            .when(PostCommand::Tag { tag: "rust".into() })
            .then_expect(vec![]);
    }

    #[test]
    fn a_deleted_post_refuses_changes() {
        AggregateTest::<Post>::given(vec![created(), PostEvent::Deleted])
            .when(PostCommand::Retitle {
                title: "New".into(),
            })
            .then_expect_error(PostError::Missing);
    }

    #[test]
    fn titles_cannot_be_empty() {
        AggregateTest::<Post>::given(vec![created()])
            .when(PostCommand::Retitle { title: " ".into() })
            .then_expect_error(PostError::EmptyTitle);
    }
}
