//! Tunnels through a balancer that terminates TLS: `GET /v1/webapi/tunnel` with
//! `Upgrade: burrow-tunnel/1` on the web port is answered `101 Switching Protocols`, and the
//! upgraded stream then carries a tunnel exactly as the dedicated listener takes one: a TLS 1.3
//! handshake with the tunnel configuration (the proxy's cluster certificate, a node certificate
//! required and checked against the host CA), then yamux. Nothing the HTTP request says (headers,
//! a client certificate the web port saw or did not) counts towards who the node is.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tunnel_proto::api::TUNNEL_UPGRADE;

use super::{ApiFailure, Peer, WebState};
use crate::ratelimit::GatePermit;

/// A web connection's place among its source's connections, which an upgrade takes over until
/// its inner handshake is done (the HTTP connection itself ends at the upgrade).
#[derive(Clone)]
pub(super) struct Place(pub Arc<Mutex<Option<GatePermit>>>);

/// The server side of the web port's TLS stream, as hyper hands it back after an upgrade.
type WebIo = TokioIo<tokio_rustls::server::TlsStream<TcpStream>>;

pub(super) async fn tunnel(State(state): State<Arc<WebState>>, mut req: Request) -> Response {
    // hyper puts the upgrade in a request that can take one (HTTP/1.1 with the headers below).
    let can_upgrade = req
        .extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_some();
    let peer = req.extensions().get::<Peer>().cloned();
    let (true, true, Some(peer)) = (asks_for_tunnel(req.headers()), can_upgrade, peer) else {
        return upgrade_required();
    };
    // Only now, with the 101 certain: the connection's place goes with it.
    let place = req
        .extensions()
        .get::<Place>()
        .and_then(|p| p.0.lock().unwrap_or_else(|p| p.into_inner()).take());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(peer = %peer.addr, error = %e, "the tunnel upgrade did not happen");
                return;
            }
        };
        let Ok(parts) = upgraded.downcast::<WebIo>() else {
            tracing::warn!(peer = %peer.addr, "an upgraded web connection is not the TLS stream it came on");
            return;
        };
        let tls = state.tunnel_tls.clone();
        match burrow_tunnel::accept_upgraded(parts.io.into_inner(), parts.read_buf, tls, peer.addr)
            .await
        {
            Ok(session) => {
                // Authenticated: it no longer counts against its source.
                drop(place);
                state.tunnels.accept(session);
            }
            Err(e) => {
                tracing::debug!(peer = %peer.addr, error = %e, "upgraded tunnel handshake failed")
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, TUNNEL_UPGRADE)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// 426, naming the upgrade this endpoint takes (also for HTTP/1.0, which cannot be upgraded).
fn upgrade_required() -> Response {
    let mut answer = ApiFailure::new(
        StatusCode::UPGRADE_REQUIRED,
        "upgrade_required",
        format!(
            "this endpoint takes tunnels: send an HTTP/1.1 request with Connection: Upgrade and Upgrade: {TUNNEL_UPGRADE}"
        ),
    )
    .into_response();
    answer
        .headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(TUNNEL_UPGRADE));
    answer
}

/// `Connection: upgrade` and `Upgrade: burrow-tunnel/1` (each possibly among others).
fn asks_for_tunnel(headers: &HeaderMap) -> bool {
    let lists = |name: header::HeaderName| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
    };
    lists(header::CONNECTION).iter().any(|c| c == "upgrade")
        && lists(header::UPGRADE)
            .iter()
            .any(|p| p.eq_ignore_ascii_case(TUNNEL_UPGRADE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_upgrade_to_the_tunnel_protocol_is_taken() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("Burrow-Tunnel/1"));
        assert!(asks_for_tunnel(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!asks_for_tunnel(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("burrow-tunnel/1"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        assert!(!asks_for_tunnel(&h));
        assert!(!asks_for_tunnel(&HeaderMap::new()));
    }
}
