//! The proxy's Prometheus metrics, served with `/healthz` and `/readyz` on its diagnostics
//! listener (`--diag-listen`, [`burrow_daemon::diag`]).
//!
//! One [`Metrics`] per proxy, handed to the parts that count: the tunnel server (tunnels, nodes,
//! dials), the web port (joins, rate limits), the SSH jump host (sessions), and
//! [`MeteredBackend`], which wraps the state backend to time every operation. Labels come from
//! fixed lists (a transport, a result, an operation); never a token, a node or a user.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
pub use burrow_daemon::diag::OpenGauge;
use burrow_daemon::diag::{Diagnostics, Readiness};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::backend::{Backend, BackendError, LeaseId, Snapshot};
use crate::registry::Health;

type Label = [(&'static str, &'static str); 1];

/// Bucket bounds (seconds) for operations of a millisecond to seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

pub struct Metrics {
    registry: Registry,
    tunnels: Family<Label, Gauge>,
    nodes: Gauge,
    tunnel_connects: Family<Label, Counter>,
    tunnel_resumptions: Family<Label, Counter>,
    tunnel_disconnects: Family<Label, Counter>,
    tunnels_refused: Family<Label, Counter>,
    joins: Family<Label, Counter>,
    dials: Family<Label, Counter>,
    dial_duration: Histogram,
    ssh_sessions: Gauge,
    backend_errors: Family<Label, Counter>,
    backend_duration: Family<Label, Histogram>,
    rate_limited: Family<Label, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("burrow_proxy");
        let tunnels = Family::<Label, Gauge>::default();
        r.register("tunnels", "Tunnels held, by transport", tunnels.clone());
        let nodes = Gauge::default();
        r.register(
            "nodes",
            "Nodes holding at least one tunnel to this proxy",
            nodes.clone(),
        );
        let tunnel_connects = Family::<Label, Counter>::default();
        r.register(
            "tunnel_connects",
            "Tunnels admitted, by transport",
            tunnel_connects.clone(),
        );
        let tunnel_resumptions = Family::<Label, Counter>::default();
        r.register(
            "tunnel_resumptions",
            "Tunnels admitted on a resumed TLS session (a session ticket, no certificate signatures), by transport; QUIC's count the sessions handed to TLS for a resumption, admitted or not",
            tunnel_resumptions.clone(),
        );
        let tunnel_disconnects = Family::<Label, Counter>::default();
        r.register(
            "tunnel_disconnects",
            "Admitted tunnels that ended, by reason: closed (by either end or lost), shutdown, protocol_error, flood",
            tunnel_disconnects.clone(),
        );
        let tunnels_refused = Family::<Label, Counter>::default();
        r.register(
            "tunnels_refused",
            "Tunnels refused before admission, by reason: revoked, over_limit, shutting_down, bad_identity, bad_hello",
            tunnels_refused.clone(),
        );
        let joins = Family::<Label, Counter>::default();
        r.register(
            "joins",
            "Join requests, by result: ok, bad_token, bad_request, rate_limited, error",
            joins.clone(),
        );
        let dials = Family::<Label, Counter>::default();
        r.register(
            "dials",
            "Dials to nodes through their tunnels, by result: ok, unknown_node, offline, not_here, ambiguous, refused, failed",
            dials.clone(),
        );
        let dial_duration = Histogram::new(LATENCY_BUCKETS);
        r.register_with_unit(
            "dial_duration",
            "Time from a dial's start to the node's answer (successful dials)",
            Unit::Seconds,
            dial_duration.clone(),
        );
        let ssh_sessions = Gauge::default();
        r.register(
            "ssh_sessions",
            "Connections to nodes open through the SSH jump host",
            ssh_sessions.clone(),
        );
        let backend_errors = Family::<Label, Counter>::default();
        r.register(
            "backend_errors",
            "State backend operations that failed, by operation",
            backend_errors.clone(),
        );
        let backend_duration = Family::<Label, Histogram>::new_with_constructor(
            backend_histogram as fn() -> Histogram,
        );
        r.register_with_unit(
            "backend_duration",
            "State backend operations' latency, by operation",
            Unit::Seconds,
            backend_duration.clone(),
        );
        let rate_limited = Family::<Label, Counter>::default();
        r.register(
            "rate_limited",
            "Requests and connections turned away by a limit, by limit: join, web_connections, handshakes, ssh_startups",
            rate_limited.clone(),
        );
        r.register(
            "build",
            "The proxy's version",
            Info::new([("version", tunnel_proto::VERSION)]),
        );
        Self {
            registry: r,
            tunnels,
            nodes,
            tunnel_connects,
            tunnel_resumptions,
            tunnel_disconnects,
            tunnels_refused,
            joins,
            dials,
            dial_duration,
            ssh_sessions,
            backend_errors,
            backend_duration,
            rate_limited,
        }
    }

    /// A tunnel admitted (`transport` is "quic" or "tcp"); `nodes` is how many nodes now hold one.
    pub fn tunnel_up(&self, transport: &'static str, resumed: bool, nodes: usize) {
        self.tunnel_connects
            .get_or_create(&[("transport", transport)])
            .inc();
        if resumed {
            self.tunnel_resumptions
                .get_or_create(&[("transport", transport)])
                .inc();
        }
        self.tunnels
            .get_or_create(&[("transport", transport)])
            .inc();
        self.nodes.set(nodes as i64);
    }

    /// The counter of resumed QUIC sessions, which the proxy's session store keeps (quinn does
    /// not say whether a connection resumed).
    pub fn quic_resumptions(&self) -> Counter {
        self.tunnel_resumptions
            .get_or_create(&[("transport", "quic")])
            .clone()
    }

    /// An admitted tunnel ended.
    pub fn tunnel_down(&self, transport: &'static str, reason: &'static str, nodes: usize) {
        self.tunnel_disconnects
            .get_or_create(&[("reason", reason)])
            .inc();
        self.tunnels
            .get_or_create(&[("transport", transport)])
            .dec();
        self.nodes.set(nodes as i64);
    }

    pub fn tunnel_refused(&self, reason: &'static str) {
        self.tunnels_refused
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    pub fn join(&self, result: &'static str) {
        self.joins.get_or_create(&[("result", result)]).inc();
    }

    /// A dial ended with `result`; a successful one took `took`.
    pub fn dial(&self, result: &'static str, took: Option<Duration>) {
        self.dials.get_or_create(&[("result", result)]).inc();
        if let Some(took) = took {
            self.dial_duration.observe(took.as_secs_f64());
        }
    }

    /// An SSH connection to a node through the jump host, counted open until dropped.
    pub fn ssh_session(&self) -> OpenGauge {
        OpenGauge::enter(&self.ssh_sessions)
    }

    pub fn rate_limited(&self, limit: &'static str) {
        self.rate_limited.get_or_create(&[("limit", limit)]).inc();
    }

    fn backend_op(&self, op: &'static str, took: Duration, ok: bool) {
        self.backend_duration
            .get_or_create(&[("op", op)])
            .observe(took.as_secs_f64());
        if !ok {
            self.backend_errors.get_or_create(&[("op", op)]).inc();
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        burrow_daemon::diag::render(&self.registry)
    }
}

fn backend_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// What the proxy serves on `--diag-listen`: its metrics, and ready while its state backend
/// answers and its listeners are up (they are bound before the listener starts).
pub struct ProxyDiagnostics {
    pub proxy_id: String,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub backend: Arc<dyn Backend>,
}

/// How long `/readyz` waits for the backend.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Diagnostics for ProxyDiagnostics {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    fn readiness(&self) -> Pin<Box<dyn Future<Output = Readiness> + Send + '_>> {
        Box::pin(async move {
            // The registration's renewals say whether the backend answered lately; a read now
            // says whether it answers at this moment.
            let probe = tokio::time::timeout(
                READY_PROBE_TIMEOUT,
                self.backend.get(&crate::state::proxy(&self.proxy_id)),
            )
            .await;
            let problem = match (self.health.status(), probe) {
                (Err(why), _) => Some(why),
                (Ok(()), Ok(Ok(_))) => None,
                (Ok(()), Ok(Err(e))) => Some(format!("the state backend failed: {e}")),
                (Ok(()), Err(_)) => Some("the state backend does not answer".to_string()),
            };
            let ready = problem.is_none();
            let body = serde_json::json!({ "ready": ready, "problem": problem }).to_string();
            Readiness { ready, body }
        })
    }
}

/// A [`Backend`] that times every operation into [`Metrics`] and counts its failures.
pub struct MeteredBackend {
    inner: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
}

impl MeteredBackend {
    pub fn wrap(inner: Arc<dyn Backend>, metrics: Arc<Metrics>) -> Arc<dyn Backend> {
        Arc::new(Self { inner, metrics })
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let start = Instant::now();
        let result = call.await;
        self.metrics.backend_op(op, start.elapsed(), result.is_ok());
        result
    }
}

#[async_trait]
impl Backend for MeteredBackend {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        self.timed("get", self.inner.get(key)).await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), BackendError> {
        self.timed("put", self.inner.put(key, value, ttl)).await
    }

    async fn refresh(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), BackendError> {
        self.timed("refresh", self.inner.refresh(key, value, ttl))
            .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<bool, BackendError> {
        let call = self.inner.compare_and_swap(key, expected, value, ttl);
        self.timed("compare_and_swap", call).await
    }

    async fn delete(&self, key: &str) -> Result<bool, BackendError> {
        self.timed("delete", self.inner.delete(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, BackendError> {
        self.timed("list", self.inner.list(prefix)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, BackendError> {
        self.timed("grant_lease", self.inner.grant_lease(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), BackendError> {
        self.timed("keep_alive", self.inner.keep_alive(lease)).await
    }

    async fn put_leased(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> Result<(), BackendError> {
        self.timed("put_leased", self.inner.put_leased(key, value, lease))
            .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), BackendError> {
        self.timed("revoke_lease", self.inner.revoke_lease(lease))
            .await
    }

    async fn watch(&self, prefix: &str) -> Result<Snapshot, BackendError> {
        self.timed("watch", self.inner.watch(prefix)).await
    }
}
