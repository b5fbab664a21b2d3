//! The embedded backend: one redb file in the proxy's data dir.
//!
//! Each value is stored behind a 9-byte header: a tag and a number. Tag 0: no expiry; tag 1:
//! expires at the number (Unix milliseconds); tag 2: lives as long as the lease with that id,
//! whose expiry is in the `leases` table. Expired keys are invisible at once; a sweeper deletes
//! them and tells watchers.
//!
//! A refresh ([`Backend::refresh`]: a node's presence, every 30 s per tunnel) is committed
//! without waiting for the disk: a crash loses at most the last second of them, and the value
//! before each stays. The sweeper makes them durable within a second, looks through the keys
//! only once the earliest expiry it knows of has passed, and writes only when something expired:
//! an idle fleet costs one disk flush a second, not one per refresh and a look at every key.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use burrow_daemon::unix_now_ms;
use redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, Table, TableDefinition,
};
use tokio::sync::{broadcast, mpsc};

use super::{Backend, BackendError, Event, LeaseId, Snapshot};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// lease id -> (TTL ms, expires ms), 16 bytes big endian.
const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
const SWEEP_EVERY: Duration = Duration::from_secs(1);
const EVENT_BUFFER: usize = 4096;

const TAG_NONE: u8 = 0;
const TAG_EXPIRES: u8 = 1;
const TAG_LEASE: u8 = 2;

pub struct RedbBackend {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    events: broadcast::Sender<Event>,
    /// A commit since the sweeper's last flush was not durable (a refresh).
    unflushed: AtomicBool,
    /// No key or lease expires before this (Unix ms): the sweeper's last look found this
    /// earliest, and every expiry written since lowers it ([`Inner::may_expire_at`]).
    next_expiry: AtomicU64,
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
        txn.open_table(KV).map_err(storage)?;
        txn.open_table(LEASES).map_err(storage)?;
        txn.commit().map_err(storage)?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let inner = Arc::new(Inner {
            db,
            events,
            unflushed: AtomicBool::new(false),
            next_expiry: AtomicU64::new(0),
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(sweep_forever(Arc::downgrade(&inner)));
        }
        Ok(Self { inner })
    }

    /// A put committed with `durability`.
    async fn put_with(
        &self,
        durability: Durability,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), BackendError> {
        let key = key.to_string();
        self.blocking(move |inner| {
            let now = unix_now_ms();
            let record = encode_ttl(&value, ttl, now);
            inner.write_with(durability, |kv, _| {
                kv.insert(key.as_str(), record.as_slice())
                    .map_err(storage)?;
                Ok(((), vec![Event::Put { key, value }]))
            })?;
            if let Some(ttl) = ttl {
                inner.may_expire_at(now.saturating_add(ms(ttl)));
            }
            Ok(())
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| BackendError::Storage(format!("storage task failed: {e}")))?
    }
}

fn storage(e: impl std::fmt::Display) -> BackendError {
    BackendError::Storage(e.to_string())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn encode(value: &[u8], tag: u8, n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + value.len());
    out.push(tag);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(value);
    out
}

fn encode_ttl(value: &[u8], ttl: Option<Duration>, now: u64) -> Vec<u8> {
    match ttl {
        Some(t) => encode(value, TAG_EXPIRES, now.saturating_add(ms(t))),
        None => encode(value, TAG_NONE, 0),
    }
}

/// Anything that can look a lease's expiry up: a read-only or a writable table.
trait LeaseLookup {
    fn lease_expires(&self, id: u64) -> Result<Option<u64>, BackendError>;
}

impl LeaseLookup for ReadOnlyTable<u64, &[u8]> {
    fn lease_expires(&self, id: u64) -> Result<Option<u64>, BackendError> {
        Ok(self
            .get(id)
            .map_err(storage)?
            .and_then(|v| lease_expiry(v.value())))
    }
}

impl LeaseLookup for Table<'_, u64, &[u8]> {
    fn lease_expires(&self, id: u64) -> Result<Option<u64>, BackendError> {
        Ok(self
            .get(id)
            .map_err(storage)?
            .and_then(|v| lease_expiry(v.value())))
    }
}

fn lease_expiry(raw: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(raw.get(8..16)?.try_into().ok()?))
}

fn lease_record(ttl_ms: u64, expires: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&ttl_ms.to_be_bytes());
    out[8..].copy_from_slice(&expires.to_be_bytes());
    out
}

/// The live value in a stored record, or `None` if it expired (or is not one of ours).
fn decode<'a>(
    raw: &'a [u8],
    now: u64,
    leases: &impl LeaseLookup,
) -> Result<Option<&'a [u8]>, BackendError> {
    let Some((head, value)) = raw.split_at_checked(9) else {
        return Ok(None);
    };
    let n = u64::from_be_bytes(head[1..9].try_into().expect("8 bytes"));
    let live = match head[0] {
        TAG_NONE => true,
        TAG_EXPIRES => n > now,
        TAG_LEASE => leases.lease_expires(n)?.is_some_and(|e| e > now),
        _ => false,
    };
    Ok(live.then_some(value))
}

/// The number in a stored record's header if its tag is `tag`.
fn tagged(raw: &[u8], tag: u8) -> Option<u64> {
    (raw.first() == Some(&tag))
        .then(|| raw.get(1..9))
        .flatten()
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

/// When a record with a TTL expires (Unix ms); `None` for the others.
fn expires_at(raw: &[u8]) -> Option<u64> {
    tagged(raw, TAG_EXPIRES)
}

fn lease_of(raw: &[u8]) -> Option<u64> {
    tagged(raw, TAG_LEASE)
}

impl Inner {
    fn read_live(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let kv = txn.open_table(KV).map_err(storage)?;
        let leases = txn.open_table(LEASES).map_err(storage)?;
        let Some(raw) = kv.get(key).map_err(storage)? else {
            return Ok(None);
        };
        Ok(decode(raw.value(), unix_now_ms(), &leases)?.map(<[u8]>::to_vec))
    }

    /// One write transaction, durable; `f` returns its result and the events to publish after
    /// commit.
    fn write<T>(
        &self,
        f: impl FnOnce(
            &mut Table<&str, &[u8]>,
            &mut Table<u64, &[u8]>,
        ) -> Result<(T, Vec<Event>), BackendError>,
    ) -> Result<T, BackendError> {
        self.write_with(Durability::Immediate, f)
    }

    /// [`Self::write`] with a durability: [`Durability::None`] returns before the disk has it.
    fn write_with<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(
            &mut Table<&str, &[u8]>,
            &mut Table<u64, &[u8]>,
        ) -> Result<(T, Vec<Event>), BackendError>,
    ) -> Result<T, BackendError> {
        let mut txn = self.db.begin_write().map_err(storage)?;
        let durable = !matches!(durability, Durability::None);
        txn.set_durability(durability).map_err(storage)?;
        let (result, events) = {
            let mut kv = txn.open_table(KV).map_err(storage)?;
            let mut leases = txn.open_table(LEASES).map_err(storage)?;
            f(&mut kv, &mut leases)?
        };
        txn.commit().map_err(storage)?;
        if !durable {
            self.unflushed.store(true, Ordering::Relaxed);
        }
        for e in events {
            // No receiver is fine: nobody is watching.
            let _ = self.events.send(e);
        }
        Ok(result)
    }

    /// Tells the sweeper that something written (and committed) expires at `at`.
    fn may_expire_at(&self, at: u64) {
        self.next_expiry.fetch_min(at, Ordering::Relaxed);
    }

    /// Deletes expired keys and leases, telling watchers; makes refreshes durable. Looks first
    /// in a read transaction, and writes only if something expired or is not yet on disk.
    fn sweep(&self) -> Result<(), BackendError> {
        let now = unix_now_ms();
        if now < self.next_expiry.load(Ordering::Relaxed) {
            return self.flush();
        }
        // Before the look: an expiry committed after it begins lowers this again.
        self.next_expiry.store(u64::MAX, Ordering::Relaxed);
        let mut earliest = u64::MAX;
        let (expired_keys, expired_leases) = {
            let txn = self.db.begin_read().map_err(storage)?;
            let kv = txn.open_table(KV).map_err(storage)?;
            let leases = txn.open_table(LEASES).map_err(storage)?;
            let mut expired = Vec::new();
            for entry in kv.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                if decode(v.value(), now, &leases)?.is_none() {
                    expired.push(k.value().to_string());
                } else if let Some(at) = expires_at(v.value()) {
                    earliest = earliest.min(at);
                }
            }
            let mut leases_expired = false;
            for entry in leases.iter().map_err(storage)? {
                let (_, v) = entry.map_err(storage)?;
                match lease_expiry(v.value()) {
                    Some(at) if at > now => earliest = earliest.min(at),
                    _ => leases_expired = true,
                }
            }
            (expired, leases_expired)
        };
        self.may_expire_at(earliest);
        if expired_keys.is_empty() && !expired_leases {
            return self.flush();
        }
        self.write(|kv, leases| {
            let mut deleted = Vec::new();
            for key in expired_keys {
                // Written again since the look: it stays.
                let gone = match kv.get(key.as_str()).map_err(storage)? {
                    Some(v) => decode(v.value(), now, &*leases)?.is_none(),
                    None => false,
                };
                if gone {
                    kv.remove(key.as_str()).map_err(storage)?;
                    deleted.push(Event::Delete { key });
                }
            }
            leases
                .retain(|_, v| lease_expiry(v).is_some_and(|e| e > now))
                .map_err(storage)?;
            Ok(((), deleted))
        })
    }

    /// Makes the refreshes since the last flush durable: a durable commit makes every commit
    /// before it durable too.
    fn flush(&self) -> Result<(), BackendError> {
        if self.unflushed.swap(false, Ordering::Relaxed) {
            self.write(|_, _| Ok(((), Vec::new())))?;
        }
        Ok(())
    }
}

async fn sweep_forever(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let result = tokio::task::spawn_blocking(move || inner.sweep()).await;
        if let Ok(Err(e)) = result {
            tracing::warn!(error = %e, "sweeping expired state failed");
        }
    }
}

#[async_trait]
impl Backend for RedbBackend {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let key = key.to_string();
        self.blocking(move |inner| inner.read_live(&key)).await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), BackendError> {
        self.put_with(Durability::Immediate, key, value, ttl).await
    }

    async fn refresh(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), BackendError> {
        self.put_with(Durability::None, key, value, ttl).await
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
        self.blocking(move |inner| {
            let now = unix_now_ms();
            // redb has one writer at a time: read-compare-write in one write transaction is atomic.
            let swapped = inner.write(|kv, leases| {
                let current = match kv.get(key.as_str()).map_err(storage)? {
                    Some(raw) => decode(raw.value(), now, &*leases)?.map(<[u8]>::to_vec),
                    None => None,
                };
                if current != expected {
                    return Ok((false, vec![]));
                }
                kv.insert(key.as_str(), encode_ttl(&value, ttl, now).as_slice())
                    .map_err(storage)?;
                Ok((true, vec![Event::Put { key, value }]))
            })?;
            if let (true, Some(ttl)) = (swapped, ttl) {
                inner.may_expire_at(now.saturating_add(ms(ttl)));
            }
            Ok(swapped)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, BackendError> {
        let key = key.to_string();
        self.blocking(move |inner| {
            let now = unix_now_ms();
            inner.write(|kv, leases| {
                let existed = match kv.remove(key.as_str()).map_err(storage)? {
                    Some(raw) => decode(raw.value(), now, &*leases)?.is_some(),
                    None => false,
                };
                let events = if existed {
                    vec![Event::Delete { key }]
                } else {
                    vec![]
                };
                Ok((existed, events))
            })
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
        let prefix = prefix.to_string();
        self.blocking(move |inner| {
            let now = unix_now_ms();
            let txn = inner.db.begin_read().map_err(storage)?;
            let kv = txn.open_table(KV).map_err(storage)?;
            let leases = txn.open_table(LEASES).map_err(storage)?;
            let mut out = Vec::new();
            for entry in kv.range(prefix.as_str()..).map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                if let Some(value) = decode(v.value(), now, &leases)? {
                    out.push((key.to_string(), value.to_vec()));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, BackendError> {
        self.blocking(move |inner| {
            // Positive i64 ids, like etcd's.
            let id = (rand::random::<u64>() >> 1).max(1);
            let expires = unix_now_ms().saturating_add(ms(ttl));
            let record = lease_record(ms(ttl), expires);
            inner.write(|_, leases| {
                leases.insert(id, record.as_slice()).map_err(storage)?;
                Ok(((), vec![]))
            })?;
            inner.may_expire_at(expires);
            Ok(LeaseId(id as i64))
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), BackendError> {
        let id = lease.0 as u64;
        self.blocking(move |inner| {
            let now = unix_now_ms();
            inner.write(|_, leases| {
                let ttl_ms = match leases.get(id).map_err(storage)? {
                    Some(raw) if lease_expiry(raw.value()).is_some_and(|e| e > now) => {
                        u64::from_be_bytes(raw.value()[..8].try_into().expect("8 bytes"))
                    }
                    _ => return Err(BackendError::LeaseExpired),
                };
                leases
                    .insert(
                        id,
                        lease_record(ttl_ms, now.saturating_add(ttl_ms)).as_slice(),
                    )
                    .map_err(storage)?;
                Ok(((), vec![]))
            })
        })
        .await
    }

    async fn put_leased(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<(), BackendError> {
        let key = key.to_string();
        let id = lease.0 as u64;
        self.blocking(move |inner| {
            let now = unix_now_ms();
            inner.write(|kv, leases| {
                if leases.lease_expires(id)?.is_none_or(|e| e <= now) {
                    return Err(BackendError::LeaseExpired);
                }
                kv.insert(key.as_str(), encode(&value, TAG_LEASE, id).as_slice())
                    .map_err(storage)?;
                Ok(((), vec![Event::Put { key, value }]))
            })
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), BackendError> {
        let id = lease.0 as u64;
        self.blocking(move |inner| {
            inner.write(|kv, leases| {
                leases.remove(id).map_err(storage)?;
                let mut gone = Vec::new();
                for entry in kv.iter().map_err(storage)? {
                    let (k, v) = entry.map_err(storage)?;
                    if lease_of(v.value()) == Some(id) {
                        gone.push(k.value().to_string());
                    }
                }
                for k in &gone {
                    kv.remove(k.as_str()).map_err(storage)?;
                }
                Ok((
                    (),
                    gone.into_iter().map(|key| Event::Delete { key }).collect(),
                ))
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str) -> Result<Snapshot, BackendError> {
        // Subscribe first, then list: a change in between shows up twice, never not at all.
        let mut events = self.inner.events.subscribe();
        let items = self.list(prefix).await?;
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = tx.closed() => return,
                    e = events.recv() => e,
                };
                let forward = match event {
                    Ok(Event::Put { key, value }) if key.starts_with(&prefix) => {
                        Event::Put { key, value }
                    }
                    Ok(Event::Delete { key }) if key.starts_with(&prefix) => Event::Delete { key },
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => Event::Reset,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(forward).await.is_err() {
                    return;
                }
            }
        });
        Ok((items, rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn values_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let b = RedbBackend::open(&path).unwrap();
            b.put("/k", b"v".to_vec(), None).await.unwrap();
        }
        // A sweep in flight may hold the file for a moment after the drop.
        let b = reopen(&path).await;
        assert_eq!(b.get("/k").await.unwrap(), Some(b"v".to_vec()));
    }

    /// Reopens `path` once the sweeper of a dropped backend let go of it.
    async fn reopen(path: &Path) -> RedbBackend {
        for _ in 0..100 {
            match RedbBackend::open(path) {
                Ok(b) => return b,
                Err(BackendError::Locked { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("the file is released within 2s of the drop");
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let _b = RedbBackend::open(&path).unwrap();
        let err = RedbBackend::open(&path).err().unwrap();
        assert!(matches!(err, BackendError::Locked { .. }), "{err}");
    }

    #[test]
    fn records_that_are_not_ours_decode_as_absent() {
        struct NoLeases;
        impl LeaseLookup for NoLeases {
            fn lease_expires(&self, _: u64) -> Result<Option<u64>, BackendError> {
                Ok(None)
            }
        }
        assert_eq!(decode(b"abc", 0, &NoLeases).unwrap(), None);
        assert_eq!(decode(&encode(b"v", 9, 0), 0, &NoLeases).unwrap(), None);
        assert_eq!(
            decode(&encode(b"v", TAG_NONE, 0), u64::MAX, &NoLeases).unwrap(),
            Some(&b"v"[..])
        );
        assert_eq!(
            decode(
                &encode_ttl(b"v", Some(Duration::from_millis(10)), 5),
                15,
                &NoLeases
            )
            .unwrap(),
            None
        );
        assert_eq!(
            decode(&encode(b"v", TAG_LEASE, 7), 0, &NoLeases).unwrap(),
            None
        );
    }
}
