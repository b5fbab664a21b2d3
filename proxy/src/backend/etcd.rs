//! The etcd backend: several proxies share one cluster through etcd.
//!
//! Keys live under a prefix (`/burrow` by default). TTLs are etcd leases (one per key written
//! with a TTL); compare-and-swap is a transaction on the key's value or its absence. Watches
//! resume from the last revision they saw after etcd comes back, and say [`Event::Reset`] if
//! etcd compacted that history meanwhile.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;
use tonic::Code;

use super::{Backend, BackendError, Event, LeaseId, Snapshot};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);
const EVENT_BUFFER: usize = 4096;

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Every key is stored under this prefix, so one etcd can hold several clusters.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// User authentication: the user and the password.
    pub user: Option<(String, tunnel_proto::secret::Secret)>,
}

#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    /// A client certificate and key, when etcd requires one.
    pub client: Option<(PathBuf, PathBuf)>,
}

pub struct EtcdBackend {
    client: Client,
    prefix: String,
}

fn classify(e: etcd_client::Error) -> BackendError {
    use etcd_client::Error as E;
    match &e {
        E::TransportError(_) | E::IoError(_) => BackendError::Unavailable(e.to_string()),
        E::GRpcStatus(status) => match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                BackendError::Unavailable(status.message().to_string())
            }
            Code::NotFound if status.message().contains("lease not found") => {
                BackendError::LeaseExpired
            }
            _ => BackendError::Storage(e.to_string()),
        },
        E::LeaseKeepAliveError(m) if m.contains("lease not found") => BackendError::LeaseExpired,
        _ => BackendError::Storage(e.to_string()),
    }
}

impl EtcdBackend {
    pub async fn connect(config: &EtcdConfig) -> Result<Self, BackendError> {
        if config.endpoints.is_empty() {
            return Err(BackendError::Storage("no etcd endpoint given".into()));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &config.tls {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| {
                    BackendError::Storage(format!("cannot read etcd TLS file {}: {e}", p.display()))
                })
            };
            let mut tls_options = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca_file)?));
            if let Some((cert, key)) = &tls.client {
                tls_options =
                    tls_options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls_options);
        }
        if let Some((user, password)) = &config.user {
            options = options.with_user(user.as_str(), password.expose());
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(classify)?;
        Ok(Self {
            client,
            prefix: config.prefix.trim_end_matches('/').to_string(),
        })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn strip(&self, full: &[u8]) -> Option<String> {
        let s = std::str::from_utf8(full).ok()?;
        s.strip_prefix(&self.prefix).map(str::to_string)
    }

    async fn lease_for(&self, ttl: Option<Duration>) -> Result<Option<i64>, BackendError> {
        match ttl {
            Some(t) => Ok(Some(self.grant_lease(t).await?.0)),
            None => Ok(None),
        }
    }
}

fn ttl_secs(ttl: Duration) -> i64 {
    // etcd counts in whole seconds; round up so a key never lives shorter than asked.
    i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
        .unwrap_or(i64::MAX)
        .max(1)
}

fn put_options(lease: Option<i64>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l))
}

#[async_trait]
impl Backend for EtcdBackend {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let resp = self
            .client
            .clone()
            .get(self.full(key), None)
            .await
            .map_err(classify)?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), BackendError> {
        let lease = self.lease_for(ttl).await?;
        self.client
            .clone()
            .put(self.full(key), value, put_options(lease))
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<bool, BackendError> {
        let full = self.full(key);
        let compare = match expected {
            None => Compare::create_revision(full.clone(), CompareOp::Equal, 0),
            Some(v) => Compare::value(full.clone(), CompareOp::Equal, v.to_vec()),
        };
        let lease = self.lease_for(ttl).await?;
        let txn =
            Txn::new()
                .when([compare])
                .and_then([TxnOp::put(full, value, put_options(lease))]);
        let resp = self.client.clone().txn(txn).await.map_err(classify);
        let swapped = resp.as_ref().is_ok_and(|r| r.succeeded());
        if !swapped && let Some(l) = lease {
            let _ = self.client.clone().lease_revoke(l).await;
        }
        resp.map(|_| swapped)
    }

    async fn delete(&self, key: &str) -> Result<bool, BackendError> {
        let resp = self
            .client
            .clone()
            .delete(self.full(key), None::<DeleteOptions>)
            .await
            .map_err(classify)?;
        Ok(resp.deleted() > 0)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
        let resp = self
            .client
            .clone()
            .get(self.full(prefix), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(classify)?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| Some((self.strip(kv.key())?, kv.value().to_vec())))
            .collect())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, BackendError> {
        let resp = self
            .client
            .clone()
            .lease_grant(ttl_secs(ttl), None)
            .await
            .map_err(classify)?;
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), BackendError> {
        let (mut keeper, mut stream) = self
            .client
            .clone()
            .lease_keep_alive(lease.0)
            .await
            .map_err(classify)?;
        keeper.keep_alive().await.map_err(classify)?;
        match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(()),
            Ok(Ok(Some(_))) => Err(BackendError::LeaseExpired),
            Ok(Ok(None)) => Err(BackendError::Unavailable(
                "lease keep-alive stream closed".into(),
            )),
            Ok(Err(e)) => Err(classify(e)),
            Err(_) => Err(BackendError::Unavailable(
                "no lease keep-alive answer".into(),
            )),
        }
    }

    async fn put_leased(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<(), BackendError> {
        self.client
            .clone()
            .put(self.full(key), value, put_options(Some(lease.0)))
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), BackendError> {
        match self
            .client
            .clone()
            .lease_revoke(lease.0)
            .await
            .map_err(classify)
        {
            Ok(_) | Err(BackendError::LeaseExpired) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str) -> Result<Snapshot, BackendError> {
        let full = self.full(prefix);
        let resp = self
            .client
            .clone()
            .get(full.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(classify)?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let items = resp
            .kvs()
            .iter()
            .filter_map(|kv| Some((self.strip(kv.key())?, kv.value().to_vec())))
            .collect();
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        tokio::spawn(watch_loop(
            self.client.clone(),
            full,
            self.prefix.clone(),
            revision + 1,
            tx,
        ));
        Ok((items, rx))
    }
}

/// Follows `key_prefix` from `next_revision` on, reconnecting (with capped backoff) whenever
/// the stream breaks, until the receiver is dropped.
async fn watch_loop(
    mut client: Client,
    key_prefix: String,
    strip: String,
    mut next_revision: i64,
    tx: mpsc::Sender<Event>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next_revision);
        let stream = tokio::select! {
            _ = tx.closed() => return,
            s = client.watch(key_prefix.clone(), Some(options)) => s,
        };
        if let Ok(mut stream) = stream {
            loop {
                let message = tokio::select! {
                    _ = tx.closed() => return,
                    m = stream.message() => m,
                };
                let Ok(Some(resp)) = message else { break };
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        // The history we needed is gone: the watcher must list again.
                        next_revision = resp.compact_revision();
                        if tx.send(Event::Reset).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
                delay = Duration::from_millis(100);
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    next_revision = next_revision.max(kv.mod_revision() + 1);
                    let Some(key) = std::str::from_utf8(kv.key())
                        .ok()
                        .and_then(|k| k.strip_prefix(strip.as_str()))
                    else {
                        continue;
                    };
                    let e = match event.event_type() {
                        EventType::Put => Event::Put {
                            key: key.to_string(),
                            value: kv.value().to_vec(),
                        },
                        EventType::Delete => Event::Delete {
                            key: key.to_string(),
                        },
                    };
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(WATCH_RETRY_MAX);
    }
}
