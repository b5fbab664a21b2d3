//! Cluster state storage.
//!
//! Everything the proxies of one cluster share (CAs, tokens, nodes, revocations) lives behind
//! [`Backend`]. `redb` is the embedded default for a single proxy; an etcd implementation for
//! several proxies will implement the same trait and pass the same conformance tests.

mod redb;

use std::time::Duration;

use async_trait::async_trait;

pub use self::redb::RedbBackend;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "the state database {path} is in use by another process (is another burrow-proxy running with this data dir?)"
    )]
    Locked { path: String },
    #[error("state storage failed: {0}")]
    Storage(String),
}

/// A key-value store with compare-and-swap and per-key expiry.
///
/// Keys are `/`-separated paths (`/tokens/<hash>`); values are opaque bytes. A key whose TTL has
/// passed is absent for every operation.
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
}

/// Conformance tests every backend must pass.
#[cfg(test)]
pub(crate) mod conformance {
    use std::time::Duration;

    use super::Backend;

    pub async fn get_put_delete(b: &dyn Backend) {
        assert_eq!(b.get("/a").await.unwrap(), None);
        b.put("/a", b"1".to_vec(), None).await.unwrap();
        assert_eq!(b.get("/a").await.unwrap(), Some(b"1".to_vec()));
        b.put("/a", b"2".to_vec(), None).await.unwrap();
        assert_eq!(b.get("/a").await.unwrap(), Some(b"2".to_vec()));
        assert!(b.delete("/a").await.unwrap());
        assert!(!b.delete("/a").await.unwrap());
        assert_eq!(b.get("/a").await.unwrap(), None);
    }

    pub async fn compare_and_swap(b: &dyn Backend) {
        assert!(
            b.compare_and_swap("/c", None, b"x".to_vec(), None)
                .await
                .unwrap()
        );
        assert!(
            !b.compare_and_swap("/c", None, b"y".to_vec(), None)
                .await
                .unwrap()
        );
        assert!(
            !b.compare_and_swap("/c", Some(b"y"), b"z".to_vec(), None)
                .await
                .unwrap()
        );
        assert!(
            b.compare_and_swap("/c", Some(b"x"), b"z".to_vec(), None)
                .await
                .unwrap()
        );
        assert_eq!(b.get("/c").await.unwrap(), Some(b"z".to_vec()));
    }

    pub async fn list_by_prefix(b: &dyn Backend) {
        for k in ["/t/b", "/t/a", "/tx/c", "/u/d"] {
            b.put(k, k.as_bytes().to_vec(), None).await.unwrap();
        }
        let keys: Vec<String> = b
            .list("/t/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec!["/t/a", "/t/b"]);
        assert_eq!(b.list("/none/").await.unwrap(), vec![]);
    }

    pub async fn ttl_expiry(b: &dyn Backend) {
        b.put("/e/short", b"v".to_vec(), Some(Duration::from_millis(200)))
            .await
            .unwrap();
        b.put("/e/long", b"v".to_vec(), Some(Duration::from_secs(600)))
            .await
            .unwrap();
        assert!(b.get("/e/short").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(b.get("/e/short").await.unwrap(), None);
        let keys: Vec<String> = b
            .list("/e/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec!["/e/long"]);
        // An expired key counts as absent for compare-and-swap too.
        assert!(
            b.compare_and_swap("/e/short", None, b"w".to_vec(), None)
                .await
                .unwrap()
        );
    }

    pub async fn large_values(b: &dyn Backend) {
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        b.put("/big", big.clone(), None).await.unwrap();
        assert_eq!(b.get("/big").await.unwrap(), Some(big));
    }
}
