//! The agent pool: one live, authenticated tunnel to every proxy of the cluster.
//!
//! The agent knows one address, usually a round-robin load balancer. It dials it until it holds
//! a tunnel to every proxy in the latest proxy list; a tunnel that lands on a proxy it already
//! holds is closed at once, and a proxy that leaves the list is let go. Failed dials back off
//! exponentially with full jitter, so agents do not return all in the same second.
//!
//! Transport `auto` tries QUIC first and falls back to TCP when UDP does not get through; while
//! on TCP it keeps trying QUIC and moves each tunnel back when QUIC reaches its proxy.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

pub use self::timing::{Backoff, Due, Liveness};
use burrow_tunnel::{self as transport, Framed, Session, Transport, TunnelStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tunnel_proto::api::Labels;

mod timing;

use tunnel_proto::wire::{
    DialRequest, Heartbeat, Hello, Message, PROTOCOL_VERSION, ProxyEntry, Refusal, Welcome,
};

const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `auto` gives QUIC before falling back to TCP.
const QUIC_TRY: Duration = Duration::from_secs(3);
/// How often `auto` tries QUIC again while it runs on TCP.
const QUIC_RETRY_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportMode {
    /// QUIC, falling back to TCP when UDP does not get through.
    #[default]
    Auto,
    Quic,
    Tcp,
}

/// What a tunnel says about itself and its node.
pub struct PoolConfig {
    pub addr: String,
    pub mode: TransportMode,
    pub tls: Arc<rustls::ClientConfig>,
    pub host_id: String,
    pub node_name: String,
    pub labels: watch::Receiver<Labels>,
    /// The node's SSH server, for dial streams to port 3022.
    pub ssh: Arc<crate::ssh::SshContext>,
}

/// The node port dial streams reach the SSH server on.
pub const SSH_PORT: u16 = 3022;

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

/// Why a dial did not give a tunnel.
#[derive(Debug)]
enum DialFailure {
    /// The proxy answered the hello with a refusal.
    Refused {
        code: Option<Refusal>,
        reason: String,
    },
    /// The connection, the handshake or the protocol failed.
    Failed(String),
}

impl std::fmt::Display for DialFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialFailure::Refused { reason, .. } => {
                write!(f, "the proxy refused the tunnel: {reason}")
            }
            DialFailure::Failed(reason) => f.write_str(reason),
        }
    }
}

enum PoolEvent {
    Dialed {
        result: Result<Dialed, DialFailure>,
        quic_failed: bool,
        /// A background QUIC retry while on TCP, not a dial for a missing tunnel.
        quic_retry: bool,
    },
    Proxies(Vec<ProxyEntry>),
    Closed {
        proxy_id: String,
        tunnel: u64,
        reconnect_after: Option<Duration>,
    },
}

struct Dialed {
    session: Session,
    control: Framed<TunnelStream>,
    welcome: Welcome,
}

struct Held {
    tunnel: u64,
    transport: Transport,
    stop: CancellationToken,
}

/// Runs the pool until `shutdown`, or until a proxy refuses the node for good.
pub async fn run(config: PoolConfig, shutdown: CancellationToken) -> Result<(), PoolError> {
    let config = Arc::new(config);
    let endpoint = match config.mode {
        TransportMode::Tcp => None,
        _ => Some(transport::quic_client_endpoint(false)?),
    };
    let (events_tx, mut events) = mpsc::channel::<PoolEvent>(64);
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut backoff = Backoff::default();
    let mut duplicates = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut next_dial = Instant::now();
    let mut dialing = false;
    let mut quic_broken = false;
    let mut next_quic_retry = Instant::now();
    let mut tunnel_ids = 0u64;

    loop {
        let now = Instant::now();
        let missing = held.is_empty() || wanted.iter().any(|id| !held.contains_key(id));
        let on_tcp = held.values().any(|h| h.transport == Transport::Tcp);
        let retry_quic = config.mode == TransportMode::Auto && on_tcp && now >= next_quic_retry;
        if !dialing && ((missing && now >= next_dial) || retry_quic) {
            dialing = true;
            // While UDP looks blocked, only the periodic retry tries QUIC.
            let try_quic = match config.mode {
                TransportMode::Quic => true,
                TransportMode::Tcp => false,
                TransportMode::Auto => !quic_broken || retry_quic,
            };
            if retry_quic {
                next_quic_retry = now + QUIC_RETRY_EVERY;
            }
            let fallback = config.mode == TransportMode::Auto && !retry_quic;
            tokio::spawn(dial(
                config.clone(),
                endpoint.clone(),
                try_quic,
                fallback,
                retry_quic,
                events_tx.clone(),
            ));
        }
        let wake = if dialing || !missing {
            now + Duration::from_secs(3600)
        } else {
            next_dial
        };
        let wake = if config.mode == TransportMode::Auto && on_tcp {
            wake.min(next_quic_retry)
        } else {
            wake
        };
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(wake) => continue,
            e = events.recv() => match e {
                Some(e) => e,
                None => break,
            },
        };
        match event {
            PoolEvent::Dialed {
                result,
                quic_failed,
                quic_retry,
            } => {
                dialing = false;
                if quic_failed && config.mode == TransportMode::Auto && !quic_broken {
                    tracing::warn!(addr = %config.addr, "QUIC does not get through (UDP blocked?); using TCP and trying QUIC again in the background");
                    quic_broken = true;
                    next_quic_retry = Instant::now() + QUIC_RETRY_EVERY;
                }
                match result {
                    Err(DialFailure::Refused {
                        code: Some(code),
                        reason,
                    }) if code.is_permanent() => {
                        for (_, h) in held.drain() {
                            h.stop.cancel();
                        }
                        return Err(PoolError::Revoked { reason });
                    }
                    Err(reason) if quic_retry => {
                        tracing::debug!(%reason, "QUIC still does not get through");
                    }
                    Err(reason) => {
                        let (delay, _) = backoff.next_delay();
                        tracing::warn!(addr = %config.addr, %reason, retry_in = ?delay, "cannot open a tunnel");
                        next_dial = Instant::now() + delay;
                    }
                    Ok(d) => {
                        backoff.reset();
                        let transport = d.session.transport();
                        if transport == Transport::Quic {
                            if quic_broken {
                                tracing::info!(
                                    "QUIC gets through again; moving tunnels back to QUIC"
                                );
                            }
                            quic_broken = false;
                        }
                        let proxy_id = d.welcome.proxy_id.clone();
                        wanted = d.welcome.proxies.iter().map(|p| p.id.clone()).collect();
                        let replaces_tcp = held.get(&proxy_id).is_some_and(|h| {
                            h.transport == Transport::Tcp && transport == Transport::Quic
                        });
                        if held.contains_key(&proxy_id) && !replaces_tcp {
                            tracing::debug!(%proxy_id, "the tunnel reached a proxy already held; closing it");
                            let mut control = d.control;
                            let _ = control.write(&Message::goodbye("duplicate tunnel")).await;
                            d.session.close("duplicate tunnel");
                            let (delay, _) = duplicates.next_delay();
                            next_dial = Instant::now() + delay;
                            continue;
                        }
                        duplicates.reset();
                        if let Some(old) = held.remove(&proxy_id) {
                            old.stop.cancel();
                        }
                        tunnel_ids += 1;
                        let stop = shutdown.child_token();
                        tracing::info!(%proxy_id, %transport, proxies = wanted.len(), held = held.len() + 1, "tunnel up");
                        held.insert(
                            proxy_id.clone(),
                            Held {
                                tunnel: tunnel_ids,
                                transport,
                                stop: stop.clone(),
                            },
                        );
                        tokio::spawn(run_tunnel(
                            config.clone(),
                            d,
                            tunnel_ids,
                            events_tx.clone(),
                            stop,
                        ));
                    }
                }
            }
            PoolEvent::Proxies(list) => {
                wanted = list.into_iter().map(|p| p.id).collect();
                let gone: Vec<String> = held
                    .keys()
                    .filter(|id| !wanted.contains(*id))
                    .cloned()
                    .collect();
                for id in gone {
                    tracing::info!(proxy_id = %id, "the proxy left the cluster; letting its tunnel go");
                    if let Some(h) = held.remove(&id) {
                        h.stop.cancel();
                    }
                }
            }
            PoolEvent::Closed {
                proxy_id,
                tunnel,
                reconnect_after,
            } => {
                if held.get(&proxy_id).is_some_and(|h| h.tunnel == tunnel) {
                    held.remove(&proxy_id);
                    tracing::info!(%proxy_id, held = held.len(), "tunnel down");
                    let delay = match reconnect_after {
                        // The proxy asked for it (it is restarting): come back after a jittered wait.
                        Some(after) => after.mul_f64(0.5 + rand::random::<f64>()),
                        None => backoff.next_delay().0,
                    };
                    next_dial = next_dial.max(Instant::now() + delay);
                }
            }
        }
    }
    for (_, h) in held.drain() {
        h.stop.cancel();
    }
    // Give tunnels a moment to say goodbye.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

async fn dial(
    config: Arc<PoolConfig>,
    endpoint: Option<quinn::Endpoint>,
    try_quic: bool,
    fallback_to_tcp: bool,
    quic_retry: bool,
    events: mpsc::Sender<PoolEvent>,
) {
    let mut quic_failed = false;
    let mut result = Err(DialFailure::Failed("no transport tried".into()));
    if try_quic && let Some(endpoint) = &endpoint {
        let limit = if fallback_to_tcp || config.mode == TransportMode::Auto {
            QUIC_TRY
        } else {
            WELCOME_TIMEOUT
        };
        result = match tokio::time::timeout(limit, dial_with(&config, Some(endpoint))).await {
            Ok(r) => r,
            Err(_) => Err(DialFailure::Failed(format!(
                "no QUIC answer within {}s",
                limit.as_secs()
            ))),
        };
        quic_failed = matches!(result, Err(DialFailure::Failed(_)));
    }
    // A refusal is the proxy's answer whatever the transport: only a failure falls back.
    if matches!(result, Err(DialFailure::Failed(_))) && (!try_quic || fallback_to_tcp) {
        result = dial_with(&config, None).await;
    }
    let _ = events
        .send(PoolEvent::Dialed {
            result,
            quic_failed,
            quic_retry,
        })
        .await;
}

/// Opens a tunnel (QUIC with an endpoint, else TCP), says hello and waits for the welcome.
async fn dial_with(
    config: &PoolConfig,
    quic: Option<&quinn::Endpoint>,
) -> Result<Dialed, DialFailure> {
    let failed = |e: &dyn std::fmt::Display| DialFailure::Failed(e.to_string());
    let session = match quic {
        Some(endpoint) => transport::connect_quic(endpoint, &config.addr, config.tls.clone()).await,
        None => transport::connect_tcp(&config.addr, config.tls.clone()).await,
    }
    .map_err(|e| failed(&e))?;
    let stream = session.open().await.map_err(|e| failed(&e))?;
    let mut control = Framed::new(stream);
    let labels = config.labels.borrow().clone();
    control
        .write(&Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            version: tunnel_proto::VERSION.to_string(),
            host_id: config.host_id.clone(),
            node_name: config.node_name.clone(),
            labels,
        }))
        .await
        .map_err(|e| failed(&e))?;
    match tokio::time::timeout(WELCOME_TIMEOUT, control.read()).await {
        Ok(Ok(Some(Message::Welcome(welcome)))) if welcome.protocol == PROTOCOL_VERSION => {
            Ok(Dialed {
                session,
                control,
                welcome,
            })
        }
        Ok(Ok(Some(Message::Goodbye { reason, code }))) => {
            session.close("refused");
            Err(DialFailure::Refused { code, reason })
        }
        Ok(Ok(other)) => {
            session.close("protocol error");
            Err(DialFailure::Failed(format!(
                "unexpected answer to hello: {}",
                other.map_or("end of stream", |m| m.kind())
            )))
        }
        Ok(Err(e)) => {
            session.close("protocol error");
            Err(DialFailure::Failed(format!(
                "the proxy closed the tunnel: {e}"
            )))
        }
        Err(_) => {
            session.close("timeout");
            Err(DialFailure::Failed("no welcome from the proxy".into()))
        }
    }
}

/// Owns one tunnel: its control stream (pings, heartbeats, proxy lists) and its dial streams.
async fn run_tunnel(
    config: Arc<PoolConfig>,
    dialed: Dialed,
    tunnel: u64,
    events: mpsc::Sender<PoolEvent>,
    stop: CancellationToken,
) {
    let Dialed {
        session,
        mut control,
        welcome,
    } = dialed;
    let proxy_id = welcome.proxy_id;
    let mut labels = config.labels.clone();
    let mut liveness = Liveness::new(Instant::now());
    let mut reconnect_after = None;
    let (audit_tx, mut audit_rx) = mpsc::channel::<tunnel_proto::wire::AuditEvent>(256);
    let dials = tokio::spawn(serve_dials(session.clone(), config.ssh.clone(), audit_tx));
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => {
                let _ = control.write(&Message::goodbye("the agent lets this tunnel go")).await;
                break;
            }
            _ = session.closed() => break,
            Some(event) = audit_rx.recv() => {
                if control.write(&Message::Audit(event)).await.is_err() {
                    break;
                }
                continue;
            }
            changed = labels.changed() => {
                if changed.is_err() {
                    break;
                }
                let hb = heartbeat(&config, &labels.borrow_and_update());
                let sent = control.write(&hb).await;
                liveness.heartbeat_sent(Instant::now());
                if sent.is_err() {
                    break;
                }
                continue;
            }
            _ = tokio::time::sleep_until(liveness.next_wake()) => {
                let due = liveness.poll(Instant::now());
                if due.dead {
                    tracing::warn!(%proxy_id, "the tunnel stopped answering pings; closing it");
                    break;
                }
                if let Some(seq) = due.ping && control.write(&Message::Ping { seq }).await.is_err() {
                    break;
                }
                if due.heartbeat {
                    let hb = heartbeat(&config, &labels.borrow());
                    if control.write(&hb).await.is_err() {
                        break;
                    }
                }
                continue;
            }
            msg = control.read() => msg,
        };
        match msg {
            Ok(Some(Message::Pong { .. })) => liveness.pong(Instant::now()),
            Ok(Some(Message::Proxies { proxies })) => {
                let _ = events.send(PoolEvent::Proxies(proxies)).await;
            }
            Ok(Some(Message::Reconnect { reason, after_ms })) => {
                tracing::info!(%proxy_id, %reason, "the proxy asks to reconnect later");
                reconnect_after = Some(Duration::from_millis(after_ms.min(60_000)));
                break;
            }
            Ok(Some(Message::Goodbye { reason, .. })) => {
                tracing::warn!(%proxy_id, %reason, "the proxy closed the tunnel");
                break;
            }
            Ok(Some(other)) => {
                tracing::warn!(%proxy_id, message = ?other, "unexpected message on the control stream; closing the tunnel");
                break;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(%proxy_id, error = %e, "the control stream failed");
                break;
            }
        }
    }
    session.close("tunnel closed");
    dials.abort();
    let _ = events
        .send(PoolEvent::Closed {
            proxy_id,
            tunnel,
            reconnect_after,
        })
        .await;
}

fn heartbeat(config: &PoolConfig, labels: &Labels) -> Message {
    Message::Heartbeat(Heartbeat {
        node_name: config.node_name.clone(),
        labels: labels.clone(),
        version: tunnel_proto::VERSION.to_string(),
    })
}

/// Answers the proxy's dial streams: port 3022 reaches the node's SSH server; other ports are
/// refused with a reason the proxy shows the user.
async fn serve_dials(
    session: Session,
    ssh: Arc<crate::ssh::SshContext>,
    audit: mpsc::Sender<tunnel_proto::wire::AuditEvent>,
) {
    while let Some(stream) = session.accept().await {
        let ssh = ssh.clone();
        let audit = audit.clone();
        tokio::spawn(async move {
            let mut framed = Framed::new(stream);
            let Ok(Ok(Some(Message::Dial(DialRequest { port, client_addr })))) =
                tokio::time::timeout(WELCOME_TIMEOUT, framed.read()).await
            else {
                return;
            };
            if port != SSH_PORT {
                let _ = framed
                    .write(&Message::DialResult {
                        error: Some(format!(
                            "this node serves SSH on port {SSH_PORT}, not {port}"
                        )),
                    })
                    .await;
                return;
            }
            if framed
                .write(&Message::DialResult { error: None })
                .await
                .is_err()
            {
                return;
            }
            let (stream, leftover) = framed.into_parts();
            if !leftover.is_empty() {
                // The proxy sends nothing after a dial until it has the answer.
                tracing::warn!(
                    "the proxy sent bytes before the dial was answered; dropping the stream"
                );
                return;
            }
            crate::ssh::serve(ssh, stream, client_addr, audit).await;
        });
    }
}
