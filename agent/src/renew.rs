//! The node's certificates, renewed over a tunnel before they expire.
//!
//! A node's TLS and SSH host certificates live as long as the proxy's `node_cert_ttl` says. From
//! half their lifetime on (at a point between one half and two thirds, different for every node,
//! so that a fleet joined together does not renew together) one of the agent's tunnels asks its
//! proxy for new ones ([`Message::Renew`]) for the same keys. The answer is checked, stored in the
//! identity file, and used for the next tunnels and SSH connections; open ones keep what they have.
//! A failed renewal is tried again after a tenth of the time left (at least 5 s, at most an hour).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use russh::keys::ssh_key::Certificate;
use tunnel_proto::wire::{Message, NodeCertificates, Trust};

use crate::identity::Identity;
use crate::ssh::SshContext;

/// The TLS configurations tunnels are dialed with; a renewal or a CA change replaces them.
pub type SharedTls = Arc<RwLock<Arc<burrow_tunnel::TunnelTls>>>;

/// How long a request may stay unanswered before another tunnel asks again.
const ANSWER_TIMEOUT: u64 = 60;
const RETRY_MIN: u64 = 5;
const RETRY_MAX: u64 = 3600;

/// When certificates valid from `not_before` to `not_after` are renewed: between one half and two
/// thirds of their lifetime, at the point `jitter` (0 to 1) picks.
pub fn due_at(not_before: u64, not_after: u64, jitter: f64) -> u64 {
    let life = not_after.saturating_sub(not_before);
    let spread = (life as f64 / 6.0 * jitter.clamp(0.0, 1.0)) as u64;
    not_before + life / 2 + spread
}

/// When to try again after a failure at `now`: a tenth of the time left, within bounds.
pub fn retry_at(now: u64, not_after: u64) -> u64 {
    now + (not_after.saturating_sub(now) / 10).clamp(RETRY_MIN, RETRY_MAX)
}

struct State {
    identity: Identity,
    not_after: u64,
    due: u64,
    /// When a tunnel sent the pending request.
    asked: Option<u64>,
}

/// The renewal state the pool's tunnels share.
pub struct Renewer {
    data_dir: PathBuf,
    tls: SharedTls,
    ssh: Arc<SshContext>,
    public_roots: bool,
    state: Mutex<State>,
}

impl Renewer {
    pub fn new(
        identity: Identity,
        data_dir: PathBuf,
        tls: SharedTls,
        ssh: Arc<SshContext>,
        public_roots: bool,
    ) -> Self {
        let (not_before, not_after) =
            burrow_net::tls::validity(&identity.tls_cert).unwrap_or((0, u64::MAX));
        let due = due_at(not_before, not_after, rand::random::<f64>());
        Self {
            data_dir,
            tls,
            ssh,
            public_roots,
            state: Mutex::new(State {
                identity,
                not_after,
                due,
                asked: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a tunnel may wait before [`Renewer::take`] can have something for it.
    pub fn wait(&self, now: u64) -> Duration {
        let s = self.lock();
        let next = match s.asked {
            Some(at) => at + ANSWER_TIMEOUT,
            None => s.due,
        };
        Duration::from_secs(next.saturating_sub(now))
    }

    /// The request to send, if a renewal is due and no other tunnel is waiting for its answer.
    pub fn take(&self, now: u64) -> Option<Message> {
        let mut s = self.lock();
        let waiting = s.asked.is_some_and(|at| now < at + ANSWER_TIMEOUT);
        if now < s.due || waiting {
            return None;
        }
        let key = russh::keys::ssh_key::PrivateKey::from_openssh(s.identity.ssh_key.expose());
        let Some(ssh_public_key) = key.ok().and_then(|k| k.public_key().to_openssh().ok()) else {
            tracing::warn!("cannot read the node's SSH key to renew its certificate");
            s.due = retry_at(now, s.not_after);
            return None;
        };
        s.asked = Some(now);
        tracing::info!("renewing the node's certificates");
        Some(Message::Renew { ssh_public_key })
    }

    /// The proxy's answer to the request.
    pub fn finish(&self, now: u64, certificates: Option<NodeCertificates>, error: Option<String>) {
        let result = match certificates {
            Some(certs) => self.apply(now, certs),
            None => Err(error.unwrap_or_else(|| "the proxy sent no certificates".into())),
        };
        let mut s = self.lock();
        s.asked = None;
        if let Err(why) = result {
            s.due = retry_at(now, s.not_after);
            tracing::warn!(%why, retry_in = ?Duration::from_secs(s.due - now), "cannot renew the node's certificates");
        }
    }

    /// The CAs the proxy says to trust from now on (a CA rotation moved): stored in the identity
    /// and used for the next tunnels and SSH logins. With `renew_now`, the node's certificates
    /// are from a CA that no longer signs: renewed at once.
    pub fn trust(&self, now: u64, trust: Trust) {
        let renew_now = trust.renew_now;
        if let Err(why) = self.apply_trust(trust) {
            tracing::warn!(%why, "cannot take the cluster's new CAs");
            return;
        }
        let mut s = self.lock();
        if renew_now && s.asked.is_none() && s.due > now {
            tracing::info!(
                "the node's certificates are from a CA that no longer signs: renewing them now"
            );
            s.due = now;
        }
    }

    fn apply_trust(&self, trust: Trust) -> Result<(), String> {
        let mut next = self.lock().identity.clone();
        if (&next.host_ca_certs, &next.host_ca_ssh, &next.user_ca_ssh)
            == (&trust.host_ca_certs, &trust.host_ca_ssh, &trust.user_ca_ssh)
        {
            return Ok(());
        }
        if trust.host_ca_ssh.is_empty() || trust.user_ca_ssh.is_empty() {
            return Err("the proxy sent an empty list of SSH CAs".into());
        }
        let user_cas = trust
            .user_ca_ssh
            .iter()
            .map(|k| russh::keys::ssh_key::PublicKey::from_openssh(k.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("a user CA key does not parse: {e}"))?;
        next.host_ca_certs = trust.host_ca_certs;
        next.host_ca_ssh = trust.host_ca_ssh;
        next.user_ca_ssh = trust.user_ca_ssh;
        next.check()?;
        let cas = crate::host_cas(&next).map_err(|e| e.to_string())?;
        let tls = crate::tunnel_tls(&next, &cas, self.public_roots).map_err(|e| e.to_string())?;
        next.save(&self.data_dir).map_err(|e| e.to_string())?;
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tls);
        self.ssh.set_user_cas(user_cas);
        let pins: Vec<String> = cas
            .iter()
            .filter_map(|der| tunnel_proto::pin::CaPin::of_certificate(der).ok())
            .map(|p| p.to_string())
            .collect();
        self.lock().identity = next;
        tracing::info!(host_ca_pins = ?pins, "the cluster's CAs changed; trusting them from now on");
        Ok(())
    }

    /// Checks new certificates, stores them and uses them from now on.
    fn apply(&self, now: u64, certs: NodeCertificates) -> Result<(), String> {
        let mut next = self.lock().identity.clone();
        let (not_before, not_after) = burrow_net::tls::validity(&certs.tls_cert)
            .ok_or("the renewed TLS certificate does not parse")?;
        if not_after <= now {
            return Err("the renewed TLS certificate has already expired".into());
        }
        let cert = Certificate::from_openssh(certs.ssh_cert.trim())
            .map_err(|e| format!("the renewed SSH certificate does not parse: {e}"))?;
        let key = russh::keys::ssh_key::PrivateKey::from_openssh(next.ssh_key.expose())
            .map_err(|e| format!("the node's SSH key: {e}"))?;
        if cert.public_key() != key.public_key().key_data() {
            return Err("the renewed SSH certificate is for another key".into());
        }
        next.tls_cert = certs.tls_cert;
        next.ssh_cert = certs.ssh_cert;
        let cas = crate::host_cas(&next).map_err(|e| e.to_string())?;
        let tls = crate::tunnel_tls(&next, &cas, self.public_roots).map_err(|e| e.to_string())?;
        next.save(&self.data_dir).map_err(|e| e.to_string())?;
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tls);
        self.ssh.set_certificate(cert);
        let mut s = self.lock();
        s.identity = next;
        s.not_after = not_after;
        s.due = due_at(not_before, not_after, rand::random::<f64>());
        tracing::info!(
            valid_until = %humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(not_after)),
            "renewed the node's certificates"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_fall_between_half_and_two_thirds_of_the_lifetime() {
        assert_eq!(due_at(1000, 1600, 0.0), 1300);
        assert_eq!(due_at(1000, 1600, 1.0), 1400);
        assert_eq!(due_at(1000, 1600, 0.5), 1350);
        // A ninety-day certificate: renewed after 45 to 60 days.
        let day = 86_400;
        let due = due_at(0, 90 * day, 0.999);
        assert!((45 * day..=60 * day).contains(&due), "{due}");
        // Nonsense (expiry before start) does not underflow.
        assert_eq!(due_at(50, 10, 0.5), 50);
    }

    #[test]
    fn a_failure_is_retried_after_a_tenth_of_the_time_left_within_bounds() {
        assert_eq!(retry_at(1000, 1000 + 500), 1050);
        assert_eq!(retry_at(1000, 1010), 1005);
        assert_eq!(retry_at(1000, 900), 1005);
        assert_eq!(retry_at(0, 90 * 86_400), 3600);
    }
}
