//! The proxy's SSH service (port 3023): a jump host for users with a certificate from the
//! cluster's user CA. It carries bytes to nodes through their tunnels and never sees a
//! session's plaintext: `ssh -J user@proxy login@node` sends `direct-tcpip` to `NODE:22` (or
//! `:3022` with `-p 3022`; both are the node's SSH service), and `ssh -p 3023 user@proxy -s
//! proxy:NODE:PORT` (as a ProxyCommand) asks for that subsystem. NODE is a name or a host id,
//! bare or under the cluster's name (`edge-01.CLUSTER`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use burrow_daemon::fsutil::write_private_atomic;
use russh::keys::ssh_key::{Algorithm, Certificate, LineEnding, PrivateKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth as ClusterAuth;
use crate::auth::ca::Authorities;
use crate::config::Limits;
use crate::ratelimit::{ConnectionGate, GatePermit};
use tunnel_proto::pin::CaPin;

/// Bytes copied at a time between a user's channel and the node's dial stream.
const COPY_BUF: usize = 64 * 1024;
use crate::tunnel::TunnelServer;

const HOST_KEY_FILE: &str = "ssh-host-key";

/// The proxy's SSH host key (created once in the data dir) and its host certificate for the
/// names users reach it by, issued again at two thirds of its life or when a CA rotation changes
/// the CA it comes from ([`crate::certs::keep_current`]).
pub struct HostIdentity {
    key: PrivateKey,
    proxy_id: String,
    names: Vec<String>,
    /// The server configuration new connections get, host certificate included.
    config: RwLock<Arc<russh::server::Config>>,
    /// The pin of the CA the certificate is from, and when it is due again.
    issued: Mutex<(CaPin, u64)>,
}

impl HostIdentity {
    pub fn load(
        data_dir: &Path,
        authorities: &Authorities,
        proxy_id: &str,
        names: Vec<String>,
    ) -> anyhow::Result<Self> {
        let path = data_dir.join(HOST_KEY_FILE);
        let key = match std::fs::read_to_string(&path) {
            Ok(text) => PrivateKey::from_openssh(text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)?;
                write_private_atomic(&path, key.to_openssh(LineEnding::LF)?.as_bytes())?;
                key
            }
            Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        };
        let (config, issued) = Self::issue(&key, authorities, proxy_id, &names)?;
        Ok(Self {
            key,
            proxy_id: proxy_id.to_string(),
            names,
            config: RwLock::new(config),
            issued: Mutex::new(issued),
        })
    }

    fn issue(
        key: &PrivateKey,
        authorities: &Authorities,
        proxy_id: &str,
        names: &[String],
    ) -> anyhow::Result<(Arc<russh::server::Config>, (CaPin, u64))> {
        let cert = authorities.sign_proxy_ssh(key.public_key(), proxy_id, names)?;
        let (from, to) = (cert.valid_after(), cert.valid_before());
        let due = from.saturating_add(to.saturating_sub(from) / 3 * 2);
        let config = Arc::new(burrow_sshd::server_config(key.clone(), cert));
        Ok((config, (*authorities.server_pin(), due)))
    }

    /// The configuration new connections get.
    pub fn config(&self) -> Arc<russh::server::Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Issues the host certificate again if it is due or its CA changed.
    pub fn refresh(&self, authorities: &Authorities, now: u64) -> anyhow::Result<()> {
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        if issued.0 == *authorities.server_pin() && now < issued.1 {
            return Ok(());
        }
        let (config, next) = Self::issue(&self.key, authorities, &self.proxy_id, &self.names)?;
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        *issued = next;
        tracing::info!("issued the SSH jump host's host certificate again");
        Ok(())
    }
}

/// What an unauthenticated client may hold: a place among the unauthenticated connections
/// (sshd's MaxStartups), for at most the login grace time (sshd's LoginGraceTime).
pub struct Gate {
    startups: Arc<ConnectionGate>,
    grace: Duration,
}

impl Gate {
    pub fn new(limits: &Limits) -> Self {
        Self {
            startups: ConnectionGate::new(
                limits.ssh_max_startups,
                limits.ssh_max_startups_per_source,
            ),
            grace: limits.ssh_login_grace_time,
        }
    }
}

/// Accepts SSH connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    host: Arc<HostIdentity>,
    gate: Gate,
    auth: Arc<ClusterAuth>,
    tunnels: Arc<TunnelServer>,
    shutdown: CancellationToken,
) {
    while let Some((tcp, peer)) = burrow_daemon::accept(&listener, &shutdown).await {
        let Some(startup) = gate.startups.enter(peer.ip()) else {
            tracing::debug!(%peer, "SSH connection dropped: too many unauthenticated connections");
            tunnels.metrics().rate_limited("ssh_startups");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        burrow_sshd::keep_alive(&tcp);
        let (authenticated, grace_over) = oneshot::channel();
        let handler = JumpHandler {
            auth: auth.clone(),
            tunnels: tunnels.clone(),
            peer,
            user: None,
            sessions: HashMap::new(),
            unauthenticated: Some((startup, authenticated)),
        };
        let config = host.config();
        let grace = gate.grace;
        tokio::spawn(async move {
            let peer = peer.to_string();
            burrow_sshd::serve_with_grace(config, tcp, handler, grace, grace_over, &peer).await;
        });
    }
}

struct JumpHandler {
    auth: Arc<ClusterAuth>,
    tunnels: Arc<TunnelServer>,
    peer: SocketAddr,
    /// The certificate's key id, once authenticated.
    user: Option<String>,
    /// Session channels waiting for a `proxy:` subsystem request.
    sessions: HashMap<ChannelId, Channel<Msg>>,
    /// Until the user authenticates: the connection's place among the unauthenticated ones, and
    /// the signal that stops the login grace timer.
    unauthenticated: Option<(GatePermit, oneshot::Sender<()>)>,
}

/// The one service a node's tunnel carries: its SSH server.
const NODE_SSH_PORT: u16 = 3022;

/// The node port a client asked for, as the tunnel knows it: OpenSSH's default (22, what `ssh
/// -J user@proxy login@node` asks for without `-p`) and 3022 both mean the node's SSH service.
fn node_port(node: &str, port: u32) -> Result<u16, String> {
    match port {
        22 | 3022 => Ok(NODE_SSH_PORT),
        _ => Err(format!(
            "node {node:?} serves SSH only, on port 22 or 3022, not {port}"
        )),
    }
}

/// `NODE:PORT` from a jump target; the port defaults to the node's SSH port.
fn parse_target(spec: &str) -> Option<(&str, u16)> {
    match spec.rsplit_once(':') {
        Some((node, port)) => Some((node, port.parse().ok()?)),
        None => Some((spec, NODE_SSH_PORT)),
    }
    .filter(|(node, _)| !node.is_empty())
}

impl JumpHandler {
    async fn dial(
        &self,
        node: &str,
        port: u16,
    ) -> Result<(burrow_tunnel::TunnelStream, bytes::BytesMut), String> {
        self.tunnels
            .dial(node, port, &self.peer.to_string())
            .await
            .map_err(|e| e.to_string())
    }
}

/// Carries bytes between an SSH channel and a dial stream until either side ends.
async fn pipe(
    channel: Channel<Msg>,
    stream: burrow_tunnel::TunnelStream,
    leftover: bytes::BytesMut,
    open: crate::metrics::OpenGauge,
) {
    let _open = open;
    let mut channel = channel.into_stream();
    let mut stream = stream;
    if !leftover.is_empty() && channel.write_all(&leftover).await.is_err() {
        return;
    }
    // 64 KiB at a time (tokio's default is 8 KiB): fewer, fuller SSH packets to the client.
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut channel, &mut stream, COPY_BUF, COPY_BUF)
        .await;
}

impl russh::server::Handler for JumpHandler {
    type Error = russh::Error;

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let user_cas = self.auth.authorities().user_ssh_cas();
        match burrow_sshd::check_user_certificate(cert, &user_cas, burrow_daemon::unix_now()) {
            Ok(()) => {
                tracing::info!(peer = %self.peer, login = user, user = cert.key_id(), "SSH user authenticated at the proxy");
                self.user = Some(cert.key_id().to_string());
                if let Some((place, authenticated)) = self.unauthenticated.take() {
                    drop(place);
                    let _ = authenticated.send(());
                }
                Ok(Auth::Accept)
            }
            Err(why) => {
                tracing::warn!(peer = %self.peer, login = user, %why, "SSH certificate refused");
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
        self.sessions.insert(channel.id(), channel);
        reply.accept().await;
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
        // russh gives a refused channel no description: the log says why.
        let port = match node_port(host, port) {
            Ok(port) => port,
            Err(why) => {
                tracing::warn!(user = ?self.user, node = host, %why, "cannot forward to node");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return Ok(());
            }
        };
        match self.dial(host, port).await {
            Ok((stream, leftover)) => {
                tracing::info!(user = ?self.user, node = host, port, peer = %self.peer, "forwarding to node");
                reply.accept().await;
                let open = self.tunnels.metrics().ssh_session();
                tokio::spawn(pipe(channel, stream, leftover, open));
            }
            Err(why) => {
                tracing::warn!(user = ?self.user, node = host, port, %why, "cannot forward to node");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel_id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let target = name.strip_prefix("proxy:").and_then(parse_target);
        let Some(channel) = self.sessions.remove(&channel_id) else {
            session.channel_failure(channel_id)?;
            return Ok(());
        };
        let Some((node, port)) = target else {
            session.channel_failure(channel_id)?;
            return Ok(());
        };
        let dialed = match node_port(node, port.into()) {
            Ok(port) => self.dial(node, port).await,
            Err(why) => Err(why),
        };
        match dialed {
            Ok((stream, leftover)) => {
                tracing::info!(user = ?self.user, node, port, peer = %self.peer, "forwarding to node (subsystem)");
                session.channel_success(channel_id)?;
                let open = self.tunnels.metrics().ssh_session();
                tokio::spawn(pipe(channel, stream, leftover, open));
            }
            Err(why) => {
                tracing::warn!(user = ?self.user, node, port, %why, "cannot forward to node");
                // The user's ssh shows this on its stderr.
                session.channel_success(channel_id)?;
                let handle = session.handle();
                tokio::spawn(async move {
                    let _ = handle
                        .extended_data(channel_id, 1, format!("burrow: {why}\r\n").into_bytes())
                        .await;
                    let _ = handle.exit_status_request(channel_id, 1).await;
                    let _ = handle.eof(channel_id).await;
                    let _ = handle.close(channel_id).await;
                    drop(channel);
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(parse_target("pi:3022"), Some(("pi", 3022)));
        assert_eq!(parse_target("pi"), Some(("pi", 3022)));
        assert_eq!(parse_target("pi:x"), None);
        assert_eq!(parse_target(":22"), None);
    }

    #[test]
    fn port_22_and_3022_are_the_nodes_ssh_and_others_are_refused() {
        assert_eq!(node_port("pi", 22), Ok(3022));
        assert_eq!(node_port("pi", 3022), Ok(3022));
        assert_eq!(
            node_port("pi", 80),
            Err("node \"pi\" serves SSH only, on port 22 or 3022, not 80".into())
        );
    }
}
