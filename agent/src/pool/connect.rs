//! Opening one tunnel: down the transports a dial plan names until one gets through or the proxy
//! answers, then the hello and the welcome.

use std::sync::Arc;
use std::time::Duration;

use burrow_tunnel::{self as transport, Framed, Keepalive, Transport};
use tokio::sync::mpsc;

use super::membership::{DialFailure, DialOutcome, DialPlan, Landed};
use super::{Dialed, PoolConfig, PoolEvent, WELCOME_TIMEOUT, control};

/// The longest one transport's dial may take, welcome included (connect, handshakes and the
/// upgrade are bounded on their own already).
const DIAL_LIMIT: Duration = Duration::from_secs(40);
/// How long `auto` gives QUIC before falling back to TCP.
const QUIC_TRY: Duration = Duration::from_secs(3);

/// A tunnel's keep-alive over `over`: the configured one, else the transport's default; on the
/// HTTP upgrade never longer than its default, as balancers close connections idle for a minute
/// whatever the link would allow.
pub(super) fn keepalive_for(config: &PoolConfig, over: Transport) -> Keepalive {
    let default = Keepalive::default_for(over);
    match (config.keepalive, over) {
        (Some(k), Transport::Upgrade) => Keepalive::clamped(k.interval().min(default.interval())),
        (Some(k), _) => k,
        (None, _) => default,
    }
}

/// How a transport is named in the log.
pub(super) fn describe(t: Transport) -> &'static str {
    match t {
        Transport::Quic => "QUIC",
        Transport::Tcp => "TLS over TCP",
        Transport::Upgrade => "the HTTP upgrade",
    }
}

/// Runs one dial as `plan` says and reports how it went.
pub(super) async fn dial(
    config: Arc<PoolConfig>,
    endpoint: Option<quinn::Endpoint>,
    plan: DialPlan,
    events: mpsc::Sender<PoolEvent>,
) {
    let mut failed = Vec::new();
    let mut result = Err(DialFailure::Failed("no transport tried".into()));
    for &over in &plan.tries {
        // `auto` gives QUIC a short while: a network that drops UDP says nothing.
        let limit = match over {
            Transport::Quic if config.ladder.len() > 1 => QUIC_TRY,
            Transport::Quic => WELCOME_TIMEOUT,
            _ => DIAL_LIMIT,
        };
        result =
            match tokio::time::timeout(limit, dial_with(&config, over, endpoint.as_ref())).await {
                Ok(r) => r,
                Err(_) => Err(DialFailure::Failed(format!(
                    "no {} answer within {}s",
                    describe(over),
                    limit.as_secs()
                ))),
            };
        // A refusal is the proxy's answer whatever the transport: only a failure falls back.
        match &result {
            Err(DialFailure::Failed(reason)) => failed.push((over, reason.clone())),
            _ => break,
        }
    }
    let (result, dialed) = match result {
        Ok(d) => {
            let landed = Landed {
                proxy_id: d.welcome.proxy_id.clone(),
                transport: d.session.transport(),
                proxies: d.welcome.proxies.clone(),
            };
            (Ok(landed), Some(Box::new(d)))
        }
        Err(e) => (Err(e), None),
    };
    let outcome = DialOutcome {
        plan,
        result,
        failed,
    };
    let _ = events.send(PoolEvent::Dialed(outcome, dialed)).await;
}

/// A dial error, with what to do when the proxy's certificate is from a CA the node does not
/// know: the cluster's CA was rotated while the node was offline.
fn explain(error: String) -> String {
    if error.contains("UnknownIssuer") || error.contains("BadSignature") {
        format!(
            "{error}: the certificate that answered is not from a CA this node trusts; if the cluster's CA was rotated while this node was offline, join again: move identity.json out of the data dir and start with a fresh token and the new --ca-pin (if a balancer that terminates TLS answered, tunnels go through it with --transport upgrade or auto)"
        )
    } else {
        error
    }
}

/// Opens a tunnel over `over` (QUIC needs the endpoint), says hello and waits for the welcome.
async fn dial_with(
    config: &PoolConfig,
    over: Transport,
    endpoint: Option<&quinn::Endpoint>,
) -> Result<Dialed, DialFailure> {
    let failed = |e: &dyn std::fmt::Display| DialFailure::Failed(explain(e.to_string()));
    let keepalive = keepalive_for(config, over);
    let tls = config.tls.read().unwrap_or_else(|p| p.into_inner()).clone();
    let session = match (over, endpoint) {
        (Transport::Quic, Some(endpoint)) => {
            let tunnel = tls.tunnel.clone();
            transport::connect_quic(endpoint, &config.addr, tunnel, keepalive, config.window).await
        }
        (Transport::Quic, None) => return Err(DialFailure::Failed("QUIC is not set up".into())),
        (Transport::Tcp, _) => {
            transport::connect_tcp(&config.addr, tls.tunnel.clone(), keepalive).await
        }
        (Transport::Upgrade, _) => {
            transport::connect_upgrade(&config.web_addr, &tls, keepalive).await
        }
    }
    .map_err(|e| failed(&e))?;
    let stream = session.open().await.map_err(|e| failed(&e))?;
    let mut control = Framed::new(stream);
    let labels = config.labels.borrow().clone();
    control
        .write(&control::hello(
            &config.host_id,
            &config.node_name,
            labels,
            keepalive.interval(),
            config.renewer.is_some(),
        ))
        .await
        .map_err(|e| failed(&e))?;
    let answer = match tokio::time::timeout(WELCOME_TIMEOUT, control.read()).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            session.close("protocol error");
            return Err(DialFailure::Failed(format!(
                "the proxy closed the tunnel: {e}"
            )));
        }
        Err(_) => {
            session.close("timeout");
            return Err(DialFailure::Failed("no welcome from the proxy".into()));
        }
    };
    match control::answer_to_hello(answer) {
        Ok(welcome) => Ok(Dialed {
            session,
            control,
            welcome,
        }),
        Err(e) => {
            session.close("refused");
            Err(e)
        }
    }
}
