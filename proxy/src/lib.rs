//! burrow-proxy: the cluster side of Burrow.
//!
//! What lives here:
//! - [`config`]: flags, YAML and defaults, merged into a validated [`config::ProxyConfig`].
//! - [`backend`]: the [`backend::Backend`] trait for cluster state; redb and etcd.
//! - [`auth`]: the certificate authorities, their rotation, join tokens and node joins.
//! - [`certs`]: the proxy's own certificates and client roots, kept current while it runs.
//! - [`registry`]: the proxy's registration under a lease, and its readiness.
//! - [`state`]: every backend key and the node record, in one place.
//! - [`tunnel`]: the tunnel server: authentication, the tunnel table, presence, the proxy list
//!   pushed to agents, revocations followed from the backend.
//! - [`inventory`]: nodes as the cluster knows them: `nodes ls`, `nodes rm`, node names.
//! - [`nodelimits`]: what a joined node may make the proxy do (rates, sizes, counts).
//! - [`audit`]: the audit log, written by a thread of its own.
//! - [`recordings`]: session recordings nodes send, stored, indexed and served.
//! - [`sshproxy`]: the SSH jump host (port 3023).
//! - [`web`]: the HTTPS web port (find, join, admin API, and TCP tunnels by ALPN).
//! - [`metrics`]: Prometheus metrics and readiness for the diagnostics listener.
//!
//! `main` parses the command line and calls [`run`], which tests can call too.

pub mod audit;
pub mod auth;
pub mod backend;
pub mod certs;
pub mod config;
pub mod heap;
pub mod inventory;
pub mod metrics;
pub mod nodelimits;
pub mod ratelimit;
pub mod recordings;
pub mod registry;
pub mod resume;
pub mod sshproxy;
pub mod state;
pub mod tickets;
pub mod tunnel;
pub mod web;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use burrow_daemon::fsutil::{ensure_private_dir, write_private_atomic};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tunnel_proto::wire::ALPN_TUNNEL;

use crate::auth::ca::new_host_id;
use crate::auth::{Auth, AuthError};
use crate::backend::{Backend, EtcdBackend, RedbBackend};
use crate::config::{ProxyConfig, Storage};
use crate::registry::Health;

/// File in the data dir holding the admin identity `burrowctl` uses on this host.
pub const ADMIN_IDENTITY_FILE: &str = "admin-identity";
/// File in the data dir holding the address `burrowctl` reaches this proxy's web API at.
pub const WEB_ADDR_FILE: &str = "web-addr";
const STATE_FILE: &str = "state.redb";
/// File in the data dir holding this proxy's id, stable across restarts.
const PROXY_ID_FILE: &str = "proxy-id";
/// The secret behind this proxy's QUIC stateless resets and connection IDs (kept across restarts).
const QUIC_SECRET_FILE: &str = "quic-secret";
/// QUIC's TLS sessions, kept across restarts (sealed with keys from the QUIC secret).
const QUIC_SESSIONS_FILE: &str = "quic-sessions";
const BOOTSTRAP_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the proxy until `shutdown` is cancelled.
pub async fn run(config: ProxyConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    ensure_private_dir(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let proxy_id = proxy_id(&config.data_dir)?;
    // Every tunnel holds a descriptor: 1,024 (the usual soft limit) is far from a fleet.
    let open_files = burrow_daemon::raise_fd_limit();
    tracing::debug!(open_files, "open-file limit");
    let backend: Arc<dyn Backend> = match &config.storage {
        Storage::Redb => Arc::new(RedbBackend::open(&config.data_dir.join(STATE_FILE))?),
        Storage::Etcd(etcd) => Arc::new(EtcdBackend::connect(etcd).await?),
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let backend = metrics::MeteredBackend::wrap(backend, metrics.clone());
    let Some(mut auth) = bootstrap(&config, backend.clone(), &shutdown).await? else {
        return Ok(());
    };
    auth.set_node_validity(config.node_cert_ttl)?;
    let auth = Arc::new(auth);
    let authorities = auth.authorities();
    tracing::info!(
        cluster = %authorities.cluster_name,
        ca_pin = %authorities.pin,
        version = tunnel_proto::VERSION,
        %proxy_id,
        "cluster loaded"
    );
    certs::write_admin_identity(&config.data_dir, &authorities)?;

    let quic_secret = quic_secret(&config.data_dir)?;
    let proxy_certs = certs::ProxyCerts::new(
        &authorities,
        cert_names(&config),
        &quic_secret,
        (
            config.data_dir.join(QUIC_SESSIONS_FILE),
            metrics.quic_resumptions(),
        ),
    )?;
    let sessions_saved = tokio::spawn(resume::keep_saved(
        proxy_certs.quic_sessions(),
        shutdown.clone(),
    ));
    let public_cert = match &config.https_files {
        Some((cert_file, key_file)) => Some(certs::public_cert(cert_file, key_file)?),
        None => None,
    };
    let tls = proxy_certs.web_config(public_cert)?;
    // Tunnels only on QUIC, so a node certificate is required in the handshake itself (the web
    // port's TCP side lets clients without one in, for joins): nobody else gets a session kept.
    let tunnel_tls = Arc::new(proxy_certs.tunnel_config()?);
    let quic_tls = Arc::new(proxy_certs.quic_config(&tunnel_tls));
    let (listener, bound, quic, quic_socket) =
        bind_pair(config.web_listen, quic_tls.clone(), &quic_secret).await?;

    let health = Arc::new(Health::default());
    let info = tunnel_proto::api::ProxyInfo {
        id: proxy_id.clone(),
        hostname: info_hostname(),
        version: tunnel_proto::VERSION.to_string(),
        web_addr: bound.to_string(),
        public_addr: config.public_addr.clone(),
        started: burrow_daemon::unix_now(),
    };
    let registration = tokio::spawn(registry::register(
        backend.clone(),
        info,
        health.clone(),
        shutdown.clone(),
    ));

    let recordings = Arc::new(recordings::Recordings::new(
        &config.data_dir,
        backend.clone(),
        proxy_id.clone(),
        config.session_recording,
    ));
    let tunnels = tunnel::TunnelServer::start(
        proxy_id.clone(),
        authorities.cluster_name.clone(),
        backend.clone(),
        config.data_dir.join("audit"),
        (auth.clone(), recordings.clone()),
        metrics.clone(),
        shutdown.clone(),
    )
    .await
    .context("cannot load the proxy list and revocations")?;
    let churn = tunnels.clone();
    tokio::spawn(heap::trim_when_quiet(
        move || churn.churn(),
        shutdown.clone(),
    ));
    let mut nudge_sockets = vec![quic_socket];
    tracing::info!("QUIC tunnels listening on udp {bound}");
    // QUIC handshakes in progress count as the web port's connections do (their own count).
    let quic_handshakes = ratelimit::ConnectionGate::new(
        config.limits.web_max_connections,
        config.limits.web_max_connections_per_source,
    );
    let quic_task = tokio::spawn(tunnel::serve_quic(
        quic,
        quic_handshakes,
        tunnels.clone(),
        shutdown.clone(),
    ));
    let mut tunnel_addrs = Vec::new();
    if let Some(addr) = config.tunnel_listen {
        let tls = tunnel_tls.clone();
        let (listener, bound, quic, quic_socket) =
            bind_pair(addr, quic_tls.clone(), &quic_secret).await?;
        nudge_sockets.push(quic_socket);
        tracing::info!("tunnels listening on tcp and udp {bound}");
        // Handshakes in progress on the tunnel port count as the web port's connections do.
        let handshakes = ratelimit::ConnectionGate::new(
            config.limits.web_max_connections,
            config.limits.web_max_connections_per_source,
        );
        tokio::spawn(tunnel::serve_tcp(
            listener,
            tls,
            handshakes.clone(),
            tunnels.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(tunnel::serve_quic(
            quic,
            handshakes,
            tunnels.clone(),
            shutdown.clone(),
        ));
        tunnel_addrs = advertised_tunnel_addrs(config.public_addr.as_deref(), bound);
    } else if let Some(public) = &config.public_addr {
        // Tunnels share the web port: the public address (a balancer, usually) as it is.
        tunnel_addrs = tunnel_addr_entries(public);
    }

    // QUIC is served: the agents this proxy held when it last stopped without a goodbye may
    // come back now.
    tokio::spawn(tunnel::nudge_former_agents(
        backend.clone(),
        proxy_id.clone(),
        nudge_sockets,
    ));

    let mut ssh_public = None;
    let mut ssh_host = None;
    if let Some(ssh_addr) = config.ssh_listen {
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            info_hostname(),
        ];
        if let Some(host) = config
            .public_addr
            .as_deref()
            .and_then(burrow_net::web::split_host)
        {
            names.push(host.to_string());
        }
        if !ssh_addr.ip().is_unspecified() {
            names.push(ssh_addr.ip().to_string());
        }
        names.sort();
        names.dedup();
        let host = Arc::new(sshproxy::HostIdentity::load(
            &config.data_dir,
            &authorities,
            &proxy_id,
            names,
        )?);
        ssh_host = Some(host.clone());
        let listener = TcpListener::bind(ssh_addr)
            .await
            .with_context(|| format!("cannot listen for SSH on {ssh_addr}"))?;
        let ssh_bound = listener.local_addr()?;
        tracing::info!("SSH jump host listening on {ssh_bound}");
        // What users jump through: the public name with this port, or where it listens.
        ssh_public = Some(
            match config
                .public_addr
                .as_deref()
                .and_then(burrow_net::web::split_host)
            {
                Some(host) if host.contains(':') => format!("[{host}]:{}", ssh_bound.port()),
                Some(host) => format!("{host}:{}", ssh_bound.port()),
                None => local_dial_addr(ssh_bound).to_string(),
            },
        );
        tokio::spawn(sshproxy::serve(
            listener,
            host,
            sshproxy::Gate::new(&config.limits),
            auth.clone(),
            tunnels.clone(),
            shutdown.clone(),
        ));
    }

    tokio::spawn(certs::keep_current(
        auth.clone(),
        proxy_certs,
        ssh_host,
        config.data_dir.clone(),
        shutdown.clone(),
    ));

    if let Some(at) = config.diag_listen {
        let listener = burrow_daemon::diag::bind(at).await?;
        let diagnostics = metrics::ProxyDiagnostics {
            proxy_id: proxy_id.clone(),
            metrics,
            health: health.clone(),
            backend: backend.clone(),
        };
        tokio::spawn(burrow_daemon::diag::serve(
            listener,
            Arc::new(diagnostics),
            shutdown.clone(),
        ));
    }
    let state = Arc::new(web::WebState {
        auth,
        recordings,
        tunnels: tunnels.clone(),
        backend,
        health,
        proxy_id,
        public_addr: config.public_addr.clone(),
        ssh_addr: ssh_public,
        tunnel_addrs,
        limiter: web::join_limiter(),
        request_timeout: config.limits.web_request_timeout,
        connections: ratelimit::ConnectionGate::new(
            config.limits.web_max_connections,
            config.limits.web_max_connections_per_source,
        ),
        tunnel_tls,
    });
    // Everything is in place: say where, for people, tests and burrowctl on this host (the file
    // first, so that whoever reads the log line finds it).
    write_private_atomic(
        &config.data_dir.join(WEB_ADDR_FILE),
        format!("{}\n", local_dial_addr(bound)).as_bytes(),
    )
    .context("cannot write the web address file")?;
    tracing::info!("web API listening on https://{bound}");
    burrow_daemon::notify::ready_and_watchdog(shutdown.clone());
    web::serve(listener, Arc::new(tls), state, shutdown).await?;
    tunnels.drain(std::time::Duration::from_secs(5)).await;
    let _ = quic_task.await;
    let _ = registration.await;
    let _ = sessions_saved.await;
    tracing::info!("proxy stopped");
    Ok(())
}

/// Loads or creates the cluster, waiting for the backend while it is unreachable. `None` if
/// shut down while waiting.
async fn bootstrap(
    config: &ProxyConfig,
    backend: Arc<dyn Backend>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Auth>> {
    loop {
        match Auth::bootstrap(
            backend.clone(),
            config.cluster_name.as_deref(),
            config.static_tokens.clone(),
        )
        .await
        {
            Ok(auth) => return Ok(Some(auth)),
            Err(AuthError::Backend(e)) if e.is_unavailable() => {
                tracing::warn!(error = %e, "waiting for the state backend");
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(BOOTSTRAP_RETRY) => {}
        }
    }
}

fn info_hostname() -> String {
    burrow_daemon::hostname().unwrap_or_default()
}

/// This proxy's id: created on the first start, then read from the data dir.
fn proxy_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(PROXY_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
    let id = new_host_id();
    write_private_atomic(&path, format!("{id}\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// The QUIC secret from the data dir, made (random, 0600) the first time. Kept so that a
/// restarted proxy can reset the connections of the process before it.
fn quic_secret(data_dir: &Path) -> anyhow::Result<[u8; burrow_tunnel::QUIC_SECRET_LEN]> {
    let path = data_dir.join(QUIC_SECRET_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            if let Ok(secret) = <[u8; burrow_tunnel::QUIC_SECRET_LEN]>::try_from(bytes.as_slice()) {
                return Ok(secret);
            }
            tracing::warn!(path = %path.display(), "the QUIC secret is damaged; making a new one");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
    let mut secret = [0u8; burrow_tunnel::QUIC_SECRET_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| anyhow::anyhow!("no randomness for the QUIC secret"))?;
    write_private_atomic(&path, &secret)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(secret)
}

/// A TCP listener at `addr` and a QUIC endpoint on the same port. With port 0 the kernel picks
/// the TCP port, and a UDP socket may already hold that number: another port is tried then (a
/// few times) rather than failing.
async fn bind_pair(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    quic_secret: &[u8; burrow_tunnel::QUIC_SECRET_LEN],
) -> anyhow::Result<(
    TcpListener,
    SocketAddr,
    quinn::Endpoint,
    std::net::UdpSocket,
)> {
    let mut tries = 0;
    loop {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let bound = listener.local_addr()?;
        match burrow_tunnel::quic_server_endpoint(bound, tls.clone(), quic_secret) {
            Ok((quic, socket)) => return Ok((listener, bound, quic, socket)),
            Err(e)
                if addr.port() == 0 && tries < 16 && e.kind() == std::io::ErrorKind::AddrInUse =>
            {
                tries += 1;
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot listen for QUIC on udp {bound}"))
                );
            }
        }
    }
}

/// The names the proxy's cluster certificate is valid for, besides the cluster's own: the public
/// host, the web port's address when it is a specific one, and 127.0.0.1.
fn cert_names(config: &ProxyConfig) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(public) = &config.public_addr
        && let Some(host) = burrow_net::web::split_host(public)
    {
        names.push(host.to_string());
    }
    if !config.web_listen.ip().is_unspecified() {
        names.push(config.web_listen.ip().to_string());
    }
    names.push("127.0.0.1".into());
    names
}

/// Where agents should open tunnels: the dedicated listener's port (or the web port) on the
/// public host when there is one, else on the bound address.
fn advertised_tunnel_addrs(
    public_addr: Option<&str>,
    bound: SocketAddr,
) -> Vec<tunnel_proto::api::TunnelAddr> {
    let host = public_addr
        .and_then(burrow_net::web::split_host)
        .map(str::to_string)
        .unwrap_or_else(|| local_dial_addr(bound).ip().to_string());
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    tunnel_addr_entries(&format!("{host}:{}", bound.port()))
}

fn tunnel_addr_entries(addr: &str) -> Vec<tunnel_proto::api::TunnelAddr> {
    ["tcp", "quic"]
        .into_iter()
        .map(|transport| tunnel_proto::api::TunnelAddr {
            transport: transport.to_string(),
            addr: addr.to_string(),
            alpn: String::from_utf8_lossy(ALPN_TUNNEL).into_owned(),
        })
        .collect()
}

/// The address a local client dials to reach a listener bound to `bound`.
fn local_dial_addr(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), bound.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), bound.port())
        }
        _ => bound,
    }
}
