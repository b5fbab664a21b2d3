//! The proxy's own certificates, and the CAs it checks clients against, kept current while it
//! runs.
//!
//! The cluster certificate (web port, tunnel listener, QUIC; the SSH jump host's host
//! certificate likewise) lives as long as node certificates (`node_cert_ttl`) and is issued again
//! at two thirds of its life, or at once when a CA rotation changes the CA proxies' certificates
//! come from. The roots client certificates are checked against follow the rotation: both host
//! CAs while one rotates. The TLS configurations are built once, with a certificate resolver and a
//! client verifier that read the current state, so that a change reaches the next handshake and
//! leaves open connections alone. [`keep_current`] follows the backend's authorities record
//! (another proxy may have moved a rotation on), moves an automatic rotation on when due, and
//! rewrites the admin identity `burrowctl` uses on this host.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use burrow_daemon::fsutil::write_private_atomic;
use burrow_daemon::unix_now;
use burrow_net::tls::{self, ALPN_HTTP1};
use prometheus_client::metrics::counter::Counter;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio_util::sync::CancellationToken;
use tunnel_proto::pin::CaPin;
use tunnel_proto::wire::ALPN_TUNNEL;

use crate::auth::Auth;
use crate::auth::ca::{Authorities, CaError};
use crate::resume::Sessions;
use crate::sshproxy::HostIdentity;
use crate::tickets::Tickets;

/// How often a proxy reads the authorities record again (a rotation moved by another proxy
/// reaches it within this).
const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// The proxy's cluster certificate and client roots, as the TLS configurations read them.
pub struct ProxyCerts {
    names: Vec<String>,
    cluster: RwLock<Arc<CertifiedKey>>,
    /// Client certificates must chain to these (the web port also lets clients without one in).
    verifiers: RwLock<Verifiers>,
    issued: Mutex<Issued>,
    /// Session tickets that survive restarts, bound to the host CAs.
    tickets: Arc<Tickets>,
    /// QUIC's sessions, kept by the proxy (its tickets are ids) and across restarts.
    quic_sessions: Arc<Sessions>,
}

struct Verifiers {
    pins: Vec<CaPin>,
    optional: Arc<dyn ClientCertVerifier>,
    mandatory: Arc<dyn ClientCertVerifier>,
}

/// What the cluster certificate was issued from, and when it is due again.
struct Issued {
    server_pin: CaPin,
    due: u64,
}

impl std::fmt::Debug for ProxyCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyCerts")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ProxyCerts {
    /// The cluster certificate for `names` (besides the cluster's own), issued now.
    /// `secret`: the proxy's long-lived secret, which its session tickets' keys come from;
    /// `quic_sessions`: the file QUIC's sessions are kept in across restarts, and the counter of
    /// their resumptions.
    pub fn new(
        authorities: &Authorities,
        names: Vec<String>,
        secret: &[u8],
        quic_sessions: (PathBuf, Counter),
    ) -> anyhow::Result<Arc<Self>> {
        let (cluster, issued) = issue(authorities, &names)?;
        let tickets = Arc::new(Tickets::new(secret, &authorities.pins()));
        Ok(Arc::new(Self {
            names,
            cluster: RwLock::new(cluster),
            verifiers: RwLock::new(verifiers(authorities)?),
            issued: Mutex::new(issued),
            quic_sessions: Arc::new(Sessions::load(
                quic_sessions.0,
                tickets.clone(),
                quic_sessions.1,
            )),
            tickets,
        }))
    }

    /// Session tickets (one per handshake: each carries the client's chain, a kilobyte or so)
    /// from keys that survive a restart.
    fn with_tickets(&self, mut config: ServerConfig) -> ServerConfig {
        config.ticketer = self.tickets.clone();
        config.send_tls13_tickets = 1;
        config
    }

    fn cluster(&self) -> Arc<CertifiedKey> {
        self.cluster
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn verifier(&self, mandatory: bool) -> Arc<dyn ClientCertVerifier> {
        let v = self.verifiers.read().unwrap_or_else(|p| p.into_inner());
        if mandatory {
            v.mandatory.clone()
        } else {
            v.optional.clone()
        }
    }

    /// Issues the cluster certificate again if it is due or its CA changed, and takes the
    /// current client roots.
    pub fn refresh(&self, authorities: &Authorities, now: u64) -> anyhow::Result<()> {
        let pins = authorities.pins();
        if self
            .verifiers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .pins
            != pins
        {
            *self.verifiers.write().unwrap_or_else(|p| p.into_inner()) = verifiers(authorities)?;
            // Forgotten first: a save under way then writes nothing under the new keys.
            self.quic_sessions.forget();
            self.tickets.bind(&pins);
            tracing::info!(pins = ?pins.iter().map(ToString::to_string).collect::<Vec<_>>(), "client certificates are checked against new host CAs");
        }
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        if issued.server_pin == *authorities.server_pin() && now < issued.due {
            return Ok(());
        }
        let (cluster, next) = issue(authorities, &self.names)?;
        *self.cluster.write().unwrap_or_else(|p| p.into_inner()) = cluster;
        tracing::info!(ca_pin = %next.server_pin, "issued the proxy's certificate again");
        *issued = next;
        Ok(())
    }

    /// The web port's TLS: the cluster certificate or `public` (a certificate from public PKI,
    /// `https_cert_file`), client certificates optional (joins and `find` have none).
    pub fn web_config(
        self: &Arc<Self>,
        public: Option<Arc<CertifiedKey>>,
    ) -> anyhow::Result<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(Verifier {
                certs: self.clone(),
                mandatory: false,
            }))
            .with_cert_resolver(Arc::new(Resolver {
                certs: self.clone(),
                public,
            }));
        config.alpn_protocols = vec![ALPN_TUNNEL.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(self.with_tickets(config))
    }

    /// The dedicated tunnel listener's TLS: always the cluster certificate (even when the web
    /// port has one from public PKI), a node certificate required, tunnels only.
    pub fn tunnel_config(self: &Arc<Self>) -> anyhow::Result<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(Verifier {
                certs: self.clone(),
                mandatory: true,
            }))
            .with_cert_resolver(Arc::new(Resolver {
                certs: self.clone(),
                public: None,
            }));
        config.alpn_protocols = vec![ALPN_TUNNEL.to_vec()];
        Ok(self.with_tickets(config))
    }

    /// QUIC's TLS, from the tunnel listener's (`tcp`: tunnels only, TLS 1.3, a node certificate
    /// required), for both QUIC ports. Its session tickets are 32-byte ids of
    /// sessions the proxy keeps ([`crate::resume`]): a sealed ticket carries the node's chain, and
    /// offered back it makes the ClientHello too large for one Initial datagram (measured with
    /// 10,000 QUIC agents returning to a restarted proxy, BENCHMARKS.md, 2026-11-23: 12,613
    /// datagrams dropped without tickets, 36,757 with them, and a slower return).
    pub fn quic_config(&self, tcp: &ServerConfig) -> ServerConfig {
        let mut config = tcp.clone();
        config.alpn_protocols = vec![ALPN_TUNNEL.to_vec()];
        config.ticketer = Arc::new(NoTickets);
        config.session_storage = self.quic_sessions.clone();
        config.send_tls13_tickets = 1;
        // A session taken in the seconds before a crash is still in the file after it: no 0-RTT,
        // whose data a second use could replay.
        config.max_early_data_size = 0;
        config
    }

    /// The store of QUIC's sessions, for [`crate::resume::keep_saved`].
    pub fn quic_sessions(&self) -> Arc<Sessions> {
        self.quic_sessions.clone()
    }
}

/// No sealed tickets: rustls then issues ids of sessions kept in `session_storage`.
#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// A certificate from public PKI for the web port, from `https_cert_file` and `https_key_file`.
pub fn public_cert(cert_file: &Path, key_file: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let cert_pem = std::fs::read_to_string(cert_file)
        .with_context(|| format!("cannot read https_cert_file {}", cert_file.display()))?;
    let key_pem = std::fs::read_to_string(key_file)
        .with_context(|| format!("cannot read https_key_file {}", key_file.display()))?;
    let chain = tls::parse_certs(&cert_pem, &cert_file.display().to_string())?;
    let key = tls::parse_key(&key_pem, &key_file.display().to_string())?;
    let certified = CertifiedKey::from_der(chain, key, &tls::provider())
        .context("the web certificate and key do not match")?;
    Ok(Arc::new(certified))
}

fn issue(
    authorities: &Authorities,
    names: &[String],
) -> anyhow::Result<(Arc<CertifiedKey>, Issued)> {
    let pair = authorities.issue_web_cert(names)?;
    let chain = tls::parse_certs(&pair.cert_pem, "proxy certificate")?;
    let key = tls::parse_key(pair.key_pem.expose(), "proxy key")?;
    let certified = CertifiedKey::from_der(chain, key, &tls::provider())?;
    let (from, to) = tls::validity(&pair.cert_pem).unwrap_or((0, u64::MAX));
    let issued = Issued {
        server_pin: *authorities.server_pin(),
        due: from.saturating_add(to.saturating_sub(from) / 3 * 2),
    };
    Ok((Arc::new(certified), issued))
}

fn verifiers(authorities: &Authorities) -> anyhow::Result<Verifiers> {
    let mut roots = rustls::RootCertStore::empty();
    for der in authorities.host_ca_ders() {
        roots.add(der.into())?;
    }
    let roots = Arc::new(roots);
    let provider = tls::provider();
    Ok(Verifiers {
        pins: authorities.pins(),
        optional: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()?,
        mandatory: WebPkiClientVerifier::builder_with_provider(roots, provider).build()?,
    })
}

#[derive(Debug)]
struct Resolver {
    certs: Arc<ProxyCerts>,
    public: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Resolver {
    /// The public certificate (if any) for HTTPS; the cluster certificate for tunnels and for
    /// clients that ask for it ([`tls::ALPN_CLUSTER_CERT`]: burrowctl), always: they trust only
    /// the cluster's CA, so that nobody else holding a public certificate for the name (a
    /// balancer that terminates TLS, say) can pass for a proxy.
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let cluster = hello.alpn().is_some_and(|mut offered| {
            offered.any(|p| p == ALPN_TUNNEL || p == tls::ALPN_CLUSTER_CERT)
        });
        match &self.public {
            Some(public) if !cluster => Some(public.clone()),
            _ => Some(self.certs.cluster()),
        }
    }
}

/// Checks client certificates with the verifier for the current roots.
#[derive(Debug)]
struct Verifier {
    certs: Arc<ProxyCerts>,
    mandatory: bool,
}

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    /// No hints: Burrow's clients present the one certificate they have whatever the hints say,
    /// and the roots change under a rotation.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.certs
            .verifier(self.mandatory)
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.certs
            .verifier(self.mandatory)
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.certs
            .verifier(self.mandatory)
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.certs
            .verifier(self.mandatory)
            .supported_verify_schemes()
    }
}

/// Keeps the proxy's certificates, its SSH host certificate and the admin identity in
/// `data_dir` current until shutdown (see the module's documentation).
pub async fn keep_current(
    auth: Arc<Auth>,
    certs: Arc<ProxyCerts>,
    ssh: Option<Arc<HostIdentity>>,
    data_dir: PathBuf,
    shutdown: CancellationToken,
) {
    let mut changes = auth.subscribe();
    let mut admin_checked = (changes.borrow().clone(), std::time::Instant::now());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(RELOAD_EVERY) => {
                if let Err(e) = auth.reload().await {
                    tracing::debug!(error = %e, "cannot read the cluster authorities again");
                }
                let due = auth
                    .authorities()
                    .rotation()
                    .and_then(|r| r.next_phase_at)
                    .is_some_and(|at| at <= unix_now());
                if due && let Err(e) = auth.advance_rotation().await {
                    tracing::warn!(error = %e, "cannot move the CA rotation on");
                }
            }
        }
        let authorities = changes.borrow_and_update().clone();
        let now = unix_now();
        if let Err(e) = certs.refresh(&authorities, now) {
            tracing::warn!(error = %e, "cannot issue the proxy's certificate again");
        }
        if let Some(ssh) = &ssh
            && let Err(e) = ssh.refresh(&authorities, now)
        {
            tracing::warn!(error = %e, "cannot issue the proxy's SSH host certificate again");
        }
        // The admin identity file: when the CAs change (here or by another proxy), and hourly
        // for its age.
        let changed = !Arc::ptr_eq(&admin_checked.0, &authorities);
        if changed || admin_checked.1.elapsed() >= Duration::from_secs(3600) {
            admin_checked = (authorities.clone(), std::time::Instant::now());
            if let Err(e) = write_admin_identity(&data_dir, &authorities) {
                tracing::warn!(error = %e, "cannot write the admin identity");
            }
        }
    }
}

/// Writes the admin identity unless a good one is already there: from this cluster's signing
/// CA, with every host CA `burrowctl` should trust, and more than a third of its life left.
pub fn write_admin_identity(data_dir: &Path, authorities: &Authorities) -> anyhow::Result<()> {
    let path = data_dir.join(crate::ADMIN_IDENTITY_FILE);
    if let Ok(text) = std::fs::read_to_string(&path)
        && text.ends_with(&authorities.host_ca_certs().concat())
        && tls::parse_certs(&text, "admin identity")
            .is_ok_and(|certs| authorities.signed_this(&certs[0]))
        && tls::validity(&text)
            .is_some_and(|(from, to)| unix_now() < to.saturating_sub(to.saturating_sub(from) / 3))
    {
        return Ok(());
    }
    let contents = admin_identity(authorities)?;
    write_private_atomic(&path, contents.expose().as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tracing::info!(path = %path.display(), "wrote the admin identity for burrowctl");
    Ok(())
}

/// A new admin identity file: certificate, key, the host CAs.
pub fn admin_identity(authorities: &Authorities) -> Result<tunnel_proto::secret::Secret, CaError> {
    let issued = authorities.issue_admin_identity()?;
    Ok(tunnel_proto::secret::Secret::new(format!(
        "# Admin identity of Burrow cluster {}: certificate, key, host CAs. Keep it secret.\n{}{}{}",
        authorities.cluster_name,
        issued.cert_pem,
        issued.key_pem.expose(),
        authorities.host_ca_certs().concat()
    )))
}
