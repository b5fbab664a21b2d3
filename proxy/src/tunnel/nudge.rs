//! A restarted proxy's first words to the QUIC agents it held before it stopped without saying
//! goodbye (a crash, a kill -9): one nudge datagram each ([`burrow_tunnel::nudge`]), so that they
//! reconnect now instead of at their next keep-alive.

use std::net::SocketAddr;
use std::sync::Arc;

use burrow_tunnel::nudge::{nudge_datagram, parse_nudge_token};
use tunnel_proto::api::Presence;

use crate::backend::Backend;
use crate::state;

/// Sends a nudge from each of `sockets` (the QUIC ports; an agent's NAT lets in only what comes
/// from the port it sent to) to every QUIC agent that this proxy's presence records of its last
/// run name. Records of a clean stop are gone (its tunnels were closed with an advisory).
pub async fn nudge_former_agents(
    backend: Arc<dyn Backend>,
    proxy_id: String,
    sockets: Vec<std::net::UdpSocket>,
) {
    let records = match backend.list(state::PRESENCE).await {
        Ok(records) => records,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the presence records of the last run; its QUIC agents come back at their next keep-alive");
            return;
        }
    };
    let sockets: Vec<tokio::net::UdpSocket> = sockets
        .into_iter()
        .filter_map(|s| {
            s.set_nonblocking(true).ok()?;
            tokio::net::UdpSocket::from_std(s).ok()
        })
        .collect();
    let ours = format!("/{proxy_id}");
    let mut nudged = 0usize;
    for (key, value) in records {
        if !key.ends_with(&ours) {
            continue;
        }
        let Ok(presence) = serde_json::from_slice::<Presence>(&value) else {
            continue;
        };
        let token = presence.nudge.as_deref().and_then(parse_nudge_token);
        let addr = presence.remote_addr.parse::<SocketAddr>();
        let (Some(token), Ok(addr)) = (token, addr) else {
            continue;
        };
        let datagram = nudge_datagram(&token);
        for socket in &sockets {
            // A socket of the other address family cannot reach it; the other one can.
            let _ = socket.send_to(&datagram, addr).await;
        }
        nudged += 1;
    }
    if nudged > 0 {
        tracing::info!(
            agents = nudged,
            "told the QUIC agents of the last run that this proxy restarted"
        );
    }
}
