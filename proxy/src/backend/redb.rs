//! The embedded backend: one redb file in the proxy's data dir.
//!
//! Each value is stored as 8 bytes of expiry (Unix milliseconds, big endian, 0 for never)
//! followed by the value. Expired keys are invisible at once and purged on later writes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Backend, BackendError};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const PURGE_EVERY_MS: u64 = 60_000;

pub struct RedbBackend {
    db: Arc<Database>,
    last_purge_ms: AtomicU64,
}

impl RedbBackend {
    pub fn open(path: &Path) -> Result<Self, BackendError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => BackendError::Locked {
                path: path.display().to_string(),
            },
            other => BackendError::Storage(format!("cannot open {}: {other}", path.display())),
        })?;
        // The file holds the CA keys: owner only, whatever the umask.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| {
                BackendError::Storage(format!("cannot restrict {}: {e}", path.display()))
            })?;
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(TABLE).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(Self {
            db: Arc::new(db),
            last_purge_ms: AtomicU64::new(0),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| BackendError::Storage(format!("storage task failed: {e}")))?
    }

    fn purge_due(&self, now: u64) -> bool {
        let last = self.last_purge_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= PURGE_EVERY_MS
            && self
                .last_purge_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

fn storage(e: impl std::fmt::Display) -> BackendError {
    BackendError::Storage(e.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn encode(value: &[u8], ttl: Option<Duration>, now: u64) -> Vec<u8> {
    let expires = ttl.map_or(0, |t| now.saturating_add(t.as_millis() as u64).max(1));
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&expires.to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// The live value in a stored record, or `None` if it expired (or is too short to be ours).
fn decode(raw: &[u8], now: u64) -> Option<&[u8]> {
    let (head, value) = raw.split_at_checked(8)?;
    let expires = u64::from_be_bytes(head.try_into().ok()?);
    (expires == 0 || expires > now).then_some(value)
}

fn purge_expired(table: &mut redb::Table<&str, &[u8]>, now: u64) -> Result<(), BackendError> {
    table
        .retain(|_, raw| decode(raw, now).is_some())
        .map_err(storage)
}

#[async_trait]
impl Backend for RedbBackend {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let key = key.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(TABLE).map_err(storage)?;
            let found = table.get(key.as_str()).map_err(storage)?;
            Ok(found.and_then(|raw| decode(raw.value(), now_ms()).map(<[u8]>::to_vec)))
        })
        .await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), BackendError> {
        let key = key.to_string();
        let now = now_ms();
        let purge = self.purge_due(now);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(storage)?;
            {
                let mut table = txn.open_table(TABLE).map_err(storage)?;
                if purge {
                    purge_expired(&mut table, now)?;
                }
                table
                    .insert(key.as_str(), encode(&value, ttl, now).as_slice())
                    .map_err(storage)?;
            }
            txn.commit().map_err(storage)
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<bool, BackendError> {
        let key = key.to_string();
        let expected = expected.map(<[u8]>::to_vec);
        let now = now_ms();
        self.blocking(move |db| {
            // redb has one writer at a time, so read-compare-write inside one write
            // transaction is atomic.
            let txn = db.begin_write().map_err(storage)?;
            let swapped = {
                let mut table = txn.open_table(TABLE).map_err(storage)?;
                let current = table
                    .get(key.as_str())
                    .map_err(storage)?
                    .and_then(|raw| decode(raw.value(), now).map(<[u8]>::to_vec));
                if current == expected {
                    table
                        .insert(key.as_str(), encode(&value, ttl, now).as_slice())
                        .map_err(storage)?;
                    true
                } else {
                    false
                }
            };
            if swapped {
                txn.commit().map_err(storage)?;
            } else {
                txn.abort().map_err(storage)?;
            }
            Ok(swapped)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, BackendError> {
        let key = key.to_string();
        let now = now_ms();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(storage)?;
            let existed = {
                let mut table = txn.open_table(TABLE).map_err(storage)?;
                let removed = table.remove(key.as_str()).map_err(storage)?;
                removed.is_some_and(|raw| decode(raw.value(), now).is_some())
            };
            txn.commit().map_err(storage)?;
            Ok(existed)
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
        let prefix = prefix.to_string();
        self.blocking(move |db| {
            let now = now_ms();
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(TABLE).map_err(storage)?;
            let mut out = Vec::new();
            for entry in table.range(prefix.as_str()..).map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                if let Some(value) = decode(v.value(), now) {
                    out.push((key.to_string(), value.to_vec()));
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::conformance;

    fn open() -> (tempfile::TempDir, RedbBackend) {
        let dir = tempfile::tempdir().unwrap();
        let b = RedbBackend::open(&dir.path().join("state.redb")).unwrap();
        (dir, b)
    }

    #[tokio::test]
    async fn conformance_suite() {
        let (_dir, b) = open();
        conformance::get_put_delete(&b).await;
        conformance::compare_and_swap(&b).await;
        conformance::list_by_prefix(&b).await;
        conformance::ttl_expiry(&b).await;
        conformance::large_values(&b).await;
    }

    #[tokio::test]
    async fn values_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let b = RedbBackend::open(&path).unwrap();
            b.put("/k", b"v".to_vec(), None).await.unwrap();
        }
        let b = RedbBackend::open(&path).unwrap();
        assert_eq!(b.get("/k").await.unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let (dir, _b) = open();
        let err = RedbBackend::open(&dir.path().join("state.redb"))
            .err()
            .unwrap();
        assert!(matches!(err, BackendError::Locked { .. }), "{err}");
    }

    #[test]
    fn short_records_decode_as_absent() {
        assert_eq!(decode(b"abc", 0), None);
        assert_eq!(decode(&encode(b"v", None, 5), u64::MAX), Some(&b"v"[..]));
        assert_eq!(
            decode(&encode(b"v", Some(Duration::from_millis(10)), 5), 15),
            None
        );
    }
}
