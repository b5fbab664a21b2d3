//! The node's SSH server, served over every dial stream of every tunnel.
//!
//! It presents the node's host certificate (principals: host id and node name), accepts only user
//! certificates from the cluster's user CA, of type user, valid now, with the requested login
//! among their principals, and honours the `force-command` and `source-address` critical
//! options. Sessions run as the requested OS login: a shell on a real PTY, exec with exit status,
//! env, window changes, signals, the SFTP subsystem (the system's sftp-server), and
//! `direct-tcpip` forwarding. Every session start and end, exec and failed login becomes an
//! audit event.
//!
//! - [`policy`]: the certificate checks and where forwarding may connect.
//! - [`process`]: starting programs as the login (privilege drop, PTYs, no leaked descriptors)
//!   and signalling them safely.
//! - [`pump`]: moving bytes between the client and the program, within a byte budget.
//! - [`start`]: starting a session's program and the audit events of its start and end.

mod policy;
mod process;
mod pump;
mod start;
mod transfer;

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use burrow_tunnel::TunnelStream;
use russh::keys::ssh_key::{Certificate, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, Sig};
use tokio::sync::mpsc;
use tunnel_proto::api::Labels;
use tunnel_proto::wire::AuditEvent;

pub use self::policy::{Grant, PermitOpen, check_certificate};

use self::process::{Login, ProcessGroup, PtySpec};
use self::start::Start;
use crate::identity::Identity;

/// Connections that have not logged in yet, at once, per agent (the tunnels and the local
/// listener together; sshd's MaxStartups default is 10:30:100).
const MAX_STARTUPS: usize = 32;
/// Messages (each up to a 32 KB packet) that queue for one SSH connection's session loop.
const CHANNEL_QUEUE: usize = 16;

/// What every SSH connection on this node shares.
pub struct SshContext {
    /// The server configuration, host certificate included: a renewal swaps it for the next
    /// connections (those open keep theirs).
    config: std::sync::RwLock<Arc<russh::server::Config>>,
    host_key: PrivateKey,
    /// The user CAs logins may be certified by: a CA rotation swaps them.
    user_cas: std::sync::RwLock<Arc<Vec<PublicKey>>>,
    pub node_name: String,
    pub host_id: String,
    /// Where `direct-tcpip` may connect.
    pub permit_open: PermitOpen,
    /// Places for connections that have not logged in yet (sshd's MaxStartups).
    pub startups: Arc<tokio::sync::Semaphore>,
    /// Where session recordings go (none: sessions are not recorded).
    pub recordings: Option<Arc<crate::record::Uploader>>,
}

impl SshContext {
    pub fn new(identity: &Identity, permit_open: PermitOpen) -> anyhow::Result<Self> {
        let key = PrivateKey::from_openssh(identity.ssh_key.expose())?;
        let cert = Certificate::from_openssh(&identity.ssh_cert)?;
        let user_cas = identity
            .user_ca_ssh
            .iter()
            .map(|k| PublicKey::from_openssh(k.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config: std::sync::RwLock::new(Arc::new(server_config(key.clone(), cert))),
            host_key: key,
            user_cas: std::sync::RwLock::new(Arc::new(user_cas)),
            node_name: identity.node_name.clone(),
            host_id: identity.host_id.clone(),
            permit_open,
            startups: Arc::new(tokio::sync::Semaphore::new(MAX_STARTUPS)),
            recordings: None,
        })
    }
}

impl SshContext {
    /// The configuration new connections get.
    pub fn config(&self) -> Arc<russh::server::Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The user CAs a login's certificate may be from.
    pub fn user_cas(&self) -> Arc<Vec<PublicKey>> {
        self.user_cas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Accepts certificates from `cas` from the next login on.
    pub fn set_user_cas(&self, cas: Vec<PublicKey>) {
        *self.user_cas.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cas);
    }

    /// Presents `cert` (a renewed host certificate for the same key) from the next connection on.
    pub fn set_certificate(&self, cert: Certificate) {
        let config = Arc::new(server_config(self.host_key.clone(), cert));
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
    }
}

fn server_config(key: PrivateKey, cert: Certificate) -> russh::server::Config {
    let mut config = burrow_sshd::server_config(key, cert);
    // Output waits in russh's queue when the client's window is full: at most this many
    // 32 KB packets per connection (russh's default, 100, is 3 MB on a small device).
    config.channel_buffer_size = CHANNEL_QUEUE;
    config
}

/// Serves one SSH connection on a dial stream. `client` is the user's address as the proxy saw
/// it, `via` the proxy whose tunnel carried it (none on the local listener).
pub async fn serve(
    ctx: Arc<SshContext>,
    stream: TunnelStream,
    client: String,
    via: Option<String>,
    audit: mpsc::Sender<AuditEvent>,
) {
    // Like sshd's MaxStartups: a bounded number of connections that have not logged in yet, each
    // for at most the login grace time.
    let Ok(startup) = ctx.startups.clone().try_acquire_owned() else {
        tracing::debug!(%client, "SSH connection dropped: too many unauthenticated connections");
        return;
    };
    let (authenticated, grace_over) = tokio::sync::oneshot::channel();
    let peer = client.clone();
    let handler = NodeHandler {
        ctx: ctx.clone(),
        client_ip: client
            .rsplit_once(':')
            .and_then(|(ip, _)| ip.trim_matches(['[', ']']).parse().ok()),
        client,
        via,
        audit,
        login: None,
        user: None,
        force_command: None,
        permit_pty: false,
        permit_port_forwarding: false,
        channels: HashMap::new(),
        unauthenticated: Some((startup, authenticated)),
    };
    burrow_sshd::serve_with_grace(
        ctx.config(),
        stream,
        handler,
        burrow_sshd::LOGIN_GRACE,
        grace_over,
        &peer,
    )
    .await;
}

/// Serves SSH on a local listener (`--ssh-listen`). Its audit events go to the agent's log: they
/// have no tunnel to travel on.
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    ctx: Arc<SshContext>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let (audit, mut events) = mpsc::channel::<AuditEvent>(256);
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            tracing::info!(event = %e.event, fields = ?e.fields, "audit");
        }
    });
    while let Some((tcp, peer)) = burrow_daemon::accept(&listener, &shutdown).await {
        let _ = tcp.set_nodelay(true);
        burrow_sshd::keep_alive(&tcp);
        tokio::spawn(serve(
            ctx.clone(),
            Box::new(tcp),
            peer.to_string(),
            None,
            audit.clone(),
        ));
    }
}

#[derive(Default)]
struct ChanState {
    pty: Option<PtySpec>,
    env: Vec<(String, String)>,
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    master: Option<Arc<OwnedFd>>,
    group: Option<Arc<ProcessGroup>>,
    /// The session's id (audit events, its recording) once its program runs.
    session_id: Option<String>,
    recorder: Option<Arc<crate::record::Recorder>>,
    /// An SFTP session's requests, read for the audit log.
    sftp: Option<transfer::SftpWatch>,
}

struct NodeHandler {
    ctx: Arc<SshContext>,
    client: String,
    client_ip: Option<IpAddr>,
    /// The proxy whose tunnel carried the connection: where its recordings go first.
    via: Option<String>,
    audit: mpsc::Sender<AuditEvent>,
    login: Option<Login>,
    user: Option<String>,
    force_command: Option<String>,
    permit_pty: bool,
    permit_port_forwarding: bool,
    channels: HashMap<ChannelId, ChanState>,
    /// Until the user logs in: the connection's place among the unauthenticated ones, and the
    /// signal that stops the login grace timer.
    unauthenticated: Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::oneshot::Sender<()>,
    )>,
}

/// A connection that ends without closing its channels (the user's link or the proxy died) hangs
/// up on their programs, as sshd does: a shell left behind would run on unseen, and its session
/// (and recording) would never end.
impl Drop for NodeHandler {
    fn drop(&mut self) {
        for (_, state) in self.channels.drain() {
            if let Some(group) = state.group {
                group.signal(nix::sys::signal::Signal::SIGHUP);
            }
        }
    }
}

impl NodeHandler {
    fn event(&self, event: &str, extra: &[(&str, String)]) {
        let mut fields = Labels::new();
        fields.insert("node".into(), self.ctx.node_name.clone());
        fields.insert("host_id".into(), self.ctx.host_id.clone());
        fields.insert("client".into(), self.client.clone());
        if let Some(u) = &self.user {
            fields.insert("user".into(), u.clone());
        }
        if let Some(l) = &self.login {
            fields.insert("login".into(), l.name.clone());
        }
        for (k, v) in extra {
            fields.insert((*k).to_string(), v.clone());
        }
        let _ = self.audit.try_send(AuditEvent {
            event: event.into(),
            time: burrow_daemon::unix_now_ms(),
            fields,
        });
    }
}

impl russh::server::Handler for NodeHandler {
    type Error = russh::Error;

    async fn auth_openssh_certificate(
        &mut self,
        login: &str,
        cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let now = burrow_daemon::unix_now();
        let checked = check_certificate(cert, login, &self.ctx.user_cas(), self.client_ip, now)
            .and_then(|g| match Login::resolve(login) {
                Ok(Some(l)) => Ok((g, l)),
                _ => Err(format!("login {login:?} does not exist on this node")),
            });
        match checked {
            Ok((grant, resolved)) => {
                if let Some((place, authenticated)) = self.unauthenticated.take() {
                    drop(place);
                    let _ = authenticated.send(());
                }
                self.login = Some(resolved);
                self.user = Some(cert.key_id().to_string());
                self.force_command = grant.force_command;
                self.permit_pty = grant.permit_pty;
                self.permit_port_forwarding = grant.permit_port_forwarding;
                tracing::info!(user = cert.key_id(), login, client = %self.client, "SSH login");
                Ok(Auth::Accept)
            }
            Err(why) => {
                tracing::warn!(user = cert.key_id(), login, client = %self.client, %why, "SSH login refused");
                self.event(
                    "auth.failure",
                    &[
                        ("attempted_login", login.to_string()),
                        ("cert_user", cert.key_id().to_string()),
                        ("reason", why),
                    ],
                );
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Client data arrives through `Handler::data`; the channel object itself is dropped, so
        // its buffer can never fill and stall the session.
        self.channels.insert(channel.id(), ChanState::default());
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        id: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.permit_pty {
            session.channel_failure(id)?;
            return Ok(());
        }
        self.channels.entry(id).or_default().pty = Some(PtySpec {
            term: term.to_string(),
            cols: clamp(cols),
            rows: clamp(rows),
        });
        session.channel_success(id)?;
        Ok(())
    }

    async fn env_request(
        &mut self,
        id: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Like sshd's default AcceptEnv: the locale only.
        if name == "LANG" || name.starts_with("LC_") {
            self.channels
                .entry(id)
                .or_default()
                .env
                .push((name.to_string(), value.to_string()));
            session.channel_success(id)?;
        } else {
            session.channel_failure(id)?;
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(id, Start::Shell, session).await
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        self.start(id, Start::Exec(command), session).await
    }

    async fn subsystem_request(
        &mut self,
        id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            self.start(id, Start::Sftp, session).await
        } else {
            session.channel_failure(id)?;
            Ok(())
        }
    }

    async fn data(
        &mut self,
        id: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(state) = self.channels.get_mut(&id) else {
            return Ok(());
        };
        let ops = state
            .sftp
            .as_mut()
            .map(|w| w.feed(data))
            .unwrap_or_default();
        let (tx, session_id) = (state.stdin.clone(), state.session_id.clone());
        for op in ops {
            let mut fields = vec![
                ("session_id", session_id.clone().unwrap_or_default()),
                ("operation", op.op.to_string()),
                ("path", op.path),
            ];
            fields.extend(op.to.map(|to| ("to", to)));
            self.event("sftp", &fields);
        }
        if let Some(tx) = tx {
            let _ = tx.send(data.to_vec()).await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(state) = self.channels.get_mut(&id)
            && state.master.is_none()
        {
            state.stdin = None;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(state) = self.channels.remove(&id)
            && let Some(group) = state.group
        {
            group.signal(nix::sys::signal::Signal::SIGHUP);
        }
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        id: ChannelId,
        cols: u32,
        rows: u32,
        _pw: u32,
        _ph: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(state) = self.channels.get(&id) else {
            return Ok(());
        };
        if let Some(master) = &state.master {
            process::set_window_size(master, clamp(cols), clamp(rows));
        }
        if let Some(recorder) = &state.recorder {
            recorder.resize(u32::from(clamp(cols)), u32::from(clamp(rows)));
        }
        if let Some(session_id) = state.session_id.clone() {
            let size = format!("{}x{}", clamp(cols), clamp(rows));
            self.event("resize", &[("session_id", session_id), ("size", size)]);
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        id: ChannelId,
        sig: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let (Some(group), Some(signal)) = (
            self.channels.get(&id).and_then(|c| c.group.clone()),
            process::to_signal(&sig),
        ) {
            group.signal(signal);
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let host = host.trim_matches(['[', ']']);
        let port = u16::try_from(port).unwrap_or(0);
        let target = format!("{host}:{port}");
        let refusal = if !self.permit_port_forwarding || self.force_command.is_some() {
            Some("the certificate does not permit port forwarding")
        } else if !self.ctx.permit_open.allows(host, port) {
            Some("this node's permit_open does not allow the target")
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.event(
                "port_forward.refused",
                &[("target", target), ("reason", reason.into())],
            );
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        match tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        {
            Ok(Ok(mut tcp)) => {
                self.event("port_forward", &[("target", target)]);
                reply.accept().await;
                tokio::spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
                });
            }
            _ => reply.reject(ChannelOpenFailure::ConnectFailed).await,
        }
        Ok(())
    }
}

/// A window dimension from the client, clamped to what a terminal can hold.
fn clamp(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}
