//! Payload codecs: compression and encryption of stored payloads, and crypto-shredding.
//!
//! JSON stays the default and stays readable by every tool. A [`Codec`] wraps a store
//! ([`Codec::events`], [`Codec::snapshots`]) and, on the way in, compresses payloads above a
//! size (LZ4) and encrypts them (AES-256-GCM) with a key per stream or per subject held in a
//! [`KeyStore`]; on the way out it opens them again. Each stored payload says how it was
//! encoded, so plain, compressed and encrypted events read back alike, and turning a codec on
//! or off never needs a migration.
//!
//! **Crypto-shredding.** [`Codec::shred`] deletes a subject's key: its events stay in the log,
//! but reading them gives [`Error::Shredded`] (naming stream, version, event type and
//! subject) instead of their content. Projections skip such events, so rebuilds run through.
//!
//! **Tampering and corruption.** A payload that fails authentication gives
//! [`Error::Tampered`]; one that does not decompress or parse gives [`Error::Corrupt`]. Both
//! name the event. The ciphertext is bound to its stream, event id and event type (or to its
//! stream and version, for snapshots), so a payload copied onto another event does not open.
//!
//! ```
//! use std::sync::Arc;
//! use keel::codec::Codec;
//! # use keel::doc::Counter;
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> keel::Result<()> {
//! let store = Arc::new(keel_memory::MemoryStore::new());
//! let keys = store.clone(); // any `KeyStore`; `keel-scylla` has one too
//! let codec = Codec::builder().compress_above(256).encrypt_streams(keys).build();
//!
//! let counters = keel::Repository::<Counter>::new(codec.events(store.clone()));
//! counters.execute("a", 5).await?;
//! assert_eq!(counters.load("a").await?.state.value, 5);
//!
//! codec.shred("counter-a").await?; // forget stream `counter-a`
//! let err = counters.load("a").await.unwrap_err();
//! assert!(err.is_shredded(), "{err}");
//! # Ok(()) }
//! ```
//!
//! # Stored format
//! A payload whose first byte is not `0x00` is plain JSON (JSON never starts with a NUL byte).
//! Otherwise it is an envelope: `0x00`, format `1`, flags (bit 0: LZ4, bit 1: AES-256-GCM);
//! when encrypted, the subject (u16 length + UTF-8) and the key id (16 bytes); when encrypted,
//! a 12-byte random nonce; then the body: the JSON, LZ4-compressed behind its length (u32)
//! when flagged, encrypted with its tag when flagged. Everything before the nonce is
//! authenticated with the body.

// Without `encryption`, the envelope's key fields and the seal context are parsed, not used.
#![cfg_attr(
    not(feature = "encryption"),
    allow(dead_code, unused_imports, unused_variables)
)]

#[cfg(feature = "encryption")]
mod keys;
mod store;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(feature = "encryption")]
use aes_gcm::aead::{Aead, OsRng, Payload};
#[cfg(feature = "encryption")]
use aes_gcm::{AeadCore, Aes256Gcm, Nonce};
use bytes::Bytes;
use uuid::Uuid;

#[cfg(feature = "encryption")]
pub use keys::{DataKey, KeyStore, MasterKey};
pub use store::{EncodedEvents, EncodedSnapshots};

use crate::error::{Error, Result};
use crate::event::{RecordedEvent, StreamId};
use crate::store::{EventStore, SnapshotStore};

const MARKER: u8 = 0x00;
const FORMAT: u8 = 1;
const COMPRESSED: u8 = 1;
const ENCRYPTED: u8 = 2;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// How many subjects' keys a codec keeps in memory at most.
pub const KEY_CACHE_CAPACITY: usize = 10_000;

/// The largest payload a codec decompresses unless told otherwise (64 MiB): a corrupt length
/// field cannot make it allocate more.
pub use crate::config::DEFAULT_MAX_PAYLOAD;

/// Why a stored payload could not be opened. Kept on
/// [`RecordedEvent::unreadable`](crate::RecordedEvent::unreadable) so that reading a stream
/// goes on past it; decoding the event gives the matching [`Error`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unreadable {
    /// The subject's key was deleted ([`Codec::shred`]).
    Shredded {
        /// The subject whose key is gone.
        subject: String,
    },
    /// The payload failed authentication: altered, or moved from another event.
    Tampered {
        /// What failed.
        reason: String,
    },
    /// The payload is malformed or does not decompress.
    Corrupt {
        /// What failed.
        reason: String,
    },
    /// The payload is encrypted and was read without a codec.
    Sealed {
        /// The subject it is encrypted for.
        subject: String,
    },
}

impl Unreadable {
    /// The error decoding `event` gives.
    pub(crate) fn to_error(&self, event: &RecordedEvent) -> Error {
        self.error_at(
            &event.stream,
            event.version,
            &event.event_type,
            event.schema_version,
        )
    }

    /// The error for a payload at `version` of `stream` (an event's, or a snapshot's).
    pub(crate) fn error_at(
        &self,
        stream: &StreamId,
        version: u64,
        event_type: &str,
        schema_version: u32,
    ) -> Error {
        let (stream, event_type) = (stream.clone(), event_type.to_owned());
        match self {
            Unreadable::Shredded { subject } => Error::Shredded {
                stream,
                version,
                event_type,
                subject: subject.clone(),
            },
            Unreadable::Tampered { reason } => Error::Tampered {
                stream,
                version,
                event_type,
                reason: reason.clone(),
            },
            Unreadable::Corrupt { reason } => Error::Corrupt {
                stream,
                version,
                event_type,
                reason: reason.clone(),
            },
            Unreadable::Sealed { subject } => Error::Decode {
                stream,
                version,
                event_type,
                schema_version,
                reason: format!(
                    "the payload is encrypted for subject `{subject}`; read it through a `keel::codec::Codec` store"
                ),
            },
        }
    }

    fn corrupt(reason: impl Into<String>) -> Self {
        Unreadable::Corrupt {
            reason: reason.into(),
        }
    }
}

/// What a payload belongs to; sealed into the ciphertext so it cannot be moved elsewhere.
#[derive(Clone, Copy)]
pub(crate) enum Context<'a> {
    Event {
        stream: &'a StreamId,
        event_id: Uuid,
        event_type: &'a str,
    },
    Snapshot {
        stream: &'a StreamId,
        version: u64,
    },
}

impl Context<'_> {
    fn stream(&self) -> &StreamId {
        match self {
            Context::Event { stream, .. } | Context::Snapshot { stream, .. } => stream,
        }
    }

    #[cfg(feature = "encryption")]
    fn aad(&self, header: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(header.len() + 64);
        aad.extend_from_slice(header);
        match self {
            Context::Event {
                stream,
                event_id,
                event_type,
            } => {
                aad.push(b'e');
                aad.extend_from_slice(event_id.as_bytes());
                aad.extend_from_slice(&(stream.as_str().len() as u32).to_be_bytes());
                aad.extend_from_slice(stream.as_str().as_bytes());
                aad.extend_from_slice(event_type.as_bytes());
            }
            Context::Snapshot { stream, version } => {
                aad.push(b's');
                aad.extend_from_slice(&version.to_be_bytes());
                aad.extend_from_slice(stream.as_str().as_bytes());
            }
        }
        aad
    }
}

/// A parsed envelope, borrowing the stored bytes.
struct Envelope<'a> {
    flags: u8,
    /// Subject and key id, when encrypted.
    key: Option<(&'a str, Uuid)>,
    /// The authenticated header (everything before the nonce).
    header: &'a [u8],
    nonce: &'a [u8],
    body: &'a [u8],
}

/// Whether a stored payload is an envelope (not plain JSON).
pub(crate) fn is_envelope(payload: &[u8]) -> bool {
    payload.first() == Some(&MARKER)
}

fn parse(bytes: &[u8]) -> std::result::Result<Envelope<'_>, Unreadable> {
    let short = || Unreadable::corrupt("the payload envelope is truncated");
    if bytes.len() < 3 || bytes[0] != MARKER {
        return Err(short());
    }
    if bytes[1] != FORMAT {
        return Err(Unreadable::corrupt(format!(
            "unknown payload format {} (this version of Keel reads format {FORMAT})",
            bytes[1]
        )));
    }
    let flags = bytes[2];
    if flags & !(COMPRESSED | ENCRYPTED) != 0 {
        return Err(Unreadable::corrupt(format!(
            "unknown payload flags {flags:#04x}"
        )));
    }
    if flags & ENCRYPTED == 0 {
        return Ok(Envelope {
            flags,
            key: None,
            header: &bytes[..3],
            nonce: &[],
            body: &bytes[3..],
        });
    }
    let len = u16::from_be_bytes(
        bytes
            .get(3..5)
            .ok_or_else(short)?
            .try_into()
            .unwrap_or_default(),
    ) as usize;
    let subject_end = 5 + len;
    let subject = std::str::from_utf8(bytes.get(5..subject_end).ok_or_else(short)?)
        .map_err(|_| Unreadable::corrupt("the payload's subject is not UTF-8"))?;
    let key_end = subject_end + 16;
    let key_id = Uuid::from_slice(bytes.get(subject_end..key_end).ok_or_else(short)?)
        .map_err(|_| short())?;
    let nonce = bytes.get(key_end..key_end + NONCE_LEN).ok_or_else(short)?;
    let body = &bytes[key_end + NONCE_LEN..];
    if body.len() < TAG_LEN {
        return Err(short());
    }
    Ok(Envelope {
        flags,
        key: Some((subject, key_id)),
        header: &bytes[..key_end],
        nonce,
        body,
    })
}

fn decompress(body: &[u8], max: usize) -> std::result::Result<Vec<u8>, Unreadable> {
    let len = body
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| Unreadable::corrupt("the compressed payload is truncated"))?;
    if len > max {
        return Err(Unreadable::corrupt(format!(
            "the payload claims {len} bytes decompressed, more than the limit of {max}"
        )));
    }
    let mut out = vec![0u8; len];
    #[cfg(not(feature = "compression"))]
    {
        let _ = &mut out;
        Err(Unreadable::corrupt(
            "the payload is LZ4-compressed, and this build of Keel has no `compression` feature",
        ))
    }
    #[cfg(feature = "compression")]
    match lz4_flex::block::decompress_into(&body[4..], &mut out) {
        Ok(n) if n == len => Ok(out),
        Ok(n) => Err(Unreadable::corrupt(format!(
            "the payload decompressed to {n} bytes, not the {len} it claims"
        ))),
        Err(e) => Err(Unreadable::corrupt(format!(
            "the payload does not decompress: {e}"
        ))),
    }
}

/// The JSON of a payload read without a codec: plain payloads as they are, compressed ones
/// decompressed, encrypted ones refused.
pub(crate) fn plain_json(payload: &[u8]) -> std::result::Result<Cow<'_, [u8]>, Unreadable> {
    if !is_envelope(payload) {
        return Ok(Cow::Borrowed(payload));
    }
    let envelope = parse(payload)?;
    if let Some((subject, _)) = envelope.key {
        return Err(Unreadable::Sealed {
            subject: subject.to_owned(),
        });
    }
    inflate(
        envelope.flags,
        Cow::Borrowed(envelope.body),
        DEFAULT_MAX_PAYLOAD,
    )
}

/// The JSON in an opened body: decompressed when the flags say so.
fn inflate(
    flags: u8,
    body: Cow<'_, [u8]>,
    max: usize,
) -> std::result::Result<Cow<'_, [u8]>, Unreadable> {
    if flags & COMPRESSED == 0 {
        return Ok(body);
    }
    decompress(&body, max).map(Cow::Owned)
}

#[cfg(feature = "encryption")]
type SubjectFn = dyn Fn(&StreamId) -> Option<String> + Send + Sync;

#[cfg(feature = "encryption")]
struct Encryption {
    keys: Arc<dyn KeyStore>,
    subject: Arc<SubjectFn>,
    /// At most [`KEY_CACHE_CAPACITY`] subjects' keys, least recently used evicted first (a key
    /// per stream over millions of streams must not keep millions of ciphers alive, nor
    /// forget every key at once when full).
    cache: quick_cache::sync::Cache<String, (DataKey, Instant)>,
    /// Ids of keys known to be shredded: shredding is for good, so these never go stale.
    shredded: quick_cache::sync::Cache<Uuid, ()>,
    ttl: Duration,
}

#[cfg(feature = "encryption")]
/// Why a sealed payload's key reference leads to no key.
enum Missing {
    /// Its key was shredded.
    Shredded,
    /// No such key, and none with that id was shredded: the reference was altered.
    Unknown,
}

#[cfg(feature = "encryption")]
impl Encryption {
    fn cached(&self, subject: &str) -> Option<DataKey> {
        let (key, at) = self.cache.get(subject)?;
        (at.elapsed() < self.ttl).then_some(key)
    }

    fn remember(&self, subject: &str, key: &DataKey) {
        self.cache
            .insert(subject.to_owned(), (key.clone(), Instant::now()));
    }

    /// The key to seal with (created when the subject has none).
    async fn sealing_key(&self, subject: &str) -> Result<DataKey> {
        if let Some(key) = self.cached(subject) {
            return Ok(key);
        }
        let key = self.keys.key_for(subject).await?;
        self.remember(subject, &key);
        Ok(key)
    }

    /// The key with id `id` of `subject`, or why there is none.
    async fn opening_key(
        &self,
        subject: &str,
        id: Uuid,
    ) -> Result<std::result::Result<DataKey, Missing>> {
        if let Some(key) = self.cached(subject).filter(|k| k.id() == id) {
            return Ok(Ok(key));
        }
        if self.shredded.get(&id).is_some() {
            return Ok(Err(Missing::Shredded));
        }
        match self.keys.find_key(subject).await? {
            Some(key) if key.id() == id => {
                self.remember(subject, &key);
                return Ok(Ok(key));
            }
            Some(key) => self.remember(subject, &key),
            None => {
                self.cache.remove(subject);
            }
        }
        if !self.keys.was_shredded(id).await? {
            return Ok(Err(Missing::Unknown));
        }
        self.shredded.insert(id, ());
        Ok(Err(Missing::Shredded))
    }
}

/// Encodes payloads on their way into a store and decodes them on their way out.
///
/// Built with [`Codec::builder`]; wraps stores with [`Codec::events`] and
/// [`Codec::snapshots`]. See the [module documentation](self).
pub struct Codec {
    compress_above: Option<usize>,
    max_payload: usize,
    #[cfg(feature = "encryption")]
    encryption: Option<Encryption>,
    compressed: metrics::Counter,
    encrypted: metrics::Counter,
    /// Subjects shredded through this codec: state derived from events before a shred may
    /// hold what was forgotten (see [`EventStore::cache_epoch`](crate::EventStore::cache_epoch)).
    shreds: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("compress_above", &self.compress_above)
            .field("max_payload", &self.max_payload)
            .field("encrypted", &self.encrypts())
            .finish()
    }
}

/// Configures a [`Codec`].
pub struct CodecBuilder {
    compress_above: Option<usize>,
    max_payload: usize,
    #[cfg(feature = "encryption")]
    keys: Option<(Arc<dyn KeyStore>, Arc<SubjectFn>)>,
    ttl: Duration,
}

impl CodecBuilder {
    /// Compresses (LZ4) payloads longer than `bytes`, when that makes them smaller.
    #[cfg(feature = "compression")]
    pub fn compress_above(mut self, bytes: usize) -> Self {
        self.compress_above = Some(bytes);
        self
    }

    /// Encrypts every stream's payloads with a key of its own (the subject is the stream id).
    #[cfg(feature = "encryption")]
    pub fn encrypt_streams(self, keys: Arc<dyn KeyStore>) -> Self {
        self.encrypt_subjects(keys, |stream: &StreamId| Some(stream.as_str().to_owned()))
    }

    /// Encrypts payloads with the key of the subject `subject` names for their stream (say, the
    /// customer that several aggregates' streams belong to). Streams it gives `None` for are
    /// not encrypted.
    #[cfg(feature = "encryption")]
    pub fn encrypt_subjects<F>(mut self, keys: Arc<dyn KeyStore>, subject: F) -> Self
    where
        F: Fn(&StreamId) -> Option<String> + Send + Sync + 'static,
    {
        self.keys = Some((keys, Arc::new(subject)));
        self
    }

    /// How long a key read from the key store is reused before it is read again (default 60
    /// s; at most [`KEY_CACHE_CAPACITY`] keys are kept). Another process's [`Codec::shred`] takes effect here within this time; this
    /// process's own shredding takes effect at once.
    pub fn key_cache_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The largest payload decompressed (default [`DEFAULT_MAX_PAYLOAD`]); a larger one is
    /// reported as corrupt.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// The codec, shared. Its metric handles are registered now, with the recorder installed
    /// at this time (as the repository's are).
    pub fn build(self) -> Arc<Codec> {
        Arc::new(Codec {
            compress_above: self.compress_above,
            max_payload: self.max_payload,
            #[cfg(feature = "encryption")]
            encryption: self.keys.map(|(keys, subject)| Encryption {
                keys,
                subject,
                cache: quick_cache::sync::Cache::new(KEY_CACHE_CAPACITY),
                shredded: quick_cache::sync::Cache::new(KEY_CACHE_CAPACITY),
                ttl: self.ttl,
            }),
            compressed: metrics::counter!(crate::metrics::PAYLOADS_COMPRESSED),
            encrypted: metrics::counter!(crate::metrics::PAYLOADS_ENCRYPTED),
            shreds: std::sync::atomic::AtomicU64::new(0),
        })
    }
}

impl Codec {
    /// A builder: no compression, no encryption until told.
    pub fn builder() -> CodecBuilder {
        CodecBuilder {
            compress_above: None,
            max_payload: DEFAULT_MAX_PAYLOAD,
            #[cfg(feature = "encryption")]
            keys: None,
            ttl: Duration::from_secs(60),
        }
    }

    /// A codec from [`PayloadConfig`](crate::config::PayloadConfig); `keys` is required when
    /// the configuration encrypts.
    #[cfg(all(feature = "encryption", feature = "compression"))]
    pub fn from_config(
        config: &crate::config::PayloadConfig,
        keys: Option<Arc<dyn KeyStore>>,
    ) -> Result<Arc<Codec>> {
        let mut builder = Codec::builder()
            .max_payload(config.max_payload_bytes)
            .key_cache_ttl(Duration::from_millis(config.key_cache_ttl_ms));
        if let Some(bytes) = config.compress_above_bytes {
            builder = builder.compress_above(bytes);
        }
        if config.encrypt {
            let keys = keys.ok_or_else(|| Error::Config {
                field: "payloads.encrypt".to_owned(),
                reason: "encryption needs a key store; pass one to `Codec::from_config`".to_owned(),
            })?;
            builder = builder.encrypt_streams(keys);
        }
        Ok(builder.build())
    }

    /// `inner` with payloads encoded on append and decoded on read.
    pub fn events(self: &Arc<Self>, inner: Arc<dyn EventStore>) -> Arc<EncodedEvents> {
        Arc::new(EncodedEvents::new(inner, self.clone()))
    }

    /// `inner` with snapshot payloads encoded on save and decoded on load (encrypted with the
    /// stream's subject key, so shredding a subject makes its snapshots unreadable too).
    pub fn snapshots(self: &Arc<Self>, inner: Arc<dyn SnapshotStore>) -> Arc<EncodedSnapshots> {
        Arc::new(EncodedSnapshots::new(inner, self.clone()))
    }

    /// Whether this codec encrypts some streams' payloads.
    pub fn encrypts(&self) -> bool {
        #[cfg(feature = "encryption")]
        return self.encryption.is_some();
        #[cfg(not(feature = "encryption"))]
        false
    }

    /// How many subjects' keys this codec holds in memory now (at most
    /// [`KEY_CACHE_CAPACITY`]).
    #[cfg(feature = "encryption")]
    pub fn cached_keys(&self) -> usize {
        self.encryption.as_ref().map_or(0, |e| e.cache.len())
    }

    /// Crypto-shredding: deletes `subject`'s key, so that its events and snapshots can no
    /// longer be read (they read as [`Error::Shredded`]). Returns whether the subject had a
    /// key. Fails with [`Error::Config`] when this codec does not encrypt.
    #[cfg(feature = "encryption")]
    pub async fn shred(&self, subject: &str) -> Result<bool> {
        let encryption = self.encryption.as_ref().ok_or_else(|| Error::Config {
            field: "payloads.encrypt".to_owned(),
            reason: format!("cannot shred `{subject}`: this codec does not encrypt"),
        })?;
        let had = encryption.keys.shred(subject).await?;
        encryption.cache.remove(subject);
        self.shreds
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        metrics::counter!(crate::metrics::SUBJECTS_SHREDDED).increment(1);
        tracing::info!(subject, had_key = had, "subject shredded");
        Ok(had)
    }

    /// How many subjects were shredded through this codec (in this process).
    pub fn shreds(&self) -> u64 {
        self.shreds.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Encodes one payload.
    pub(crate) async fn seal(&self, context: Context<'_>, plain: Bytes) -> Result<Bytes> {
        #[cfg(feature = "compression")]
        let compressed = self
            .compress_above
            .filter(|&limit| plain.len() > limit && plain.len() <= u32::MAX as usize)
            .map(|_| lz4_flex::block::compress(&plain))
            .filter(|c| c.len() + 4 < plain.len());
        #[cfg(not(feature = "compression"))]
        let compressed: Option<Vec<u8>> = None;
        #[cfg(feature = "encryption")]
        let subject = self
            .encryption
            .as_ref()
            .and_then(|e| (e.subject)(context.stream()).map(|s| (e, s)));
        #[cfg(not(feature = "encryption"))]
        // No encryption: no subject ever, and the type says so.
        let subject: Option<(std::convert::Infallible, String)> = None;
        if compressed.is_none() && subject.is_none() {
            return Ok(plain);
        }
        let mut flags = 0;
        let body: Cow<'_, [u8]> = match compressed {
            Some(c) => {
                flags |= COMPRESSED;
                let mut body = Vec::with_capacity(4 + c.len());
                body.extend_from_slice(&(plain.len() as u32).to_be_bytes());
                body.extend_from_slice(&c);
                self.compressed.increment(1);
                Cow::Owned(body)
            }
            None => Cow::Borrowed(&plain[..]),
        };
        let Some((encryption, subject)) = subject else {
            let mut out = Vec::with_capacity(3 + body.len());
            out.extend_from_slice(&[MARKER, FORMAT, flags]);
            out.extend_from_slice(&body);
            return Ok(Bytes::from(out));
        };
        #[cfg(not(feature = "encryption"))]
        match encryption {}
        #[cfg(feature = "encryption")]
        self.sealed(context, encryption, subject, flags, &body)
            .await
    }

    /// Encrypts `body` (already compressed when `flags` say so) with `subject`'s key.
    #[cfg(feature = "encryption")]
    async fn sealed(
        &self,
        context: Context<'_>,
        encryption: &Encryption,
        subject: String,
        mut flags: u8,
        body: &[u8],
    ) -> Result<Bytes> {
        if subject.len() > u16::MAX as usize {
            return Err(Error::Encode {
                what: format!("a payload of stream `{}`", context.stream()),
                reason: "its subject is longer than 65,535 bytes".to_owned(),
            });
        }
        let key = encryption.sealing_key(&subject).await?;
        flags |= ENCRYPTED;
        let mut out =
            Vec::with_capacity(3 + 2 + subject.len() + 16 + NONCE_LEN + body.len() + TAG_LEN);
        out.extend_from_slice(&[MARKER, FORMAT, flags]);
        out.extend_from_slice(&(subject.len() as u16).to_be_bytes());
        out.extend_from_slice(subject.as_bytes());
        out.extend_from_slice(key.id().as_bytes());
        let aad = context.aad(&out);
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = key
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: body,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Encode {
                what: format!("a payload of stream `{}`", context.stream()),
                reason: "AES-GCM refused to encrypt it".to_owned(),
            })?;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        self.encrypted.increment(1);
        Ok(Bytes::from(out))
    }

    /// Decodes one payload: `Ok(Ok(json))`, `Ok(Err(why unreadable))`, or `Err` when the key
    /// store failed.
    pub(crate) async fn open(
        &self,
        context: Context<'_>,
        stored: &Bytes,
    ) -> Result<std::result::Result<Bytes, Unreadable>> {
        if !is_envelope(stored) {
            return Ok(Ok(stored.clone()));
        }
        let envelope = match parse(stored) {
            Ok(e) => e,
            Err(why) => return Ok(Err(why)),
        };
        let body: Cow<'_, [u8]> = match envelope.key {
            None => Cow::Borrowed(envelope.body),
            #[cfg(not(feature = "encryption"))]
            Some((subject, _)) => {
                let _ = &context;
                return Ok(Err(Unreadable::Sealed {
                    subject: subject.to_owned(),
                }));
            }
            #[cfg(feature = "encryption")]
            Some((subject, key_id)) => {
                let Some(encryption) = &self.encryption else {
                    return Ok(Err(Unreadable::Sealed {
                        subject: subject.to_owned(),
                    }));
                };
                let key = match encryption.opening_key(subject, key_id).await? {
                    Ok(key) => key,
                    Err(Missing::Shredded) => {
                        return Ok(Err(Unreadable::Shredded {
                            subject: subject.to_owned(),
                        }))
                    }
                    Err(Missing::Unknown) => {
                        return Ok(Err(Unreadable::Tampered {
                            reason: format!(
                                "subject `{subject}` has no key {key_id}, and no key with that id was shredded (the key reference was altered)"
                            ),
                        }))
                    }
                };
                let aad = context.aad(envelope.header);
                match key.cipher().decrypt(
                    Nonce::from_slice(envelope.nonce),
                    Payload {
                        msg: envelope.body,
                        aad: &aad,
                    },
                ) {
                    Ok(plain) => Cow::Owned(plain),
                    Err(_) => {
                        return Ok(Err(Unreadable::Tampered {
                            reason: "the encrypted payload fails authentication (altered, or copied from another event)".to_owned(),
                        }))
                    }
                }
            }
        };
        Ok(
            inflate(envelope.flags, body, self.max_payload).map(|json| match json {
                Cow::Owned(v) => Bytes::from(v),
                Cow::Borrowed(b) => stored.slice_ref(b),
            }),
        )
    }

    /// Decodes a recorded event's payload in place; an unreadable one is marked, not failed.
    pub(crate) async fn open_event(&self, mut event: RecordedEvent) -> Result<RecordedEvent> {
        if !is_envelope(&event.payload) {
            return Ok(event);
        }
        let context = Context::Event {
            stream: &event.stream,
            event_id: event.event_id,
            event_type: &event.event_type,
        };
        match self.open(context, &event.payload).await? {
            Ok(plain) => event.payload = plain,
            Err(why) => {
                metrics::counter!(crate::metrics::PAYLOADS_UNREADABLE, "reason" => why.kind())
                    .increment(1);
                event.unreadable = Some(Box::new(why));
            }
        }
        Ok(event)
    }
}

impl Unreadable {
    fn kind(&self) -> &'static str {
        match self {
            Unreadable::Shredded { .. } => "shredded",
            Unreadable::Tampered { .. } => "tampered",
            Unreadable::Corrupt { .. } => "corrupt",
            Unreadable::Sealed { .. } => "sealed",
        }
    }
}
