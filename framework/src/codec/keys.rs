//! Keys for payload encryption: a [`DataKey`] per subject, held in a [`KeyStore`]; a
//! [`MasterKey`] to wrap data keys where a store keeps them beside the data.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Nonce};
use async_trait::async_trait;
use uuid::Uuid;

use crate::error::{Error, Result};

/// A subject's AES-256 key, with an id that sealed payloads record so that a key created after
/// a shredding never opens what the shredded key sealed.
#[derive(Clone)]
pub struct DataKey {
    id: Uuid,
    material: [u8; 32],
    cipher: Aes256Gcm,
}

impl DataKey {
    /// A fresh random key with a fresh id.
    pub fn generate() -> Self {
        let material: [u8; 32] = Aes256Gcm::generate_key(OsRng).into();
        DataKey::from_parts(Uuid::new_v4(), material)
    }

    /// A key from its id and its 32 bytes (as a key store read them back).
    pub fn from_parts(id: Uuid, material: [u8; 32]) -> Self {
        DataKey {
            id,
            material,
            cipher: Aes256Gcm::new(&material.into()),
        }
    }

    /// The key's id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The key's 32 bytes, for a key store to persist (wrapped, ideally: see [`MasterKey`]).
    pub fn material(&self) -> &[u8; 32] {
        &self.material
    }

    pub(crate) fn cipher(&self) -> &Aes256Gcm {
        &self.cipher
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        // The cipher zeroes its own key schedule (aes-gcm's `zeroize` feature).
        zeroize::Zeroize::zeroize(&mut self.material);
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl PartialEq for DataKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.material == other.material
    }
}

/// Where subjects' data keys live. Deleting a key ([`shred`](KeyStore::shred)) makes every
/// payload sealed with it unreadable for good: crypto-shredding.
///
/// `keel-memory` and `keel-scylla` implement it; the conformance suite's `codecs` section
/// checks an implementation.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The subject's key, created when it has none. Concurrent callers for one subject get the
    /// same key.
    async fn key_for(&self, subject: &str) -> Result<DataKey>;

    /// The subject's key, if it has one (`None` once shredded, until a new one is created).
    async fn find_key(&self, subject: &str) -> Result<Option<DataKey>>;

    /// Deletes the subject's key, first recording its id as shredded (see
    /// [`was_shredded`](KeyStore::was_shredded)). Returns whether there was one.
    async fn shred(&self, subject: &str) -> Result<bool>;

    /// Whether the key with this id was shredded. Stores keep the ids of shredded keys (random
    /// UUIDs: never the subjects, which may themselves be personal data), so that a reader can
    /// tell a payload whose key was shredded from one whose key reference was altered.
    async fn was_shredded(&self, key_id: Uuid) -> Result<bool>;
}

/// A key-encryption key: wraps data keys (AES-256-GCM, bound to the subject and key id) so a
/// store can keep them beside the events without a copy of the database opening them.
///
/// Keep it outside the database (an environment variable, a secrets manager, a KMS).
#[derive(Clone)]
pub struct MasterKey {
    cipher: Aes256Gcm,
}

impl MasterKey {
    /// A master key from 32 bytes.
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        let key = MasterKey {
            cipher: Aes256Gcm::new(&bytes.into()),
        };
        zeroize::Zeroize::zeroize(&mut bytes);
        key
    }

    /// A master key from 64 hexadecimal digits.
    ///
    /// ```
    /// let key = keel::codec::MasterKey::from_hex(&"ab".repeat(32))?;
    /// assert!(keel::codec::MasterKey::from_hex("abc").is_err());
    /// assert!(keel::codec::MasterKey::from_hex(&"é".repeat(32)).is_err()); // 64 bytes, not hex
    /// # Ok::<(), keel::Error>(())
    /// ```
    pub fn from_hex(hex: &str) -> Result<Self> {
        let hex = hex.trim();
        let refuse = |reason: &str| Error::Config {
            field: "master_key".to_owned(),
            reason: reason.to_owned(),
        };
        if hex.len() != 64 {
            return Err(refuse("a master key is 64 hexadecimal digits (32 bytes)"));
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("-"), 16)
                .map_err(|_| refuse("not hexadecimal"))?;
        }
        Ok(MasterKey::from_bytes(bytes))
    }

    /// A random master key (tests and examples).
    pub fn generate() -> Self {
        MasterKey::from_bytes(Aes256Gcm::generate_key(OsRng).into())
    }

    /// `key`'s material sealed for `subject`: nonce (12 bytes) then ciphertext and tag.
    pub fn wrap_key(&self, subject: &str, key: &DataKey) -> Vec<u8> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = wrap_aad(subject, key.id);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: key.material(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM seals any 32-byte message");
        let mut out = Vec::with_capacity(12 + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens what [`wrap_key`](MasterKey::wrap_key) sealed; a wrong master key, subject or id, or
    /// altered bytes give [`Error::Config`] naming the subject.
    pub fn unwrap_key(&self, subject: &str, id: Uuid, wrapped: &[u8]) -> Result<DataKey> {
        let refuse = || {
            Error::Config {
            field: "master_key".to_owned(),
            reason: format!(
                "the data key of subject `{subject}` does not open with this master key (wrong key, or the stored key was altered)"
            ),
        }
        };
        if wrapped.len() < 12 {
            return Err(refuse());
        }
        let (nonce, sealed) = wrapped.split_at(12);
        let material = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &wrap_aad(subject, id),
                },
            )
            .map_err(|_| refuse())?;
        let material: [u8; 32] = material.try_into().map_err(|_| refuse())?;
        Ok(DataKey::from_parts(id, material))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

fn wrap_aad(subject: &str, id: Uuid) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + subject.len() + 8);
    aad.extend_from_slice(b"keel-key");
    aad.extend_from_slice(id.as_bytes());
    aad.extend_from_slice(subject.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_keys_open_only_for_their_subject_and_master() {
        let master = MasterKey::generate();
        let key = DataKey::generate();
        let wrapped = master.wrap_key("alice", &key);
        assert_eq!(master.unwrap_key("alice", key.id(), &wrapped).unwrap(), key);
        assert!(master.unwrap_key("bob", key.id(), &wrapped).is_err());
        assert!(master
            .unwrap_key("alice", Uuid::new_v4(), &wrapped)
            .is_err());
        assert!(MasterKey::generate()
            .unwrap_key("alice", key.id(), &wrapped)
            .is_err());
        let mut altered = wrapped.clone();
        altered[20] ^= 1;
        assert!(master.unwrap_key("alice", key.id(), &altered).is_err());
        assert!(master.unwrap_key("alice", key.id(), &wrapped[..5]).is_err());
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let key = DataKey::from_parts(Uuid::nil(), [7; 32]);
        let shown = format!("{key:?} {:?}", MasterKey::from_bytes([7; 32]));
        assert!(!shown.contains("7, 7"), "{shown}");
        assert!(shown.contains("DataKey"));
    }
}
