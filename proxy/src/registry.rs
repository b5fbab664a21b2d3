//! The proxy's registration in the backend, and its readiness.
//!
//! Each proxy writes a [`ProxyInfo`] under `/proxies/<id>` with a lease and renews it; a proxy
//! that dies vanishes when its lease runs out. Losing the backend makes the proxy report
//! not-ready (and keep serving what it can); when the backend returns, the proxy renews its
//! lease, or registers again under the same id if the lease ran out meanwhile.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tunnel_proto::api::ProxyInfo;

use crate::backend::{Backend, BackendError, LeaseId};

/// A dead proxy leaves the list within this time.
const LEASE_TTL: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Whether the proxy can reach its state backend.
#[derive(Default)]
pub struct Health {
    problem: Mutex<Option<String>>,
}

impl Health {
    /// `Ok` when ready, else why not.
    pub fn status(&self) -> Result<(), String> {
        match &*self.problem.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    fn ok(&self) {
        let mut p = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        if p.take().is_some() {
            tracing::info!("the state backend is reachable again; ready");
        }
    }

    fn failed(&self, error: &BackendError) {
        let mut p = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        if p.is_none() {
            tracing::warn!(%error, "cannot reach the state backend; reporting not ready");
        }
        *p = Some(error.to_string());
    }
}

fn key(id: &str) -> String {
    crate::state::proxy(id)
}

/// Keeps `info` registered until `shutdown`, then removes it.
pub async fn register(
    backend: Arc<dyn Backend>,
    info: ProxyInfo,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let value = serde_json::to_vec(&info).expect("proxy records serialize");
    let mut lease: Option<LeaseId> = None;
    loop {
        let result = match lease {
            Some(l) => backend.keep_alive(l).await,
            None => match backend.grant_lease(LEASE_TTL).await {
                Ok(l) => {
                    let put = backend.put_leased(&key(&info.id), value.clone(), l).await;
                    if put.is_ok() {
                        lease = Some(l);
                        tracing::debug!(proxy_id = %info.id, "registered in the state backend");
                    }
                    put
                }
                Err(e) => Err(e),
            },
        };
        let wait = match result {
            Ok(()) => {
                health.ok();
                RENEW_EVERY
            }
            Err(BackendError::LeaseExpired) => {
                // The backend forgot us (it was away longer than the TTL): register again now.
                lease = None;
                Duration::ZERO
            }
            Err(e) => {
                health.failed(&e);
                RETRY_EVERY
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if let Some(l) = lease {
        // Leave the list at once instead of after the TTL; best effort.
        let _ = tokio::time::timeout(Duration::from_secs(2), backend.revoke_lease(l)).await;
    }
}

/// The live proxies.
pub async fn list(backend: &dyn Backend) -> Result<Vec<ProxyInfo>, BackendError> {
    Ok(backend
        .list(crate::state::PROXIES)
        .await?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}
