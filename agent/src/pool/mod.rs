//! The agent pool: one live, authenticated tunnel to every proxy of the cluster.
//!
//! The agent knows one address, usually a round-robin load balancer. It dials it until it holds
//! a tunnel to every proxy in the latest proxy list; a tunnel that lands on a proxy it already
//! holds is closed at once, and a proxy that leaves the list is let go. Failed dials back off
//! exponentially with full jitter, so agents do not return all in the same second.
//!
//! Transport `auto` climbs down a ladder: QUIC, then TLS over TCP when UDP does not get through,
//! then the same TLS inside an HTTP/1.1 Upgrade on the web address when TLS over TCP does not
//! (a balancer that terminates TLS). While on a lower rung it keeps trying the ones above and
//! moves each tunnel up when a better transport reaches its proxy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use burrow_tunnel::nudge::{Nudges, parse_nudge_token};
use burrow_tunnel::{
    self as transport, Framed, Keepalive, Session, Transport, TunnelStream, Window,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnel_proto::api::Labels;
use tunnel_proto::wire::{AuditEvent, Message, ProxyEntry, Welcome};

use self::control::{AgentControl, End, Step};
use self::membership::{Advice, Decision, DialOutcome, Membership, Note};
pub use self::timing::Backoff;
use crate::renew::{Renewer, SharedTls};
use crate::telemetry::{Disconnect, Telemetry};

mod connect;
mod control;
mod dials;
mod membership;
mod pings;
mod timing;

use self::connect::{describe, dial};
use self::dials::serve_dials;
pub use self::dials::{DialInfo, DialService, SSH_PORT};
use self::pings::Pings;

const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// QUIC, falling back to TLS over TCP when UDP does not get through, and to the HTTP upgrade
    /// when TLS over TCP does not.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS 1.3 + yamux over TCP only.
    Tcp,
    /// TLS 1.3 + yamux inside an HTTP/1.1 Upgrade on the web address only: through a balancer
    /// that terminates TLS.
    Upgrade,
}

impl TransportMode {
    /// The transports this mode uses, best first.
    pub fn ladder(self) -> Vec<Transport> {
        match self {
            TransportMode::Auto => vec![Transport::Quic, Transport::Tcp, Transport::Upgrade],
            TransportMode::Quic => vec![Transport::Quic],
            TransportMode::Tcp => vec![Transport::Tcp],
            TransportMode::Upgrade => vec![Transport::Upgrade],
        }
    }
}

/// What a tunnel says about itself and its node.
pub struct PoolConfig {
    /// Where QUIC and TLS-over-TCP tunnels go (what `find` named, or the web address).
    pub addr: String,
    /// The web address, where upgraded tunnels go.
    pub web_addr: String,
    /// The transports to use, best first ([`TransportMode::ladder`]).
    pub ladder: Vec<Transport>,
    /// The node's TLS identity for new tunnels (a renewal replaces it).
    pub tls: SharedTls,
    pub host_id: String,
    pub node_name: String,
    pub labels: watch::Receiver<Labels>,
    /// The keep-alive of every tunnel; `None`: each transport's default
    /// ([`Keepalive::default_for`]).
    pub keepalive: Option<Keepalive>,
    /// The flow-control window of QUIC tunnels.
    pub window: Window,
    /// What answers dial streams to port 3022: the node's SSH server.
    pub dials: Arc<dyn DialService>,
    /// The pool publishes how many tunnels it holds here.
    pub held: watch::Sender<usize>,
    /// Metrics, readiness and the status file (the agent's; none for simulated agents).
    pub telemetry: Option<Arc<Telemetry>>,
    /// Renews the node's certificates over a tunnel before they expire (none for simulated
    /// agents).
    pub renewer: Option<Arc<Renewer>>,
    /// Sends the node's session recordings to proxies that take them (none for simulated
    /// agents).
    pub recordings: Option<Arc<crate::record::Uploader>>,
}

/// Why the pool stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A proxy refused this node for good: retrying cannot help.
    #[error(
        "this node was removed from the cluster and its identity is revoked ({reason}); to join again, delete its identity and start with a new token"
    )]
    Revoked { reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

enum PoolEvent {
    /// The tunnel boxed: it is most of the event's size.
    Dialed(DialOutcome, Option<Box<Dialed>>),
    Proxies(Vec<ProxyEntry>),
    Closed {
        proxy_id: String,
        tunnel: u64,
        why: Disconnect,
        reconnect_after: Option<Duration>,
        return_window: Option<Duration>,
    },
}

struct Dialed {
    session: Session,
    control: Framed<TunnelStream>,
    welcome: Welcome,
}

/// Runs the pool until `shutdown`, or until a proxy refuses the node for good.
pub async fn run(config: PoolConfig, shutdown: CancellationToken) -> Result<(), PoolError> {
    let config = Arc::new(config);
    // The restart nudges of QUIC tunnels' proxies, taken out by the endpoint's socket.
    let nudges = Arc::new(Nudges::default());
    let endpoint = match config.ladder.contains(&Transport::Quic) {
        true => Some(transport::quic_client_endpoint(nudges.clone())?),
        false => None,
    };
    let (events_tx, mut events) = mpsc::channel::<PoolEvent>(64);
    let mut pool = Membership::new(config.ladder.clone(), Instant::now());
    // The stop switch of each running tunnel, by tunnel id.
    let mut running: HashMap<u64, CancellationToken> = HashMap::new();
    let stop = |running: &mut HashMap<u64, CancellationToken>, tunnel: u64| {
        if let Some(stop) = running.remove(&tunnel) {
            stop.cancel();
        }
    };
    let result = loop {
        let now = Instant::now();
        if let Some(plan) = pool.poll_dial(now) {
            tokio::spawn(dial(
                config.clone(),
                endpoint.clone(),
                plan,
                events_tx.clone(),
            ));
        }
        let event = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep_until(pool.poll_timeout(now)) => continue,
            e = events.recv() => match e {
                Some(e) => e,
                None => break Ok(()),
            },
        };
        match event {
            PoolEvent::Dialed(outcome, dialed) => {
                let decision = pool.handle_dialed(Instant::now(), outcome);
                log_notes(&config, pool.take_notes());
                match (decision, dialed) {
                    (Decision::GiveUp { reason }, _) => break Err(PoolError::Revoked { reason }),
                    (Decision::Retry, _) => {}
                    (Decision::Duplicate, Some(mut d)) => {
                        tracing::debug!(proxy_id = %d.welcome.proxy_id, "the tunnel reached a proxy already held; closing it");
                        let _ = d.control.write(&Message::goodbye("duplicate tunnel")).await;
                        d.session.close("duplicate tunnel");
                    }
                    (Decision::Adopt { tunnel, replaces }, Some(d)) => {
                        if let Some(old) = replaces {
                            stop(&mut running, old);
                        }
                        let (proxies, held) = pool.counts();
                        tracing::info!(proxy_id = %d.welcome.proxy_id, transport = %d.session.transport(), proxies, held, "tunnel up");
                        if let Some(t) = &config.telemetry {
                            t.tunnel_up(&d.welcome.proxy_id, d.session.transport());
                        }
                        let token = shutdown.child_token();
                        running.insert(tunnel, token.clone());
                        tokio::spawn(run_tunnel(
                            config.clone(),
                            *d,
                            tunnel,
                            events_tx.clone(),
                            token,
                            nudges.clone(),
                        ));
                    }
                    (_, None) => {}
                }
            }
            PoolEvent::Proxies(list) => {
                for (proxy_id, tunnel) in pool.handle_proxies(list) {
                    tracing::info!(%proxy_id, "the proxy left the cluster; letting its tunnel go");
                    stop(&mut running, tunnel);
                }
            }
            PoolEvent::Closed {
                proxy_id,
                tunnel,
                why,
                reconnect_after,
                return_window,
            } => {
                running.remove(&tunnel);
                let now = Instant::now();
                let advice = Advice {
                    reconnect_after,
                    return_window,
                };
                let held = pool.handle_closed(now, &proxy_id, tunnel, advice);
                if held {
                    tracing::info!(%proxy_id, held = pool.counts().1, "tunnel down");
                }
                if let Some(t) = &config.telemetry {
                    let delay = (held && !shutdown.is_cancelled()).then(|| pool.dial_wait(now));
                    t.tunnel_down(&proxy_id, why, held, delay);
                }
            }
        }
        let held = pool.counts().1;
        config
            .held
            .send_if_modified(|h| std::mem::replace(h, held) != held);
    };
    config.held.send_replace(0);
    pool.release_all();
    for (_, stop) in running.drain() {
        stop.cancel();
    }
    // Give tunnels a moment to say goodbye.
    tokio::time::sleep(Duration::from_millis(100)).await;
    result
}

fn log_notes(config: &PoolConfig, notes: Vec<Note>) {
    let addr = &config.addr;
    for note in notes {
        match note {
            Note::Blocked {
                blocked: Transport::Quic,
                using,
                reason,
            } => {
                tracing::warn!(%addr, %reason, "QUIC does not get through (UDP blocked?); using {} and trying QUIC again in the background", describe(using))
            }
            Note::Blocked {
                blocked,
                using,
                reason,
            } => {
                let web_addr = &config.web_addr;
                tracing::warn!(%addr, %web_addr, %reason, "{} does not get through (a balancer that terminates TLS?); using {} and trying it again in the background", describe(blocked), describe(using))
            }
            Note::Back(using) => {
                tracing::info!(
                    "{} gets through again; moving tunnels to it",
                    describe(using)
                )
            }
            Note::StillBlocked { reason, retry_in } => {
                tracing::debug!(%reason, ?retry_in, "a better transport still does not get through")
            }
            Note::DialFailed { reason, retry_in } => {
                tracing::warn!(%addr, %reason, ?retry_in, "cannot open a tunnel");
                if let Some(t) = &config.telemetry {
                    t.dial_failed(&reason, retry_in);
                }
            }
        }
    }
}

/// Owns one tunnel: drives its control session (heartbeats when labels change, proxy lists,
/// audit events going up; keep-alives are the transport's) and serves its dial streams.
async fn run_tunnel(
    config: Arc<PoolConfig>,
    dialed: Dialed,
    tunnel: u64,
    events: mpsc::Sender<PoolEvent>,
    stop: CancellationToken,
    nudges: Arc<Nudges>,
) {
    let Dialed {
        session,
        mut control,
        welcome,
    } = dialed;
    // A QUIC tunnel's proxy says so at once when it starts again after a crash.
    let nudge = welcome
        .nudge_token
        .as_deref()
        .and_then(parse_nudge_token)
        .filter(|_| session.transport() == Transport::Quic);
    if let Some(token) = nudge {
        nudges.arm(token, stop.clone());
    }
    let mut machine = AgentControl::new(&config.node_name, &welcome);
    // Only a proxy that says it renews certificates is asked to.
    let renewer = config.renewer.clone().filter(|_| welcome.renewal);
    let proxy_id = welcome.proxy_id;
    // Recordings go only to a proxy that says it takes them.
    let recordings = config
        .recordings
        .clone()
        .filter(|_| welcome.recording.is_some());
    if let Some(r) = &recordings {
        r.tunnel_up(&proxy_id, welcome.recording);
    }
    let mut labels = config.labels.clone();
    let mut pings = Pings::new(&config, &session);
    let (audit_tx, mut audit_rx) = mpsc::channel::<AuditEvent>(256);
    let dials = tokio::spawn(serve_dials(
        session.clone(),
        config.dials.clone(),
        (proxy_id.clone(), audit_tx),
        config.telemetry.clone(),
    ));
    // Why the tunnel ended when the proxy did not say (it says so in `End`).
    let mut lost = Disconnect::Lost;
    let end = loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => {
                let _ = control.write(&Message::goodbye("the agent lets this tunnel go")).await;
                lost = Disconnect::Released;
                break None;
            }
            reason = session.closed() => {
                tracing::warn!(%proxy_id, %reason, "the tunnel closed");
                break None;
            }
            _ = pings.due() => {
                // Bytes on any stream count: a pong may wait behind a session's data.
                let now = Instant::now();
                if let Some(at) = session.idle_for().and_then(|idle| now.checked_sub(idle)) {
                    pings.heard(at);
                }
                match pings.poll(now) {
                    Err(silent) => {
                        tracing::warn!(%proxy_id, "no answer from the proxy for {}s; closing the tunnel", silent.as_secs());
                        break None;
                    }
                    Ok(Some(ping)) if control.write(&ping).await.is_err() => break None,
                    Ok(_) => {}
                }
                continue;
            }
            Some(event) = audit_rx.recv() => {
                if control.write(&Message::Audit(event)).await.is_err() {
                    break None;
                }
                continue;
            }
            _ = upload_ready(recordings.as_deref()) => {
                let Some(r) = &recordings else { continue };
                if let Some(chunk) = r.next_chunk(&proxy_id, burrow_daemon::unix_now())
                    && control.write(&chunk).await.is_err()
                {
                    break None;
                }
                continue;
            }
            _ = renewal_due(renewer.as_deref()) => {
                let Some(renewer) = &renewer else { continue };
                if let Some(request) = renewer.take(burrow_daemon::unix_now())
                    && control.write(&request).await.is_err()
                {
                    break None;
                }
                continue;
            }
            changed = labels.changed() => {
                if changed.is_err() {
                    break None;
                }
                let current = labels.borrow_and_update().clone();
                if control.write(&machine.labels_changed(current)).await.is_err() {
                    break None;
                }
                continue;
            }
            msg = control.read() => msg,
        };
        if let Ok(Some(_)) = &msg {
            pings.heard(Instant::now());
        }
        match msg {
            Ok(Some(msg)) => match machine.handle_message(msg) {
                Step::Nothing => {}
                Step::Proxies(list) => {
                    let _ = events.send(PoolEvent::Proxies(list)).await;
                }
                Step::Renewed {
                    certificates,
                    error,
                } => {
                    if let Some(renewer) = &renewer {
                        renewer.finish(burrow_daemon::unix_now(), certificates, error);
                    }
                }
                Step::RecordingAck {
                    session_id,
                    size,
                    stored,
                    error,
                } => {
                    if let Some(r) = &recordings {
                        r.answer(&proxy_id, &session_id, size, stored, error);
                    }
                }
                Step::Trust(trust) => {
                    if let Some(renewer) = &config.renewer {
                        renewer.trust(burrow_daemon::unix_now(), trust);
                    }
                }
                Step::End(end) => break Some(end),
            },
            Ok(None) => {
                let reason = session.close_reason();
                let reason = reason
                    .as_deref()
                    .unwrap_or("the proxy ended the control stream");
                tracing::warn!(%proxy_id, %reason, "the tunnel closed");
                break None;
            }
            Err(e) => {
                // The tunnel's own reason ("reset by peer", "timed out") says more than the
                // stream's "connection lost".
                match session.close_reason() {
                    Some(reason) => tracing::warn!(%proxy_id, %reason, "the tunnel closed"),
                    None => tracing::warn!(%proxy_id, error = %e, "the control stream failed"),
                }
                break None;
            }
        }
    };
    match &end {
        Some(End::Reconnect { reason, .. }) => {
            tracing::info!(%proxy_id, %reason, "the proxy asks to reconnect later");
        }
        Some(End::Goodbye { reason }) => {
            tracing::warn!(%proxy_id, %reason, "the proxy closed the tunnel");
        }
        Some(End::Unexpected { kind }) => {
            tracing::warn!(%proxy_id, message = kind, "unexpected message on the control stream; closing the tunnel");
        }
        None => {}
    }
    if let Some(token) = nudge {
        nudges.disarm(&token);
    }
    if let Some(r) = &recordings {
        r.tunnel_down(&proxy_id);
    }
    session.close("tunnel closed");
    dials.abort();
    let _ = events
        .send(PoolEvent::Closed {
            proxy_id,
            tunnel,
            why: end.as_ref().map_or(lost, End::disconnect),
            reconnect_after: end.as_ref().and_then(End::reconnect_after),
            return_window: machine.return_window(),
        })
        .await;
}

/// Resolves when `recordings` may have a chunk to send; never without them.
async fn upload_ready(recordings: Option<&crate::record::Uploader>) {
    match recordings {
        Some(r) => r.ready().await,
        None => std::future::pending().await,
    }
}

/// Resolves when `renewer` may have a renewal request to send; never without one.
async fn renewal_due(renewer: Option<&Renewer>) {
    match renewer {
        // Looked at again every hour at least: the wall clock may jump (a device without a
        // real-time clock sets it after boot).
        Some(r) => {
            let wait = r.wait(burrow_daemon::unix_now());
            tokio::time::sleep(wait.min(Duration::from_secs(3600))).await
        }
        None => std::future::pending().await,
    }
}
