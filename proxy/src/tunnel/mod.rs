//! The proxy's side of tunnels: authenticating them, the table of live tunnels, presence
//! records for the inventory, the proxy list pushed to agents, and revocations.
//!
//! Tunnels arrive on the web port (TLS with ALPN `burrow-tunnel/1`, told apart from HTTPS
//! after the handshake), on QUIC on the same port number, and on the optional dedicated tunnel
//! listener ([`listen`]). One task per tunnel owns its control stream.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_tunnel::{Framed, Keepalive, Session, TunnelStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel_proto::api::Presence;
use tunnel_proto::wire::{Message, PROTOCOL_VERSION, ProxyEntry, Refusal, Welcome};

use burrow_daemon::unix_now;

use crate::backend::{Backend, BackendError, Event};
use crate::metrics::Metrics;
use crate::nodelimits::short;
use crate::state::{self, PROXIES as PROXIES_PREFIX, REVOKED as REVOKED_PREFIX};

mod control;
mod identity;
mod listen;
mod nudge;
mod renew;
mod route;
mod table;

pub use self::control::TunnelError;
use self::control::{Action, Facts, ProxyControl};
use self::identity::{NodeIdentity, node_identity};
pub use self::listen::{is_tunnel_alpn, serve_quic, serve_tcp};
pub use self::nudge::nudge_former_agents;
use self::renew::TrustWatch;
pub use self::route::DialError;
use self::table::{Entry, Table};

/// A node vanishes from the inventory this long after the last record of it.
const PRESENCE_TTL: Duration = Duration::from_secs(75);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a tunnel's node is recorded as seen (besides when its tunnel comes and goes): how
/// far "offline since" can be off after a proxy died without saying goodbye.
const SEEN_EVERY: u64 = 300;
const WATCH_RETRY: Duration = Duration::from_secs(1);

/// The live keys under a watched prefix.
type Items = BTreeMap<String, Vec<u8>>;
/// What a change under a watched prefix updates.
type Apply = fn(&TunnelServer, &Items);

/// What every agent of this proxy is told, in its welcome and again whenever it changes.
#[derive(Clone)]
struct Pushed {
    proxies: Vec<ProxyEntry>,
    /// The window agents spread their return over after losing this proxy without an advisory
    /// ([`control::return_window`]).
    return_window: Duration,
}

/// A presence's first write, or one of its refreshes ([`TunnelServer::write_presence`]).
#[derive(Clone, Copy)]
enum Write {
    First,
    Refresh,
}

/// An admitted tunnel's state, from its admission to its serving.
struct Admitted {
    /// Its key in the tunnel table.
    id: u64,
    host_id: String,
    node_name: String,
    control: Framed<TunnelStream>,
    pushed: watch::Receiver<Pushed>,
    /// The cluster's CAs, followed for an agent that takes trust updates.
    trust: Option<TrustWatch>,
    machine: ProxyControl,
    /// When this tunnel last wrote its node's seen record (`write_presence`).
    seen: u64,
}

pub struct TunnelServer {
    proxy_id: String,
    /// Nodes are also reached as `NODE.CLUSTER`.
    cluster_name: String,
    backend: Arc<dyn Backend>,
    tunnels: Mutex<Table>,
    /// How many of `tunnels` are QUIC's (kept under `tunnels`' lock): their return costs more.
    quic_tunnels: std::sync::atomic::AtomicUsize,
    /// This machine's cores: a fleet's return is paced for them ([`control::return_window`]).
    cores: usize,
    next_id: AtomicU64,
    /// Tunnels taken plus tunnels ended, ever ([`crate::heap::trim_when_quiet`]).
    churn: AtomicU64,
    /// What every agent is told, again whenever it changes.
    pushed: watch::Sender<Pushed>,
    revoked: Mutex<HashSet<String>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    audit: crate::audit::AuditLog,
    /// Signs node certificates again when agents ask ([`Message::Renew`]).
    auth: Arc<crate::auth::Auth>,
    /// Stores the session recordings nodes send ([`Message::Recording`]).
    recordings: Arc<crate::recordings::Recordings>,
    metrics: Arc<Metrics>,
}

impl TunnelServer {
    /// Loads the proxy list and the revocations, then keeps them current in the background.
    pub async fn start(
        proxy_id: String,
        cluster_name: String,
        backend: Arc<dyn Backend>,
        audit_dir: std::path::PathBuf,
        (auth, recordings): (Arc<crate::auth::Auth>, Arc<crate::recordings::Recordings>),
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BackendError> {
        let pushed = watch::Sender::new(Pushed {
            proxies: vec![ProxyEntry {
                id: proxy_id.clone(),
            }],
            return_window: control::return_window(0, 0, 1),
        });
        let server = Arc::new(Self {
            proxy_id,
            cluster_name,
            backend,
            tunnels: Mutex::new(Table::default()),
            quic_tunnels: Default::default(),
            cores: control::cores(),
            next_id: AtomicU64::new(1),
            churn: AtomicU64::new(0),
            pushed,
            revoked: Mutex::new(HashSet::new()),
            tasks: TaskTracker::new(),
            shutdown,
            audit: crate::audit::AuditLog::new(audit_dir),
            auth,
            recordings,
            metrics,
        });
        for (prefix, apply) in [
            (PROXIES_PREFIX, Self::set_proxies as Apply),
            (REVOKED_PREFIX, Self::set_revoked as Apply),
        ] {
            let (snapshot, events) = server.backend.watch(prefix).await?;
            let items: Items = snapshot.into_iter().collect();
            apply(&server, &items);
            tokio::spawn(server.clone().follow(prefix, items, events, apply));
        }
        Ok(server)
    }

    fn set_proxies(&self, items: &Items) {
        let mut ids: Vec<ProxyEntry> = items
            .keys()
            .filter_map(|k| k.strip_prefix(PROXIES_PREFIX))
            .map(|id| ProxyEntry { id: id.to_string() })
            .collect();
        // This proxy is live by definition, even while its registration is being renewed.
        if !ids.iter().any(|p| p.id == self.proxy_id) {
            ids.push(ProxyEntry {
                id: self.proxy_id.clone(),
            });
        }
        ids.sort();
        self.pushed
            .send_if_modified(|cur| std::mem::replace(&mut cur.proxies, ids) != cur.proxies);
    }

    fn set_revoked(&self, items: &Items) {
        let ids: HashSet<String> = items
            .keys()
            .filter_map(|k| k.strip_prefix(REVOKED_PREFIX))
            .map(str::to_string)
            .collect();
        let newly: Vec<String> = {
            let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
            let newly = ids.difference(&revoked).cloned().collect();
            *revoked = ids;
            newly
        };
        for id in &newly {
            self.disconnect(id, "the node was removed from the cluster");
        }
    }

    /// Applies the changes under `prefix` to `items` until shutdown, listing again after a
    /// reset and watching again if the watch ends.
    async fn follow(
        self: Arc<Self>,
        prefix: &'static str,
        mut items: Items,
        mut events: tokio::sync::mpsc::Receiver<Event>,
        apply: Apply,
    ) {
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                e = events.recv() => e,
            };
            match event {
                Some(Event::Put { key, value }) => {
                    items.insert(key, value);
                }
                Some(Event::Delete { key }) => {
                    items.remove(&key);
                }
                Some(Event::Reset) => match self.backend.list(prefix).await {
                    Ok(current) => items = current.into_iter().collect(),
                    Err(e) => tracing::warn!(error = %e, prefix, "cannot list after a watch reset"),
                },
                None => {
                    // The watch ended (the backend went away for good?): start a new one.
                    tokio::time::sleep(WATCH_RETRY).await;
                    match self.backend.watch(prefix).await {
                        Ok((current, rx)) => {
                            items = current.into_iter().collect();
                            events = rx;
                        }
                        Err(_) => continue,
                    }
                }
            }
            apply(&self, &items);
        }
    }

    fn is_revoked(&self, host_id: &str) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(host_id)
    }

    /// Closes every tunnel of `host_id`.
    pub fn disconnect(&self, host_id: &str, reason: &str) {
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        for entry in tunnels.of_host(host_id) {
            tracing::info!(host_id, node = %entry.node_name, reason, "closing tunnel");
            entry.session.close(reason);
        }
    }

    /// Takes a new tunnel; returns at once, the tunnel runs in its own task.
    pub fn accept(self: &Arc<Self>, session: Session) {
        let server = self.clone();
        self.churn.fetch_add(1, Ordering::Relaxed);
        self.tasks.spawn(async move {
            let remote = session.remote_addr();
            if let Err(reason) = server.clone().run_tunnel(session.clone()).await {
                tracing::info!(peer = %remote, transport = %session.transport(), %reason, "tunnel refused or ended");
                session.close(&reason.to_string());
            }
            server.churn.fetch_add(1, Ordering::Relaxed);
        });
    }

    /// The proxy's metrics, which the web port and the SSH jump host count into too.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Tunnels taken plus tunnels ended since the start: it stands still while none come or go.
    pub fn churn(&self) -> u64 {
        self.churn.load(Ordering::Relaxed)
    }

    async fn run_tunnel(self: Arc<Self>, session: Session) -> Result<(), TunnelError> {
        // Boxed, and freed once done: an idle tunnel's task keeps only what serving it needs,
        // not the larger state of its hello, welcome and first presence write.
        let Admitted {
            id,
            host_id,
            node_name,
            mut control,
            mut pushed,
            mut trust,
            mut machine,
            mut seen,
        } = match Box::pin(self.admit(&session)).await {
            Ok(admitted) => admitted,
            Err(e) => {
                self.metrics.tunnel_refused(e.refusal_label());
                return Err(e);
            }
        };
        let result = self
            .serve_control(
                &session,
                &mut control,
                (&mut pushed, &mut trust),
                &mut machine,
                &mut seen,
            )
            .await;
        let reason = match &result {
            Ok(()) if self.shutdown.is_cancelled() => "shutdown",
            Ok(()) => "closed",
            Err(e) => e.disconnect_label(),
        };
        if !self.forget(id, reason) {
            let _ = self
                .backend
                .delete(&state::presence(&host_id, &self.proxy_id))
                .await;
            self.write_seen(machine.presence(unix_now())).await;
        }
        tracing::info!(%host_id, node = %node_name, "tunnel down");
        result
    }

    /// Reads a new tunnel's hello, admits it (or refuses it, telling the agent why), welcomes it
    /// and records its presence.
    async fn admit(&self, session: &Session) -> Result<Admitted, TunnelError> {
        // Who the node is comes from the certificate the cluster signed at join, never from what
        // it says in its hello or heartbeats.
        let NodeIdentity { host_id, node_name } = node_identity(session)?;
        let control = tokio::time::timeout(HELLO_TIMEOUT, session.accept())
            .await
            .ok()
            .flatten()
            .ok_or(TunnelError::NoControlStream)?;
        let mut control = Framed::new(control);
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, control.read()).await {
            Ok(Ok(Some(Message::Hello(h)))) => h,
            Ok(Ok(other)) => {
                let kind = other.as_ref().map_or("end of stream", Message::kind);
                return Err(TunnelError::NotHello(kind));
            }
            Ok(Err(e)) => return Err(TunnelError::BadHello(e)),
            Err(_) => return Err(TunnelError::NoHello),
        };
        if hello.node_name != node_name {
            tracing::debug!(%host_id, %node_name, claimed = %short(&hello.node_name), "the hello names another node name; the certificate's stands");
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let admitted = {
            let revoked = self.is_revoked(&host_id);
            let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
            let facts = Facts {
                host_id: &host_id,
                revoked,
                shutting_down: self.shutdown.is_cancelled(),
                held: tunnels.held(&host_id),
            };
            let admitted = control::admit(&hello, &facts);
            if admitted.is_ok() {
                let entry = Entry {
                    host_id: host_id.clone(),
                    node_name: node_name.clone(),
                    session: session.clone(),
                };
                tunnels.insert(id, entry);
                self.count_quic(session, 1);
                self.set_return_window(tunnels.len());
                self.metrics.tunnel_up(
                    session.transport().as_str(),
                    session.resumed(),
                    tunnels.nodes(),
                );
            }
            admitted
        };
        // Refusals come after the hello, on the control stream, so the agent learns why in a
        // form it can act on (a revoked node stops for good).
        let labels = match admitted {
            Ok(labels) => labels,
            Err(TunnelError::Refused { code, reason }) => {
                refuse(session, &mut control, code, &reason).await;
                return Err(TunnelError::Refused { code, reason });
            }
            Err(e) => return Err(e),
        };
        let keepalive = hello
            .keepalive_ms
            .map(|ms| Keepalive::clamped(Duration::from_millis(ms)));
        if let Some(k) = keepalive {
            session.set_keepalive(k);
        }
        // A node on an upgraded tunnel pings every interval: nothing else tells that it is gone.
        let transport = session.transport();
        let silence_limit = transport.pings().then(|| {
            keepalive
                .unwrap_or_else(|| Keepalive::default_for(transport))
                .dead_after(transport)
        });
        let mut pushed = self.pushed.subscribe();
        let Pushed {
            proxies,
            return_window,
        } = pushed.borrow_and_update().clone();
        // A QUIC agent's token for this proxy's next start (`nudge`).
        let nudge = (session.transport() == burrow_tunnel::Transport::Quic)
            .then(|| tunnel_proto::hex(&burrow_tunnel::nudge::new_nudge_token()));
        let welcomed = control
            .write(&Message::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                version: tunnel_proto::VERSION.to_string(),
                proxy_id: self.proxy_id.clone(),
                proxies,
                return_window_ms: Some(return_window.as_millis() as u64),
                nudge_token: nudge.clone(),
                renewal: true,
                recording: Some(self.recordings.mode()),
            }))
            .await;
        // What the node trusts, right after the welcome: it may have been away during a rotation.
        let trust = hello.trust_updates.then(|| self.auth.subscribe());
        let trusted = match (&welcomed, &trust) {
            (Ok(()), Some(_)) => control.write(&self.trust_message(session)).await,
            _ => Ok(()),
        };
        if let Err(e) = welcomed.and(trusted) {
            self.forget(id, "closed");
            return Err(e.into());
        }

        // A revocation that landed between the check above and the insert.
        if self.is_revoked(&host_id) {
            session.close("the node was removed from the cluster");
        }
        let presence = Presence {
            host_id: host_id.clone(),
            node_name: node_name.clone(),
            version: short(&hello.version),
            labels,
            proxy_id: self.proxy_id.clone(),
            transport: session.transport().to_string(),
            remote_addr: session.remote_addr().to_string(),
            connected: unix_now(),
            last_seen: unix_now(),
            nudge,
        };
        tracing::info!(%host_id, node = %node_name, transport = %session.transport(), peer = %session.remote_addr(), "tunnel up");
        let mut seen = 0;
        self.write_presence(&presence, &mut seen, Write::First)
            .await;
        Ok(Admitted {
            id,
            host_id,
            node_name,
            control,
            pushed,
            trust,
            machine: ProxyControl::new(presence, Instant::now(), silence_limit),
            seen,
        })
    }

    /// Drops tunnel `id` from the table (it ended for `reason`, a metrics label); returns whether
    /// its node still holds another one.
    fn forget(&self, id: u64, reason: &'static str) -> bool {
        let mut tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        let Some(gone) = tunnels.remove(id) else {
            return false;
        };
        self.count_quic(&gone.session, -1);
        self.set_return_window(tunnels.len());
        self.metrics
            .tunnel_down(gone.session.transport().as_str(), reason, tunnels.nodes());
        tunnels.held(&gone.host_id) > 0
    }

    /// Counts a QUIC tunnel added (`1`) or gone (`-1`); called under `tunnels`' lock.
    fn count_quic(&self, session: &Session, change: isize) {
        use std::sync::atomic::Ordering::Relaxed;
        if session.transport() == burrow_tunnel::Transport::Quic {
            if change > 0 {
                self.quic_tunnels.fetch_add(1, Relaxed);
            } else {
                self.quic_tunnels.fetch_sub(1, Relaxed);
            }
        }
    }

    /// Called under `tunnels`' lock with their number.
    fn set_return_window(&self, tunnels: usize) {
        let quic = self.quic_tunnels.load(std::sync::atomic::Ordering::Relaxed);
        let window = control::return_window(tunnels.saturating_sub(quic), quic, self.cores);
        self.pushed
            .send_if_modified(|cur| std::mem::replace(&mut cur.return_window, window) != window);
    }

    /// Drives an admitted tunnel's control session until it ends.
    async fn serve_control(
        &self,
        session: &Session,
        control: &mut Framed<TunnelStream>,
        (pushed, trust): (&mut watch::Receiver<Pushed>, &mut Option<TrustWatch>),
        machine: &mut ProxyControl,
        seen: &mut u64,
    ) -> Result<(), TunnelError> {
        loop {
            let msg = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    let _ = control.write(&ProxyControl::shutting_down()).await;
                    // Closing a QUIC connection drops unsent stream data: give the agent a moment
                    // to read the advisory and close the tunnel itself.
                    let _ = tokio::time::timeout(Duration::from_secs(1), session.closed()).await;
                    session.close("proxy shutting down");
                    return Ok(());
                }
                _ = session.closed() => return Ok(()),
                changed = pushed.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let Pushed { proxies, return_window } = pushed.borrow_and_update().clone();
                    control.write(&ProxyControl::proxies_changed(proxies, return_window)).await?;
                    continue;
                }
                // A CA rotation moved: tell the node what to trust (and to renew).
                changed = renew::trust_changed(trust) => {
                    if changed {
                        control.write(&self.trust_message(session)).await?;
                    }
                    continue;
                }
                // Agents open no stream but their control stream: reset any other at once
                // instead of buffering it, and close a tunnel that keeps trying.
                opened = session.accept() => match opened {
                    Some(stream) => {
                        drop(stream);
                        machine.handle_unwanted_stream()?;
                        continue;
                    }
                    None => return Ok(()),
                },
                // The tunnel is up, so the node is: its transport's keep-alives say so.
                _ = tokio::time::sleep_until(machine.wake_at().into()) => {
                    // Bytes on any stream count: a ping may wait behind a session's data.
                    let now = Instant::now();
                    if let Some(at) = session.idle_for().and_then(|idle| now.checked_sub(idle)) {
                        machine.heard(at);
                    }
                    if let Some(limit) = machine.silent(now) {
                        return Err(TunnelError::Silent(limit));
                    }
                    if machine.poll(Instant::now()) {
                        self.write_presence(machine.presence(unix_now()), seen, Write::Refresh)
                            .await;
                    }
                    continue;
                }
                msg = control.read() => match msg? {
                    Some(msg) => msg,
                    None => return Ok(()),
                },
            };
            match machine.handle_message(Instant::now(), msg)? {
                Action::Nothing => {}
                Action::Send(reply) => control.write(&reply).await?,
                Action::WritePresence => {
                    self.write_presence(machine.presence(unix_now()), seen, Write::Refresh)
                        .await
                }
                Action::Audit(event) => self.audit.append(&event, machine.host_id()),
                Action::Close => return Ok(()),
                Action::Recording { chunk, wait } => {
                    tokio::time::sleep(wait).await;
                    let (host_id, name) = (machine.host_id(), machine.node_name());
                    if let Some(reply) = self.recordings.receive(host_id, name, chunk).await {
                        control.write(&reply).await?
                    }
                }
                Action::Renew { ssh_public_key } => {
                    let (host_id, name) = (machine.host_id(), machine.node_name());
                    let reply = self.renewal(session, host_id, name, &ssh_public_key).await;
                    control.write(&reply).await?
                }
            }
        }
    }

    /// Records the node's presence at this proxy, and that it was seen when `seen` (the last
    /// time this tunnel said so) is [`SEEN_EVERY`] old. The first write is durable: a restart
    /// after a crash reads it to nudge the agent (`nudge`); a refresh may be lost.
    async fn write_presence(&self, presence: &Presence, seen: &mut u64, write: Write) {
        if presence.last_seen >= *seen + SEEN_EVERY {
            *seen = presence.last_seen;
            self.write_seen(presence).await;
        }
        let value = serde_json::to_vec(presence).expect("presence serializes");
        let key = state::presence(&presence.host_id, &self.proxy_id);
        let written = match write {
            Write::First => self.backend.put(&key, value, Some(PRESENCE_TTL)).await,
            Write::Refresh => self.backend.refresh(&key, value, Some(PRESENCE_TTL)).await,
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, host_id = %presence.host_id, "cannot record the node's presence");
        }
    }

    /// The node's last presence, kept without a TTL: when it was last seen, once it is offline.
    async fn write_seen(&self, presence: &Presence) {
        let value = serde_json::to_vec(presence).expect("presence serializes");
        if let Err(e) = self
            .backend
            .put(&state::seen(&presence.host_id), value, None)
            .await
        {
            tracing::warn!(error = %e, host_id = %presence.host_id, "cannot record when the node was seen");
        }
    }

    /// Waits (bounded) for tunnel tasks after shutdown.
    pub async fn drain(&self, grace: Duration) {
        self.tasks.close();
        let _ = tokio::time::timeout(grace, self.tasks.wait()).await;
    }
}

/// Sends a typed refusal and gives the agent a moment to read it and close the tunnel itself
/// (closing first could drop the unsent goodbye).
async fn refuse(
    session: &Session,
    control: &mut Framed<TunnelStream>,
    code: Refusal,
    reason: &str,
) {
    if control.write(&Message::refusal(code, reason)).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), session.closed()).await;
    }
}
