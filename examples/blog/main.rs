//! Posts through the command bus, two read models kept by projections, a query answered from
//! one of them, and a blue/green rebuild of it from the full history.
//!
//! ```text
//! cargo run --example blog                    # in memory
//! cargo run --example blog -- --store scylla  # read models in ScyllaDB tables
//! ```

use std::time::{Duration, Instant};

use keel::projection::{Projection, ProjectionManager};
use keel::{Aggregate, Command, CommandBus, Query, QueryBus, Repository};
use keel_examples::blog::{IndexBy, Post, PostCommand, PostIndex};

/// Any change to a post.
#[derive(Clone, Debug)]
struct WritePost {
    id: String,
    command: PostCommand,
}

impl Command for WritePost {
    type Output = u64;
}

/// Titles of the posts with a tag.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct PostsWithTag(String);

impl Query for PostsWithTag {
    type Output = Vec<String>;
}

/// Titles of an author's posts.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct PostsBy(String);

impl Query for PostsBy {
    type Output = Vec<String>;
}

#[tokio::main]
async fn main() -> Result<(), keel::BoxError> {
    let stores = keel_examples::store::from_args().await?;
    println!("store: {}", stores.name);

    // The write side: one command type for every change to a post.
    let posts = Repository::<Post>::new(stores.events());
    let commands = CommandBus::builder()
        .command(move |w: WritePost, meta| {
            let posts = posts.clone();
            async move { Ok(posts.execute_with(&w.id, w.command, &meta).await?.version) }
        })?
        .build();

    // The read side: two projections, in memory or in ScyllaDB tables.
    let (by_author, by_tag) = match &stores.scylla {
        None => (
            PostIndex::in_memory(IndexBy::Author),
            PostIndex::in_memory(IndexBy::Tag),
        ),
        Some(store) => (
            PostIndex::in_scylla(IndexBy::Author, store).await?,
            PostIndex::in_scylla(IndexBy::Tag, store).await?,
        ),
    };
    let all = stores.all.clone();
    let manager = ProjectionManager::builder(all.clone(), all.clone(), all.clone(), all)
        .projection(by_author.clone())
        .projection(by_tag.clone())
        .poll_interval(Duration::from_millis(20))
        // Readers in other processes follow a switch within a second (`ActiveGeneration`);
        // this run has none, so the replaced generation's rows can go at once.
        .retire_after(Duration::ZERO)
        .build();
    manager.start();

    let (tags, authors) = (by_tag.clone(), by_author.clone());
    let queries = QueryBus::builder()
        .query(move |PostsWithTag(tag), _| {
            let tags = tags.clone();
            async move {
                tags.titles(&tag)
                    .await
                    .map_err(|e| keel::Error::store("blog", "query posts by tag", e))
            }
        })?
        .query(move |PostsBy(author), _| {
            let authors = authors.clone();
            async move {
                authors
                    .titles(&author)
                    .await
                    .map_err(|e| keel::Error::store("blog", "query posts by author", e))
            }
        })?
        .build();

    // Write some posts. Ids are fresh each run so a persistent store keeps earlier runs apart.
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let id = |n: u32| format!("{run}-{n}");
    let write = |n: u32, command: PostCommand| commands.send(WritePost { id: id(n), command });
    let create = |author: &str, title: &str, tags: &[&str]| PostCommand::Create {
        author: author.into(),
        title: title.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    };
    write(
        1,
        create("ada", "Event sourcing in Rust", &["rust", "cqrs"]),
    )
    .await?;
    write(2, create("bob", "Paxos for the impatient", &["databases"])).await?;
    write(3, create("ada", "Typed buses", &["rust"])).await?;
    write(
        3,
        PostCommand::Retitle {
            title: "Typed command buses".into(),
        },
    )
    .await?;
    write(2, PostCommand::Tag { tag: "rust".into() }).await?;
    write(1, PostCommand::Delete).await?;
    println!("wrote 3 posts, retitled one, tagged one, deleted one");

    // The feed is asynchronous on ScyllaDB: wait until both projections have applied every
    // event just written (this run's store holds nothing else) before asking.
    let mut written = 0;
    for n in 1..=3 {
        written += stores
            .events()
            .stream_version(&Post::stream_id(&id(n)))
            .await?
            .unwrap_or(0);
    }
    wait_until_caught_up(&manager, &[by_author.name(), by_tag.name()], written).await?;
    let tagged = queries.ask(PostsWithTag("rust".into())).await?;
    println!("posts tagged rust: {tagged:?}");
    println!(
        "posts by ada: {:?}",
        queries.ask(PostsBy("ada".into())).await?
    );

    // Rebuild one read model from the whole history, blue/green: queries keep reading the old
    // generation until the new one has caught up, then it becomes the one they read.
    let events = manager.rebuild("posts_by_tag").await?;
    println!("rebuilt posts_by_tag: {events} events");
    let after = queries.ask(PostsWithTag("rust".into())).await?;
    println!("posts tagged rust after the swap: {after:?}");
    if after != tagged {
        return Err("the rebuilt read model answers differently".into());
    }
    println!("same answer after the rebuild");
    // On ScyllaDB the old generation's rows are dropped when it is retired, after the
    // grace (none here) that lets readers elsewhere move on to the new one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut kept = by_tag.stored_generations().await?;
    while kept.len() > 1 {
        if Instant::now() > deadline {
            return Err(format!("older generations left behind: {kept:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        kept = by_tag.stored_generations().await?;
    }
    if !kept.is_empty() {
        println!("generations stored for posts_by_tag: {kept:?}");
    }
    manager.stop().await;
    stores.finish().await
}

/// Waits until every named projection has consumed `events` events of the feed.
async fn wait_until_caught_up(
    manager: &ProjectionManager,
    names: &[&str],
    events: u64,
) -> keel::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in names {
        loop {
            let status = manager.status(name).await?;
            if status.consumed >= events {
                break;
            }
            if Instant::now() > deadline {
                return Err(keel::Error::Timeout {
                    operation: format!("catch-up of {name}"),
                    after: Duration::from_secs(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}
