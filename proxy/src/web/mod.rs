//! The HTTPS web port: find, join and the admin API.
//!
//! The proxy owns the TLS accept loop (instead of a framework's) because the same port will also
//! carry tunnels, told apart by ALPN. A client certificate is optional on this port; when one is
//! presented, rustls has checked it against the host CA, and the admin API then requires its role
//! to be admin.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, FromRequestParts, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tunnel_proto::api::{
    self, FindResponse, JoinRequest, StatusResponse, TokenAddRequest, TokenList,
    TokenRemoveRequest, TokenRemoved,
};

use crate::auth::Auth;
use crate::auth::ca::CertRole;
use crate::backend::Backend;
use crate::ratelimit::{ConnectionGate, FailureLimiter, GatePermit};
use crate::registry::{self, Health};
use crate::tunnel::{self, TunnelServer};

mod failure;
mod sessions;
mod upgrade;

pub use self::failure::ApiFailure;
use self::failure::{backend_failure, body_failure, internal, parse_body};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Failed joins allowed from one address in a burst, then one per interval.
const JOIN_FAILURE_BURST: u32 = 10;
const JOIN_FAILURE_REFILL: Duration = Duration::from_secs(6);

pub struct WebState {
    pub auth: Arc<Auth>,
    pub recordings: Arc<crate::recordings::Recordings>,
    pub tunnels: Arc<TunnelServer>,
    pub backend: Arc<dyn Backend>,
    pub health: Arc<Health>,
    pub proxy_id: String,
    pub public_addr: Option<String>,
    /// Where users jump through to nodes, if this proxy serves SSH.
    pub ssh_addr: Option<String>,
    /// Where agents should open tunnels, as `find` tells them; empty: the address they use for
    /// the web API.
    pub tunnel_addrs: Vec<api::TunnelAddr>,
    pub limiter: FailureLimiter,
    /// A whole request (headers, body, answer) must be done within this time.
    pub request_timeout: Duration,
    /// Connections that are not (yet) tunnels, in all and per source.
    pub connections: Arc<ConnectionGate>,
    /// Tunnels inside an HTTP Upgrade: the dedicated listener's TLS (cluster certificate, node
    /// certificate required).
    pub tunnel_tls: Arc<ServerConfig>,
}

/// The limiter for failed joins.
pub fn join_limiter() -> FailureLimiter {
    FailureLimiter::new(JOIN_FAILURE_BURST, JOIN_FAILURE_REFILL)
}

/// What the TLS layer learned about the connection a request came on.
#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddr,
    role: Option<CertRole>,
}

pub fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route(api::FIND_PATH, get(find))
        .route(api::JOIN_PATH, post(join))
        .route(api::STATUS_PATH, get(status))
        .route(api::TOKENS_PATH, get(tokens_list).post(tokens_add))
        .route(api::TOKENS_REMOVE_PATH, post(tokens_remove))
        .route(api::PROXIES_PATH, get(proxies_list))
        .route(api::NODES_PATH, get(nodes_list))
        .route(api::AUTH_SIGN_PATH, post(auth_sign))
        .route(api::AUTH_EXPORT_PATH, get(auth_export))
        .route(api::AUTH_RENEW_ADMIN_PATH, post(auth_renew_admin))
        .route(api::AUTH_ROTATE_PATH, post(auth_rotate))
        .route(api::SESSIONS_PATH, get(sessions::list))
        .route(api::SESSION_CAST_PATH, get(sessions::cast))
        .route(api::NODES_REMOVE_PATH, post(nodes_remove))
        .route(api::READY_PATH, get(ready))
        .route(api::TUNNEL_UPGRADE_PATH, get(upgrade::tunnel))
        .fallback(|| async {
            ApiFailure::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(api::MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves HTTPS on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    state: Arc<WebState>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let tunnels = state.tunnels.clone();
    let gate = state.connections.clone();
    let request_timeout = state.request_timeout;
    let router = router(state);
    let tracker = TaskTracker::new();
    while let Some((tcp, addr)) = burrow_daemon::accept(&listener, &shutdown).await {
        let Some(place) = gate.enter(addr.ip()) else {
            tracing::debug!(peer = %addr, "web connection dropped: too many from this source");
            tunnels.metrics().rate_limited("web_connections");
            continue;
        };
        let connection = Connection {
            tcp,
            addr,
            place,
            acceptor: acceptor.clone(),
            router: router.clone(),
            tunnels: tunnels.clone(),
            request_timeout,
        };
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = serve_connection(connection, shutdown).await {
                tracing::debug!(peer = %addr, error = %e, "web connection ended with an error");
            }
        });
    }
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("web connections still open after the shutdown grace period");
    }
    Ok(())
}

/// One accepted connection on the web port and what serving it needs.
struct Connection {
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    /// Its place among the source's connections, given back when it becomes a tunnel or ends.
    place: GatePermit,
    acceptor: TlsAcceptor,
    router: Router,
    tunnels: Arc<TunnelServer>,
    request_timeout: Duration,
}

async fn serve_connection(c: Connection, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Connection {
        tcp,
        addr,
        place,
        acceptor,
        router,
        tunnels,
        request_timeout,
    } = c;
    let _ = tcp.set_nodelay(true);
    burrow_tunnel::set_tcp_keepalive(
        &tcp,
        burrow_tunnel::Keepalive::default_for(burrow_tunnel::Transport::Tcp),
    );
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
            return Ok(());
        }
        Err(_) => {
            tracing::debug!(peer = %addr, "TLS handshake timed out");
            return Ok(());
        }
    };
    if tunnel::is_tunnel_alpn(tls.get_ref().1.alpn_protocol()) {
        // A tunnel is authenticated: it no longer counts against its source.
        drop(place);
        tunnels.accept(burrow_tunnel::accept_tls(tls, addr));
        return Ok(());
    }
    let role = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        // A resumed session's certificate was checked when it began: it must still be current.
        .filter(|leaf| burrow_net::tls::is_current(leaf, burrow_daemon::unix_now()))
        .and_then(|leaf| CertRole::of_certificate(leaf));
    let peer = Peer { addr, role };
    // An upgrade to a tunnel takes the connection's place over until its inner handshake is done.
    let place = upgrade::Place(Arc::new(std::sync::Mutex::new(Some(place))));
    let held = place.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        req.extensions_mut().insert(held.clone());
        let answer = router.clone().oneshot(req);
        // The whole request, body included: a client trickling its body cannot hold the
        // connection (hyper's header timeout only covers the headers).
        async move {
            match tokio::time::timeout(request_timeout, answer).await {
                Ok(response) => response,
                Err(_) => Ok(ApiFailure::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request did not arrive within {}s",
                        request_timeout.as_secs()
                    ),
                )
                .into_response()),
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();
    tokio::pin!(conn);
    let _place = place;
    tokio::select! {
        r = conn.as_mut() => r?,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await?;
        }
    }
    Ok(())
}

async fn find(State(state): State<Arc<WebState>>) -> Json<FindResponse> {
    let a = state.auth.authorities();
    Json(FindResponse {
        cluster_name: a.cluster_name.clone(),
        server_version: tunnel_proto::VERSION.to_string(),
        host_ca_certs: a.host_ca_certs(),
        tunnel_addrs: state.tunnel_addrs.clone(),
    })
}

async fn join(
    State(state): State<Arc<WebState>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<api::JoinResponse>, ApiFailure> {
    let ip = peer.addr.ip();
    if !state.limiter.allowed(ip, Instant::now()) {
        tracing::warn!(peer = %peer.addr, "join refused: too many failed attempts from this address");
        let metrics = state.tunnels.metrics();
        metrics.rate_limited("join");
        metrics.join("rate_limited");
        return Err(ApiFailure::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many failed join attempts from this address; wait a minute and try again",
        ));
    }
    let result = async {
        let body = body.map_err(body_failure)?;
        let req: JoinRequest = serde_json::from_slice(&body).map_err(|e| {
            ApiFailure::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the join request is malformed: {e}"),
            )
        })?;
        Ok::<_, ApiFailure>(state.auth.join(req).await?)
    }
    .await;
    state
        .tunnels
        .metrics()
        .join(result.as_ref().map_or_else(|f| f.code, |_| "ok"));
    match result {
        Ok(resp) => Ok(Json(resp)),
        Err(failure) => {
            if failure.status.is_client_error() {
                state.limiter.failed(ip, Instant::now());
                tracing::warn!(peer = %peer.addr, code = failure.code, reason = %failure.message, "join refused");
            }
            Err(failure)
        }
    }
}

/// Proof that a request came with the cluster's admin identity: an admin route takes it as an
/// argument, and axum answers 401 before the handler runs when it cannot be had.
pub(crate) struct Admin;

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Peer>() {
            Some(peer) if peer.role == Some(CertRole::Admin) => Ok(Admin),
            _ => Err(ApiFailure::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this endpoint needs the cluster's admin identity (burrowctl --identity)",
            )),
        }
    }
}

async fn status(
    State(state): State<Arc<WebState>>,
    _: Admin,
) -> Result<Json<StatusResponse>, ApiFailure> {
    Ok(Json(status_of(&state, &state.auth.authorities())))
}

fn status_of(state: &WebState, a: &crate::auth::ca::Authorities) -> StatusResponse {
    StatusResponse {
        cluster_name: a.cluster_name.clone(),
        version: tunnel_proto::VERSION.to_string(),
        ca_pins: a.pins().iter().map(ToString::to_string).collect(),
        public_addr: state.public_addr.clone(),
        ssh_addr: state.ssh_addr.clone(),
        rotation: a.rotation().cloned(),
    }
}

/// `burrowctl auth rotate`: a CA rotation started, moved to a phase, or rolled back.
async fn auth_rotate(
    State(state): State<Arc<WebState>>,
    _: Admin,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<StatusResponse>, ApiFailure> {
    use crate::auth::rotation::{CaType, Phase};
    let req: api::RotateRequest = parse_body(body)?;
    let bad = |m: String| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", m);
    let ca_type = CaType::parse(&req.ca_type).ok_or_else(|| {
        bad(format!(
            "unknown CA type {:?}: expected host or user",
            req.ca_type
        ))
    })?;
    let phase = match req.phase.as_deref() {
        None => None,
        Some(p) => Some(Phase::parse(p).ok_or_else(|| {
            bad(format!(
                "unknown phase {p:?}: expected init, update_clients, update_servers, standby or rollback"
            ))
        })?),
    };
    let grace = req.grace_period_secs.map(Duration::from_secs);
    let a = state.auth.rotate(ca_type, phase, grace).await?;
    tracing::info!(
        ca = ca_type.as_str(),
        phase = phase.map_or("init (automatic)", Phase::as_str),
        "CA rotation moved by an admin"
    );
    Ok(Json(status_of(&state, &a)))
}

async fn ready(State(state): State<Arc<WebState>>) -> Result<Json<api::Readiness>, ApiFailure> {
    match state.health.status() {
        Ok(()) => Ok(Json(api::Readiness {
            status: "ready".into(),
            proxy_id: state.proxy_id.clone(),
        })),
        // Anyone may ask: the reason (a backend's address, its error) stays in the log.
        Err(why) => {
            tracing::debug!(%why, "readiness probe: not ready");
            Err(ApiFailure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "not ready: the state backend is unreachable",
            ))
        }
    }
}

async fn proxies_list(
    State(state): State<Arc<WebState>>,
    _: Admin,
) -> Result<Json<api::ProxyList>, ApiFailure> {
    let proxies = registry::list(state.backend.as_ref())
        .await
        .map_err(backend_failure)?;
    Ok(Json(api::ProxyList { proxies }))
}

/// Longest user certificate `burrowctl auth sign` issues.
const MAX_USER_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

async fn auth_sign(
    State(state): State<Arc<WebState>>,
    _: Admin,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<api::SignResponse>, ApiFailure> {
    let req: api::SignRequest = parse_body(body)?;
    let bad = |m: String| ApiFailure::new(StatusCode::BAD_REQUEST, "bad_request", m);
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.len() <= 64
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
    };
    if !valid_name(&req.user) {
        return Err(bad(format!("user {:?} is invalid", req.user)));
    }
    if req.logins.is_empty() || !req.logins.iter().all(|l| valid_name(l)) {
        return Err(bad("logins must be one or more valid OS user names".into()));
    }
    let ttl = Duration::from_secs(req.ttl_seconds);
    if ttl.is_zero() || ttl > MAX_USER_CERT_TTL {
        return Err(bad("the TTL must be between 1s and 30 days".into()));
    }
    if let Some(command) = &req.permissions.force_command
        && (command.trim().is_empty() || command.len() > 4096 || command.contains('\0'))
    {
        return Err(bad(
            "force_command must be a non-empty command of at most 4096 bytes".into(),
        ));
    }
    let key = russh::keys::ssh_key::PublicKey::from_openssh(req.public_key.trim())
        .map_err(|_| bad("public_key is not an OpenSSH public key".into()))?;
    let cert = state
        .auth
        .authorities()
        .sign_user_ssh(&key, &req.user, &req.logins, ttl, &req.permissions)
        .and_then(|c| Ok(c.to_openssh()?))
        .map_err(internal)?;
    tracing::info!(user = %req.user, logins = %req.logins.join(","), ttl = ?ttl, permissions = ?req.permissions, "user certificate issued");
    Ok(Json(api::SignResponse { certificate: cert }))
}

#[derive(Deserialize)]
struct ExportQuery {
    #[serde(rename = "type")]
    kind: String,
}

async fn auth_export(
    State(state): State<Arc<WebState>>,
    _: Admin,
    Query(q): Query<ExportQuery>,
) -> Result<Json<api::ExportResponse>, ApiFailure> {
    let a = state.auth.authorities();
    let keys = match q.kind.as_str() {
        "host" | "krl" => a.host_ssh_publics(),
        "user" => a.user_ssh_publics(),
        other => {
            return Err(ApiFailure::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("unknown export type {other:?}: expected host, user or krl"),
            ));
        }
    };
    let revoked_key_ids = if q.kind == "krl" {
        crate::inventory::revoked_host_ids(state.backend.as_ref())
            .await
            .map_err(backend_failure)?
            .iter()
            .map(|id| api::host_cert_key_id(id))
            .collect()
    } else {
        Vec::new()
    };
    Ok(Json(api::ExportResponse {
        kind: q.kind,
        keys,
        cluster_name: a.cluster_name.clone(),
        revoked_key_ids,
    }))
}

/// A new admin identity for the admin who asks (with the current one).
async fn auth_renew_admin(
    State(state): State<Arc<WebState>>,
    _: Admin,
) -> Result<Json<api::AdminIdentity>, ApiFailure> {
    let identity = crate::certs::admin_identity(&state.auth.authorities()).map_err(internal)?;
    tracing::info!("issued a renewed admin identity");
    Ok(Json(api::AdminIdentity { identity }))
}

async fn nodes_list(
    State(state): State<Arc<WebState>>,
    _: Admin,
) -> Result<Json<api::NodeList>, ApiFailure> {
    let nodes = crate::inventory::inventory(state.backend.as_ref())
        .await
        .map_err(backend_failure)?;
    Ok(Json(api::NodeList { nodes }))
}

async fn nodes_remove(
    State(state): State<Arc<WebState>>,
    _: Admin,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<api::NodeRemoved>, ApiFailure> {
    let req: api::NodeRemoveRequest = parse_body(body)?;
    if !crate::inventory::revoke(state.backend.as_ref(), &req.host_id)
        .await
        .map_err(backend_failure)?
    {
        return Err(ApiFailure::new(
            StatusCode::NOT_FOUND,
            "node_not_found",
            format!(
                "no node with host id {} is known to the cluster",
                req.host_id
            ),
        ));
    }
    // Close its tunnels here at once; other proxies see the revocation through the backend.
    state
        .tunnels
        .disconnect(&req.host_id, "the node was removed from the cluster");
    tracing::info!(host_id = %req.host_id, "node removed and revoked");
    Ok(Json(api::NodeRemoved {
        host_id: req.host_id,
    }))
}

async fn tokens_add(
    State(state): State<Arc<WebState>>,
    _: Admin,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<api::TokenAdded>, ApiFailure> {
    let req: TokenAddRequest = parse_body(body)?;
    let added = state
        .auth
        .tokens
        .add(
            req.roles,
            Duration::from_secs(req.ttl_seconds),
            req.value,
            req.labels,
        )
        .await?;
    tracing::info!(token = %added.id, roles = %api::Role::join_list(&added.roles), "join token created");
    Ok(Json(added))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    with_secrets: bool,
}

async fn tokens_list(
    State(state): State<Arc<WebState>>,
    _: Admin,
    Query(q): Query<ListQuery>,
) -> Result<Json<TokenList>, ApiFailure> {
    let tokens = state.auth.tokens.list(q.with_secrets).await?;
    Ok(Json(TokenList { tokens }))
}

async fn tokens_remove(
    State(state): State<Arc<WebState>>,
    _: Admin,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenRemoved>, ApiFailure> {
    let req: TokenRemoveRequest = parse_body(body)?;
    let id = state.auth.tokens.remove(&req.token).await?;
    tracing::info!(token = %id, "join token revoked");
    Ok(Json(TokenRemoved { id }))
}
