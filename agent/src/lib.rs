//! burrow-agent: the node side of Burrow.
//!
//! What lives here:
//! - [`config`]: flags, YAML and defaults, merged into a validated [`config::AgentConfig`].
//! - [`join`]: joining a cluster through the proxy's web port with a token and a CA pin.
//! - [`identity`]: the node's keys and certificates, stored atomically in the data dir.
//! - [`labels`]: static and command labels.
//! - [`pool`]: one tunnel to every proxy, with backoff, transport fallback and keep-alives.
//! - [`renew`]: the node's certificates renewed over a tunnel before they expire.
//! - [`record`]: session recordings (asciicast v2) spooled in the data dir and sent to a proxy.
//! - [`telemetry`]: metrics, readiness and the status file; [`status`]: `burrow-agent status`.
//!
//! `main` parses the command line and calls [`run`], which tests can call too.

pub mod config;
pub mod identity;
pub mod join;
pub mod labels;
pub mod pool;
pub mod record;
pub mod renew;
pub mod ssh;
pub mod status;
pub mod telemetry;

use std::sync::Arc;

use burrow_net::tls;
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tunnel_proto::secret::{Secret, token_from_arg};

use crate::config::{AgentConfig, TokenSource};
use crate::identity::Identity;
use crate::join::{JoinError, JoinParams};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A problem with what the user gave: exit code 2.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The cluster removed this node: exit code 3, which the systemd unit does not restart.
    #[error("{0}")]
    Revoked(String),
    /// The node's certificates expired (it was offline too long): exit code 3 too.
    #[error("{0}")]
    Expired(String),
    #[error("{0:#}")]
    Runtime(#[from] anyhow::Error),
}

impl AgentError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) => 2,
            AgentError::Revoked(_) | AgentError::Expired(_) => 3,
            _ => 1,
        }
    }
}

/// The tunnel transports to `addr`, best first: over an egress proxy, only those over TCP (an
/// HTTP proxy carries no UDP, so QUIC is not even tried).
fn transports_for(
    mode: pool::TransportMode,
    addr: &str,
) -> Result<Vec<burrow_tunnel::Transport>, AgentError> {
    let Some(egress) = burrow_net::egress::for_target(addr) else {
        return Ok(mode.ladder());
    };
    match mode {
        pool::TransportMode::Quic => Err(AgentError::Config(format!(
            "transport quic cannot go through the egress proxy {egress} (it carries TCP only): use auto, tcp or upgrade, or name {addr} in NO_PROXY"
        ))),
        _ => {
            tracing::info!(%addr, egress_proxy = %egress, "tunnels go over TCP through the egress proxy");
            let mut ladder = mode.ladder();
            ladder.retain(|t| *t != burrow_tunnel::Transport::Quic);
            Ok(ladder)
        }
    }
}

/// Runs the agent until `shutdown` is cancelled: loads the node's identity, or joins the cluster
/// to get one.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    if let Some((egress, from)) = &config.egress {
        tracing::info!(egress_proxy = %egress, from, "connections to the cluster go out through an HTTP proxy (CONNECT)");
        burrow_net::egress::install(egress.clone());
        // Said before anything is done, where it can be known now.
        transports_for(config.transport, &config.proxy)?;
    }
    let identity = match Identity::load(&config.data_dir)? {
        Some(identity) => {
            tracing::info!(
                host_id = %identity.host_id,
                node = %identity.node_name,
                cluster = %identity.cluster_name,
                "loaded the node's identity; no token needed"
            );
            identity
        }
        None => {
            tunnel_proto::api::validate_node_name(&config.nodename).map_err(AgentError::Config)?;
            let token = read_token(&config.token)?;
            tracing::info!(proxy = %config.proxy, node = %config.nodename, "joining the cluster");
            let identity = join::join(JoinParams {
                proxy: &config.proxy,
                token,
                node_name: &config.nodename,
                ca_pins: &config.ca_pins,
                insecure: config.insecure,
                public_roots: config.trust_public_web_cert,
            })
            .await?;
            identity.save(&config.data_dir)?;
            tracing::info!(
                host_id = %identity.host_id,
                node = %identity.node_name,
                cluster = %identity.cluster_name,
                "joined the cluster"
            );
            identity
        }
    };
    check_not_expired(&identity, &config.data_dir)?;
    let base = labels::merge(&[&identity.labels, &config.labels]);
    let labels = labels::spawn(base, config.commands.clone(), shutdown.clone());
    let cas = host_cas(&identity)?;
    let tls = tunnel_tls(&identity, &cas, config.trust_public_web_cert)?;
    let addr = join::find_tunnel_addr(&config.proxy, &cas, config.trust_public_web_cert)
        .await
        .unwrap_or_else(|| config.proxy.clone());
    let recordings = Arc::new(record::Uploader::new(&config.data_dir));
    let mut ssh = ssh::SshContext::new(&identity, config.permit_open.clone())?;
    ssh.recordings = Some(recordings.clone());
    let ssh = Arc::new(ssh);
    if let Some(addr) = config.ssh_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            AgentError::Runtime(anyhow::anyhow!("cannot listen for SSH on {addr}: {e}"))
        })?;
        tracing::info!(
            "SSH listening on {}",
            listener.local_addr().map_err(anyhow::Error::from)?
        );
        tokio::spawn(ssh::serve_listener(listener, ssh.clone(), shutdown.clone()));
    }
    let telemetry = Arc::new(telemetry::Telemetry::new(&addr));
    if let Some(at) = config.diag_listen {
        let listener = burrow_daemon::diag::bind(at)
            .await
            .map_err(|e| AgentError::Runtime(e.into()))?;
        let bound = listener.local_addr().map_err(anyhow::Error::from)?;
        telemetry.set_diag_addr(bound.to_string());
        tokio::spawn(burrow_daemon::diag::serve(
            listener,
            telemetry.clone(),
            shutdown.clone(),
        ));
    }
    telemetry.write_status_now(&config.data_dir);
    tracing::info!(host_id = %identity.host_id, tunnels = %addr, transport = ?config.transport, "agent ready; opening tunnels");
    let status_file = tokio::spawn(
        telemetry
            .clone()
            .write_status_file(config.data_dir.clone(), shutdown.clone()),
    );
    burrow_daemon::notify::ready_and_watchdog(shutdown.clone());
    let tls: renew::SharedTls = Arc::new(std::sync::RwLock::new(Arc::new(tls)));
    let renewer = Arc::new(renew::Renewer::new(
        identity.clone(),
        config.data_dir.clone(),
        tls.clone(),
        ssh.clone(),
        config.trust_public_web_cert,
    ));
    let ladder = transports_for(config.transport, &addr)?;
    let stopped = pool::run(
        pool::PoolConfig {
            addr,
            web_addr: config.proxy.clone(),
            ladder,
            tls,
            host_id: identity.host_id.clone(),
            node_name: identity.node_name.clone(),
            labels,
            keepalive: config.keepalive,
            window: config.window,
            dials: ssh,
            held: tokio::sync::watch::Sender::new(0),
            telemetry: Some(telemetry),
            renewer: Some(renewer),
            recordings: Some(recordings),
        },
        shutdown.clone(),
    )
    .await
    .map_err(|e| match e {
        e @ pool::PoolError::Revoked { .. } => AgentError::Revoked(e.to_string()),
        pool::PoolError::Io(e) => AgentError::Runtime(e.into()),
    });
    // The status file's last word: stopped.
    shutdown.cancel();
    let _ = status_file.await;
    stopped?;
    tracing::info!("agent stopped");
    Ok(())
}

/// Refuses to start on certificates that expired while the node was offline: no proxy would take
/// them, and only a new join gives new ones.
fn check_not_expired(identity: &Identity, data_dir: &std::path::Path) -> Result<(), AgentError> {
    let Some((_, not_after)) = tls::validity(&identity.tls_cert) else {
        return Ok(());
    };
    if burrow_daemon::unix_now() < not_after {
        return Ok(());
    }
    let at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(not_after),
    );
    Err(AgentError::Expired(format!(
        "this node's certificates expired at {at}, while it could not reach the cluster to renew them; to join again, move {} away and start with a new token",
        data_dir.join(identity::IDENTITY_FILE).display()
    )))
}

/// The cluster's host CA certificates from the identity.
pub fn host_cas(identity: &Identity) -> Result<Vec<CertificateDer<'static>>, AgentError> {
    let mut cas = Vec::new();
    for pem in &identity.host_ca_certs {
        cas.extend(tls::parse_certs(pem, "host CA certificate").map_err(unusable)?);
    }
    Ok(cas)
}

/// The TLS of tunnels: mutual TLS with the node's certificate, and only the cluster's host CA
/// for proxies (never public roots: whoever holds a public certificate for the name, a balancer
/// that terminates TLS for one, must not pass for a proxy); and, for tunnels inside an HTTP
/// upgrade, the web API's TLS to the web address (public roots too, with `public_roots`).
pub fn tunnel_tls(
    identity: &Identity,
    cas: &[CertificateDer<'static>],
    public_roots: bool,
) -> Result<burrow_tunnel::TunnelTls, AgentError> {
    let chain = tls::parse_certs(&identity.tls_cert, "node certificate").map_err(unusable)?;
    let key = tls::parse_key(identity.tls_key.expose(), "node key").map_err(unusable)?;
    let tunnel = tls::cluster_client_config(
        cas,
        Some(tls::ClientIdentity { chain, key }),
        false,
        &[tunnel_proto::wire::ALPN_TUNNEL],
    )
    .map_err(unusable)?;
    let web = tls::cluster_client_config(cas, None, public_roots, &[burrow_net::tls::ALPN_HTTP1])
        .map_err(unusable)?;
    Ok(burrow_tunnel::TunnelTls {
        tunnel: Arc::new(tunnel),
        web: Arc::new(web),
    })
}

fn unusable(e: tls::TlsError) -> AgentError {
    AgentError::Runtime(anyhow::anyhow!("the stored identity is unusable: {e}"))
}

fn read_token(source: &TokenSource) -> Result<Secret, AgentError> {
    match source {
        TokenSource::Given(arg) => token_from_arg(arg).map_err(AgentError::Config),
        TokenSource::DefaultFile(path) => {
            if !path.exists() {
                return Err(AgentError::Config(format!(
                    "this node has not joined a cluster yet and has no join token: pass --token or write one to {}",
                    path.display()
                )));
            }
            token_from_arg(&path.to_string_lossy()).map_err(AgentError::Config)
        }
    }
}
