//! What the agent says about itself: Prometheus metrics and readiness on its diagnostics
//! listener (`--diag-listen`), and a status file in its data dir that `burrow-agent status` reads
//! (so that status works without the listener, and says "not running" when the agent is not).
//!
//! The pool reports tunnels up and down and failed dials here; the SSH server reports the dial
//! streams it serves. Labels are bounded: a proxy's id (one per proxy of the cluster), a transport,
//! a reason from a fixed list. No token, key or user name ever becomes a label.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use burrow_daemon::diag::{Diagnostics, OpenGauge, Readiness};
use burrow_tunnel::Transport;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The agent's state, as `burrow-agent status` shows it; written to [`STATUS_FILE`].
pub const STATUS_FILE: &str = "status.json";

/// Why a tunnel ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The connection failed or timed out, or the proxy restarted (a reset or a nudge).
    Lost,
    /// The proxy asked the agent to come back later (it is stopping or over its limits).
    ReconnectAdvised,
    /// The proxy closed the tunnel with a goodbye.
    ClosedByProxy,
    /// The proxy broke the control protocol.
    ProtocolError,
    /// The agent let it go: a QUIC tunnel replaced it, its proxy left the cluster, or shutdown.
    Released,
}

impl Disconnect {
    fn label(self) -> &'static str {
        match self {
            Disconnect::Lost => "lost",
            Disconnect::ReconnectAdvised => "reconnect_advised",
            Disconnect::ClosedByProxy => "closed_by_proxy",
            Disconnect::ProtocolError => "protocol_error",
            Disconnect::Released => "released",
        }
    }
}

type Label = [(&'static str, &'static str); 1];
type TunnelLabel = [(&'static str, String); 2];

/// One tunnel as the status file and `/readyz` name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub proxy: String,
    pub transport: String,
    /// Unix seconds.
    pub since: u64,
}

/// The last thing that went wrong, for `burrow-agent status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    /// Unix seconds.
    pub at: u64,
    pub message: String,
}

/// What the agent writes to its status file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    /// Unix seconds.
    pub started: u64,
    /// Unix seconds.
    pub updated: u64,
    /// The address the agent dials (its proxy or balancer).
    pub proxy_addr: String,
    /// Where `/metrics` and `/readyz` are served, if anywhere.
    pub diag_addr: Option<String>,
    pub tunnels: Vec<TunnelStatus>,
    pub last_error: Option<LastError>,
    /// Unix seconds: when the agent stopped (cleanly). A crashed agent never says.
    pub stopped: Option<u64>,
}

pub struct Telemetry {
    registry: Registry,
    tunnels: Family<TunnelLabel, Gauge>,
    connects: Family<Label, Counter>,
    disconnects: Family<Label, Counter>,
    dial_failures: Counter,
    reconnect_delay: Histogram,
    dial_streams: Counter,
    ssh_connections: Gauge,
    status: Mutex<Status>,
    changed: Notify,
}

impl Telemetry {
    pub fn new(proxy_addr: &str) -> Self {
        let mut registry = Registry::with_prefix("burrow_agent");
        let tunnels = Family::<TunnelLabel, Gauge>::default();
        registry.register(
            "tunnels",
            "Tunnels held, by proxy and transport (1 while held)",
            tunnels.clone(),
        );
        let connects = Family::<Label, Counter>::default();
        registry.register(
            "tunnel_connects",
            "Tunnels opened, by transport",
            connects.clone(),
        );
        let disconnects = Family::<Label, Counter>::default();
        registry.register(
            "tunnel_disconnects",
            "Tunnels ended, by reason: lost, reconnect_advised, closed_by_proxy, protocol_error, released",
            disconnects.clone(),
        );
        let dial_failures = Counter::default();
        registry.register(
            "tunnel_dial_failures",
            "Attempts to open a tunnel that failed (no answer, refused, handshake failed)",
            dial_failures.clone(),
        );
        let reconnect_delay = Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]);
        registry.register_with_unit(
            "reconnect_delay",
            "The wait before the next attempt to open a tunnel, after a failed attempt or a lost tunnel",
            Unit::Seconds,
            reconnect_delay.clone(),
        );
        let dial_streams = Counter::default();
        registry.register(
            "dial_streams",
            "Streams the proxies opened to this node's SSH server (one per user connection)",
            dial_streams.clone(),
        );
        let ssh_connections = Gauge::default();
        registry.register(
            "ssh_connections",
            "SSH connections open through the tunnels",
            ssh_connections.clone(),
        );
        registry.register(
            "build",
            "The agent's version",
            Info::new([("version", tunnel_proto::VERSION)]),
        );
        Self {
            registry,
            tunnels,
            connects,
            disconnects,
            dial_failures,
            reconnect_delay,
            dial_streams,
            ssh_connections,
            status: Mutex::new(Status {
                pid: std::process::id(),
                started: burrow_daemon::unix_now(),
                proxy_addr: proxy_addr.to_string(),
                ..Status::default()
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the status (and the tunnel gauges with it), then wakes the status file's writer.
    fn update(&self, change: impl FnOnce(&mut Status)) {
        let mut status = self.lock();
        let before = status.tunnels.clone();
        change(&mut status);
        for gone in before.iter().filter(|t| !status.tunnels.contains(t)) {
            self.tunnels.remove(&tunnel_label(gone));
        }
        for held in &status.tunnels {
            self.tunnels.get_or_create(&tunnel_label(held)).set(1);
        }
        status.updated = burrow_daemon::unix_now();
        drop(status);
        self.changed.notify_one();
    }

    /// Where the diagnostics listener is, for the status file.
    pub fn set_diag_addr(&self, addr: String) {
        self.update(|s| s.diag_addr = Some(addr));
    }

    pub fn tunnel_up(&self, proxy: &str, transport: Transport) {
        self.connects
            .get_or_create(&[("transport", transport.as_str())])
            .inc();
        let transport = transport.to_string();
        self.update(|s| {
            // A QUIC tunnel replacing a TCP one to the same proxy takes its place.
            s.tunnels.retain(|t| t.proxy != proxy);
            s.tunnels.push(TunnelStatus {
                proxy: proxy.to_string(),
                transport,
                since: burrow_daemon::unix_now(),
            });
            s.tunnels.sort_by(|a, b| a.proxy.cmp(&b.proxy));
        });
    }

    /// A tunnel ended. `held` says whether it was the one held for its proxy (a replaced or
    /// released one was forgotten already); `delay` is the wait before the next attempt.
    pub fn tunnel_down(&self, proxy: &str, why: Disconnect, held: bool, delay: Option<Duration>) {
        self.disconnects
            .get_or_create(&[("reason", why.label())])
            .inc();
        if let Some(delay) = delay {
            self.reconnect_delay.observe(delay.as_secs_f64());
        }
        if held {
            self.update(|s| s.tunnels.retain(|t| t.proxy != proxy));
        }
    }

    /// An attempt to open a tunnel failed; the next comes after `retry_in`.
    pub fn dial_failed(&self, reason: &str, retry_in: Duration) {
        self.dial_failures.inc();
        self.reconnect_delay.observe(retry_in.as_secs_f64());
        let message = format!("cannot open a tunnel: {reason}");
        // The same failure again (an agent offline for days) does not rewrite the file.
        if self
            .lock()
            .last_error
            .as_ref()
            .is_some_and(|e| e.message == message)
        {
            return;
        }
        self.update(|s| {
            s.last_error = Some(LastError {
                at: burrow_daemon::unix_now(),
                message,
            })
        });
    }

    /// A dial stream reached the SSH server: counted, and open until the guard is dropped.
    pub fn ssh_connection(&self) -> OpenGauge {
        self.dial_streams.inc();
        OpenGauge::enter(&self.ssh_connections)
    }

    pub fn status(&self) -> Status {
        self.lock().clone()
    }

    /// Writes the status file now, so that `burrow-agent status` has one as soon as the agent
    /// says it is ready.
    pub fn write_status_now(&self, data_dir: &Path) {
        write_status(&data_dir.join(STATUS_FILE), &self.status());
    }

    /// Writes the status file whenever the status changes (at most once a second) until
    /// `shutdown`, then a last time, marked stopped.
    pub async fn write_status_file(
        self: std::sync::Arc<Self>,
        data_dir: PathBuf,
        shutdown: CancellationToken,
    ) {
        let path = data_dir.join(STATUS_FILE);
        loop {
            let stopping = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = self.changed.notified() => false,
            };
            let mut status = self.status();
            if stopping {
                status.stopped = Some(burrow_daemon::unix_now());
                status.tunnels.clear();
            }
            write_status(&path, &status);
            if stopping {
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

fn write_status(path: &Path, status: &Status) {
    let Ok(json) = serde_json::to_vec_pretty(status) else {
        return;
    };
    if let Err(e) = burrow_daemon::fsutil::write_private_atomic(path, &json) {
        tracing::debug!(path = %path.display(), error = %e, "cannot write the status file");
    }
}

/// Reads the status file an agent wrote in `data_dir`; `None` if there is none.
pub fn read_status(data_dir: &Path) -> Result<Option<Status>, String> {
    let path = data_dir.join(STATUS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is damaged: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

impl Diagnostics for Telemetry {
    fn metrics(&self) -> String {
        burrow_daemon::diag::render(&self.registry)
    }

    fn readiness(&self) -> Pin<Box<dyn Future<Output = Readiness> + Send + '_>> {
        let tunnels = self.lock().tunnels.clone();
        Box::pin(async move {
            let ready = !tunnels.is_empty();
            let body = serde_json::json!({ "ready": ready, "tunnels": tunnels }).to_string();
            Readiness { ready, body }
        })
    }
}

fn tunnel_label(t: &TunnelStatus) -> TunnelLabel {
    [
        ("proxy", t.proxy.clone()),
        ("transport", t.transport.clone()),
    ]
}
