//! Cluster state storage.
//!
//! Everything the proxies of one cluster share (CAs, tokens, nodes, proxies, revocations) lives
//! behind [`Backend`], with two implementations that pass one conformance suite
//! (`tests/tests/backend.rs`):
//! - [`RedbBackend`]: an embedded file in the proxy's data dir; the default, for one proxy.
//! - [`EtcdBackend`]: etcd, for several proxies sharing one cluster.

mod etcd;
mod redb;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub use self::etcd::{EtcdBackend, EtcdConfig, EtcdTls};
pub use self::redb::RedbBackend;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "the state database {path} is in use by another process (is another burrow-proxy running with this data dir?)"
    )]
    Locked { path: String },
    /// The store cannot be reached now; retrying later can help.
    #[error("the state backend is unreachable: {0}")]
    Unavailable(String),
    /// The lease expired (or never existed): grant a new one and write again.
    #[error("the lease has expired")]
    LeaseExpired,
    #[error("state storage failed: {0}")]
    Storage(String),
}

impl BackendError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, BackendError::Unavailable(_))
    }
}

/// A lease: keys written under it vanish together when it is not renewed within its TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// Deleted, or expired with its TTL or lease.
    Delete {
        key: String,
    },
    /// Events may have been missed (the watcher fell behind, or the store's history was
    /// compacted while it was away): list the prefix again.
    Reset,
}

/// The current items under a prefix, and the changes that follow them.
pub type Snapshot = (Vec<(String, Vec<u8>)>, mpsc::Receiver<Event>);

/// A key-value store with compare-and-swap, expiry, leases and watches.
///
/// Keys are `/`-separated paths (`/tokens/<hash>`); values are opaque bytes. A key whose TTL or
/// lease has run out is absent for every operation.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError>;

    /// Writes `value`, replacing any current value; with a TTL the key vanishes after it.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), BackendError>;

    /// [`Backend::put`] for a value written again and again (a presence, every 30 s): the write
    /// may be lost in a crash, leaving the value before it, and costs no disk flush of its own.
    async fn refresh(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), BackendError> {
        self.put(key, value, ttl).await
    }

    /// Writes `value` only if the current value is `expected` (`None`: the key must be absent).
    /// Returns whether it wrote.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<bool, BackendError>;

    /// Deletes `key`; returns whether it was present.
    async fn delete(&self, key: &str) -> Result<bool, BackendError>;

    /// Every live key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, BackendError>;

    /// Grants a lease that lives `ttl` unless renewed.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, BackendError>;

    /// Renews a lease for another TTL; [`BackendError::LeaseExpired`] if it is gone.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), BackendError>;

    /// Writes `value` under `lease`; [`BackendError::LeaseExpired`] if the lease is gone.
    async fn put_leased(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<(), BackendError>;

    /// Ends a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), BackendError>;

    /// The items under `prefix` now, and every change after them, until the receiver is
    /// dropped. The stream survives losing the store for a while.
    async fn watch(&self, prefix: &str) -> Result<Snapshot, BackendError>;
}
