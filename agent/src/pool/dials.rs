//! Dial streams: what the proxy opens on a tunnel to reach the node's SSH server (or, in
//! `burrow-bench`, an echo or a byte sink).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use burrow_tunnel::{Framed, Session, TunnelStream};
use tokio::sync::mpsc;
use tunnel_proto::wire::{AuditEvent, DialRequest, Message};

use super::WELCOME_TIMEOUT;
use crate::telemetry::Telemetry;

/// What serves a dial stream the proxy opened to port 3022: the node's SSH server in the agent,
/// an echo or a byte sink in `burrow-bench`'s simulated agents.
pub trait DialService: Send + Sync + 'static {
    /// Serves one stream until it ends.
    fn serve(
        self: Arc<Self>,
        stream: TunnelStream,
        dial: DialInfo,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Where a dial stream comes from.
pub struct DialInfo {
    /// The user's address, as the proxy saw it.
    pub client_addr: String,
    /// The proxy whose tunnel carried it.
    pub proxy_id: String,
    /// Carries audit events to that proxy.
    pub audit: mpsc::Sender<AuditEvent>,
}

impl DialService for crate::ssh::SshContext {
    fn serve(
        self: Arc<Self>,
        stream: TunnelStream,
        dial: DialInfo,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(crate::ssh::serve(
            self,
            stream,
            dial.client_addr,
            Some(dial.proxy_id),
            dial.audit,
        ))
    }
}

/// The node port dial streams reach the SSH server on.
pub const SSH_PORT: u16 = 3022;

/// Answers the proxy's dial streams: port 3022 reaches the node's SSH server; other ports are
/// refused with a reason the proxy shows the user.
pub(super) async fn serve_dials(
    session: Session,
    service: Arc<dyn DialService>,
    (proxy_id, audit): (String, mpsc::Sender<AuditEvent>),
    telemetry: Option<Arc<Telemetry>>,
) {
    while let Some(stream) = session.accept().await {
        let service = service.clone();
        let audit = audit.clone();
        let proxy_id = proxy_id.clone();
        let telemetry = telemetry.clone();
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
            let _open = telemetry.as_ref().map(|t| t.ssh_connection());
            let dial = DialInfo {
                client_addr,
                proxy_id,
                audit,
            };
            service.serve(stream, dial).await;
        });
    }
}
