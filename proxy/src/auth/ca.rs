//! The cluster's certificate authorities and what they sign.
//!
//! - Host CA: an ECDSA P-256 X.509 CA (tunnels, the web port, the admin identity) and an ed25519
//!   SSH CA (host certificates for nodes and proxies).
//! - User CA: an ed25519 SSH CA (user certificates).
//!
//! Certificates carry their holder's role in the subject's organization ([`CertRole`]); the web API
//! and the tunnel listeners read it after rustls has checked the chain to the host CA.

use std::time::Duration;

use burrow_daemon::unix_now;
use burrow_net::tls::CLUSTER_SERVER_NAME;
use rand::RngExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use russh::keys::ssh_key::certificate::{Builder as SshCertBuilder, CertType};
use russh::keys::ssh_key::{Algorithm, Certificate, LineEnding, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tunnel_proto::api::Permissions;
use tunnel_proto::pin::CaPin;
use tunnel_proto::secret::Secret;
use tunnel_proto::wire::Trust;

use super::rotation::{CaType, Phase, StoredRotation};
use tunnel_proto::api::RotationStatus;

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a node's TLS and SSH host certificates live unless the proxy's config says
/// (`node_cert_ttl`): agents renew them over their tunnels from half their lifetime on, so a device
/// may be offline for about six weeks and still come back by itself.
pub const DEFAULT_NODE_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
const ADMIN_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Clock skew tolerated between the CA and the peers that check its certificates.
const BACKDATE: Duration = Duration::from_secs(3600);

pub use burrow_net::tls::CertRole;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot create key or certificate: {0}")]
    X509(#[from] rcgen::Error),
    #[error("SSH key or certificate operation failed: {0}")]
    Ssh(#[from] russh::keys::ssh_key::Error),
    #[error("stored authorities are corrupt: {0}")]
    Corrupt(String),
}

/// The authorities as stored in the backend.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredAuthorities {
    pub cluster_name: String,
    pub host_tls_cert: String,
    pub host_tls_key: Secret,
    pub host_ssh_key: Secret,
    pub user_ssh_key: Secret,
    pub created: u64,
    /// A CA rotation under way ([`super::rotation`]); the fields above hold the CAs that sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<StoredRotation>,
}

impl StoredAuthorities {
    pub fn generate(cluster_name: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        // Each CA its own name: during a rotation two are trusted side by side, and a verifier
        // looks the issuer up by name.
        let tag = tunnel_proto::hex(&rand::random::<[u8; 4]>());
        params.distinguished_name = distinguished_name(
            &format!("Burrow host CA for {cluster_name} {tag}"),
            cluster_name,
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let mut rng = rand::rng();
        let host_ssh = PrivateKey::random(&mut rng, Algorithm::Ed25519)?;
        let user_ssh = PrivateKey::random(&mut rng, Algorithm::Ed25519)?;
        Ok(Self {
            cluster_name: cluster_name.to_string(),
            host_tls_cert: cert.pem(),
            host_tls_key: Secret::new(key.serialize_pem()),
            host_ssh_key: Secret::new(host_ssh.to_openssh(LineEnding::LF)?.to_string()),
            user_ssh_key: Secret::new(user_ssh.to_openssh(LineEnding::LF)?.to_string()),
            created: unix_now(),
            rotation: None,
        })
    }
}

/// The loaded authorities, ready to sign.
pub struct Authorities {
    pub cluster_name: String,
    /// The host CA that signs.
    pub host_tls_cert_pem: String,
    pub host_tls_cert_der: Vec<u8>,
    pub pin: CaPin,
    host_tls_issuer: Issuer<'static, KeyPair>,
    host_ssh: PrivateKey,
    user_ssh: PrivateKey,
    node_validity: Duration,
    /// During a host CA rotation: the host CA that does not sign (trusted all the same).
    other_host: Option<HostCa>,
    /// During a user CA rotation: the user CA that does not sign (trusted all the same).
    other_user_ssh: Option<PrivateKey>,
    rotation: Option<RotationStatus>,
    /// A host rotation's `update_clients` phase: proxies' own certificates still come from the
    /// old CA ([`Authorities::server_ca`]).
    servers_on_other: bool,
    /// The SSH CAs' public keys (OpenSSH), the signing one first.
    host_ssh_publics: Vec<String>,
    user_ssh_publics: Vec<String>,
}

/// A host CA: its X.509 certificate and key, and its SSH key.
struct HostCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    pin: CaPin,
    issuer: Issuer<'static, KeyPair>,
    ssh: PrivateKey,
}

impl HostCa {
    fn load(cert_pem: &str, key_pem: &str, ssh_key: &str) -> Result<Self, CaError> {
        let corrupt =
            |what: &str, e: &dyn std::fmt::Display| CaError::Corrupt(format!("{what}: {e}"));
        let certs = burrow_net::tls::parse_certs(cert_pem, "host CA certificate")
            .map_err(|e| corrupt("host CA certificate", &e))?;
        let cert_der = certs[0].to_vec();
        let pin =
            CaPin::of_certificate(&cert_der).map_err(|e| corrupt("host CA certificate", &e))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| corrupt("host CA key", &e))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| corrupt("host CA certificate", &e))?;
        let ssh = PrivateKey::from_openssh(ssh_key).map_err(|e| corrupt("host SSH CA key", &e))?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            cert_der,
            pin,
            issuer,
            ssh,
        })
    }
}

/// A freshly issued certificate with the key the proxy generated for it.
pub struct IssuedPair {
    pub cert_pem: String,
    pub key_pem: Secret,
}

impl Authorities {
    pub fn load(stored: &StoredAuthorities) -> Result<Self, CaError> {
        let corrupt =
            |what: &str, e: &dyn std::fmt::Display| CaError::Corrupt(format!("{what}: {e}"));
        let host = HostCa::load(
            &stored.host_tls_cert,
            stored.host_tls_key.expose(),
            stored.host_ssh_key.expose(),
        )?;
        let user_ssh = PrivateKey::from_openssh(stored.user_ssh_key.expose())
            .map_err(|e| corrupt("user SSH CA key", &e))?;
        let mut other_host = None;
        let mut other_user_ssh = None;
        if let Some(r) = &stored.rotation {
            let other = &r.other;
            match (r.ca_type, &other.tls_cert, &other.tls_key) {
                (CaType::Host, Some(cert), Some(key)) => {
                    other_host = Some(HostCa::load(cert, key.expose(), other.ssh_key.expose())?)
                }
                (CaType::Host, _, _) => {
                    return Err(CaError::Corrupt(
                        "a host CA rotation without the other host CA".into(),
                    ));
                }
                (CaType::User, _, _) => {
                    other_user_ssh = Some(
                        PrivateKey::from_openssh(other.ssh_key.expose())
                            .map_err(|e| corrupt("user SSH CA key", &e))?,
                    )
                }
            }
        }
        let mut host_ssh_publics = vec![host.ssh.public_key().to_openssh()?];
        if let Some(other) = &other_host {
            host_ssh_publics.push(other.ssh.public_key().to_openssh()?);
        }
        let mut user_ssh_publics = vec![user_ssh.public_key().to_openssh()?];
        if let Some(other) = &other_user_ssh {
            user_ssh_publics.push(other.public_key().to_openssh()?);
        }
        Ok(Self {
            host_ssh_publics,
            user_ssh_publics,
            cluster_name: stored.cluster_name.clone(),
            host_tls_cert_pem: host.cert_pem,
            host_tls_cert_der: host.cert_der,
            pin: host.pin,
            host_tls_issuer: host.issuer,
            host_ssh: host.ssh,
            user_ssh,
            node_validity: DEFAULT_NODE_VALIDITY,
            other_host,
            other_user_ssh,
            servers_on_other: stored
                .rotation
                .as_ref()
                .is_some_and(|r| r.ca_type == CaType::Host && r.phase == Phase::UpdateClients),
            rotation: stored.rotation.as_ref().map(|r| RotationStatus {
                ca_type: r.ca_type.as_str().to_string(),
                phase: r.phase.as_str().to_string(),
                phase_started: r.phase_started,
                next_phase_at: r.next_phase_at(),
            }),
        })
    }

    /// The rotation under way, if any.
    pub fn rotation(&self) -> Option<&RotationStatus> {
        self.rotation.as_ref()
    }

    /// Every host CA certificate (PEM) peers should trust, the one that signs first.
    pub fn host_ca_certs(&self) -> Vec<String> {
        let mut certs = vec![self.host_tls_cert_pem.clone()];
        certs.extend(self.other_host.iter().map(|o| o.cert_pem.clone()));
        certs
    }

    /// Every host CA certificate (DER) the proxy checks clients against.
    pub fn host_ca_ders(&self) -> Vec<Vec<u8>> {
        let mut ders = vec![self.host_tls_cert_der.clone()];
        ders.extend(self.other_host.iter().map(|o| o.cert_der.clone()));
        ders
    }

    /// The pins of the host CAs, the one that signs first.
    pub fn pins(&self) -> Vec<CaPin> {
        let mut pins = vec![self.pin];
        pins.extend(self.other_host.iter().map(|o| o.pin));
        pins
    }

    /// The host SSH CAs' public keys (OpenSSH), the one that signs first.
    pub fn host_ssh_publics(&self) -> Vec<String> {
        self.host_ssh_publics.clone()
    }

    /// The user SSH CAs' public keys (OpenSSH), the one that signs first.
    pub fn user_ssh_publics(&self) -> Vec<String> {
        self.user_ssh_publics.clone()
    }

    /// The user SSH CAs a user certificate may be from.
    pub fn user_ssh_cas(&self) -> Vec<PublicKey> {
        let mut keys = vec![self.user_ssh.public_key().clone()];
        keys.extend(self.other_user_ssh.iter().map(|k| k.public_key().clone()));
        keys
    }

    /// What a node should trust now; `renew_now` if its certificates are not from the CA that
    /// signs.
    pub fn trust(&self, renew_now: bool) -> Trust {
        Trust {
            host_ca_certs: self.host_ca_certs(),
            host_ca_ssh: self.host_ssh_publics(),
            user_ca_ssh: self.user_ssh_publics(),
            renew_now,
        }
    }

    /// Whether `leaf_der` was signed by the host CA that signs now.
    pub fn signed_this(&self, leaf_der: &[u8]) -> bool {
        let Ok((_, ca)) = x509_parser::parse_x509_certificate(&self.host_tls_cert_der) else {
            return false;
        };
        x509_parser::parse_x509_certificate(leaf_der)
            .is_ok_and(|(_, leaf)| leaf.verify_signature(Some(ca.public_key())).is_ok())
    }

    /// The CA the proxies' own certificates come from: in a host rotation's `update_clients`
    /// phase the new CA signs for nodes while proxies keep presenting the old one's, so that an
    /// agent that has not learnt the new CA yet still reaches them.
    fn server_ca(&self) -> (&Issuer<'static, KeyPair>, &PrivateKey) {
        match &self.other_host {
            Some(old) if self.servers_on_other => (&old.issuer, &old.ssh),
            _ => (&self.host_tls_issuer, &self.host_ssh),
        }
    }

    /// The pin of [`Authorities::server_ca`]'s CA: a proxy's certificates are reissued when it
    /// changes.
    pub fn server_pin(&self) -> &CaPin {
        match &self.other_host {
            Some(old) if self.servers_on_other => &old.pin,
            _ => &self.pin,
        }
    }

    /// How long the node certificates this CA signs from now on live.
    pub fn set_node_validity(&mut self, validity: Duration) {
        self.node_validity = validity;
    }

    pub fn node_validity(&self) -> Duration {
        self.node_validity
    }

    pub fn host_ssh_public(&self) -> Result<String, CaError> {
        Ok(self.host_ssh.public_key().to_openssh()?)
    }

    pub fn user_ssh_public(&self) -> Result<String, CaError> {
        Ok(self.user_ssh.public_key().to_openssh()?)
    }

    /// The proxy's certificate for its web port and tunnels: valid for [`CLUSTER_SERVER_NAME`]
    /// and `names`, for as long as node certificates, from [`Authorities::server_ca`].
    pub fn issue_web_cert(&self, names: &[String]) -> Result<IssuedPair, CaError> {
        let mut sans = vec![CLUSTER_SERVER_NAME.to_string(), "localhost".to_string()];
        sans.extend(names.iter().filter(|n| !n.is_empty()).cloned());
        sans.dedup();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = self.leaf_params(
            CertRole::Proxy,
            "burrow-proxy",
            sans,
            &[ExtendedKeyUsagePurpose::ServerAuth],
            self.node_validity,
        )?;
        let cert = params.signed_by(&key, self.server_ca().0)?;
        Ok(IssuedPair {
            cert_pem: cert.pem(),
            key_pem: Secret::new(key.serialize_pem()),
        })
    }

    /// The admin identity `burrowctl` authenticates with.
    pub fn issue_admin_identity(&self) -> Result<IssuedPair, CaError> {
        self.issue_pair(
            CertRole::Admin,
            "admin",
            vec![],
            &[ExtendedKeyUsagePurpose::ClientAuth],
            ADMIN_VALIDITY,
        )
    }

    fn issue_pair(
        &self,
        role: CertRole,
        common_name: &str,
        sans: Vec<String>,
        usages: &[ExtendedKeyUsagePurpose],
        validity: Duration,
    ) -> Result<IssuedPair, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = self.leaf_params(role, common_name, sans, usages, validity)?;
        let cert = params.signed_by(&key, &self.host_tls_issuer)?;
        Ok(IssuedPair {
            cert_pem: cert.pem(),
            key_pem: Secret::new(key.serialize_pem()),
        })
    }

    /// Signs a node's TLS certificate for the key in `csr_pem`. The request's own subject and
    /// extensions are ignored: the CA decides what the node is.
    pub fn sign_node_csr(
        &self,
        csr_pem: &str,
        host_id: &str,
        node_name: &str,
    ) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        Ok(self
            .node_params(host_id, node_name)?
            .signed_by(&csr.public_key, &self.host_tls_issuer)?
            .pem())
    }

    /// Signs a node's TLS certificate again for the key of its current one (`spki_der`, from the
    /// certificate it authenticated a tunnel with): a renewal.
    pub fn sign_node_key(
        &self,
        spki_der: &[u8],
        host_id: &str,
        node_name: &str,
    ) -> Result<String, CaError> {
        let key = rcgen::SubjectPublicKeyInfo::from_der(spki_der)?;
        Ok(self
            .node_params(host_id, node_name)?
            .signed_by(&key, &self.host_tls_issuer)?
            .pem())
    }

    fn node_params(&self, host_id: &str, node_name: &str) -> Result<CertificateParams, CaError> {
        self.leaf_params(
            CertRole::Node,
            host_id,
            vec![host_id.to_string(), node_name.to_string()],
            // Client only: no verifier may take a node for a server (a proxy above all).
            &[ExtendedKeyUsagePurpose::ClientAuth],
            self.node_validity,
        )
    }

    /// Signs an SSH host certificate for a node, valid for its host id and its name, bare and
    /// under the cluster's name (`edge-01.CLUSTER`, as `burrowctl ssh-config` reaches nodes).
    pub fn sign_host_ssh(
        &self,
        public_key: &PublicKey,
        host_id: &str,
        node_name: &str,
    ) -> Result<Certificate, CaError> {
        let mut rng = rand::rng();
        let now = unix_now();
        let mut builder = SshCertBuilder::new_with_random_nonce(
            &mut rng,
            public_key.key_data().clone(),
            now.saturating_sub(backdate(self.node_validity).as_secs()),
            now.saturating_add(self.node_validity.as_secs()),
        )?;
        builder
            .serial(rng.random())?
            .key_id(tunnel_proto::api::host_cert_key_id(host_id))?
            .cert_type(CertType::Host)?
            .valid_principal(host_id)?
            .valid_principal(node_name)?
            .valid_principal(format!("{host_id}.{}", self.cluster_name))?
            .valid_principal(format!("{node_name}.{}", self.cluster_name))?;
        Ok(builder.sign(&self.host_ssh)?)
    }

    /// Signs a user's SSH certificate: the logins are its principals.
    pub fn sign_user_ssh(
        &self,
        public_key: &PublicKey,
        user: &str,
        logins: &[String],
        ttl: Duration,
        permissions: &Permissions,
    ) -> Result<Certificate, CaError> {
        let mut rng = rand::rng();
        let now = unix_now();
        let mut builder = SshCertBuilder::new_with_random_nonce(
            &mut rng,
            public_key.key_data().clone(),
            now.saturating_sub(60),
            now.saturating_add(ttl.as_secs()),
        )?;
        builder
            .serial(rng.random())?
            .key_id(user)?
            .cert_type(CertType::User)?;
        for login in logins {
            builder.valid_principal(login.as_str())?;
        }
        if let Some(command) = &permissions.force_command {
            builder.critical_option("force-command", command.as_str())?;
        }
        // Extensions are sorted by name in the encoding, as OpenSSH requires.
        let mut extensions = vec!["permit-X11-forwarding", "permit-agent-forwarding"];
        if permissions.port_forwarding {
            extensions.push("permit-port-forwarding");
        }
        if permissions.pty {
            extensions.push("permit-pty");
        }
        extensions.push("permit-user-rc");
        for ext in extensions {
            builder.extension(ext, "")?;
        }
        Ok(builder.sign(&self.user_ssh)?)
    }

    /// Signs a proxy's SSH host certificate for the names users reach it by, for as long as node
    /// certificates, by [`Authorities::server_ca`].
    pub fn sign_proxy_ssh(
        &self,
        public_key: &PublicKey,
        proxy_id: &str,
        names: &[String],
    ) -> Result<Certificate, CaError> {
        let mut rng = rand::rng();
        let now = unix_now();
        let mut builder = SshCertBuilder::new_with_random_nonce(
            &mut rng,
            public_key.key_data().clone(),
            now.saturating_sub(backdate(self.node_validity).as_secs()),
            now.saturating_add(self.node_validity.as_secs()),
        )?;
        builder
            .serial(rng.random())?
            .key_id(format!("proxy:{proxy_id}"))?
            .cert_type(CertType::Host)?;
        for name in names {
            builder.valid_principal(name.as_str())?;
        }
        Ok(builder.sign(self.server_ca().1)?)
    }

    pub fn user_ssh_ca(&self) -> &PublicKey {
        self.user_ssh.public_key()
    }

    fn leaf_params(
        &self,
        role: CertRole,
        common_name: &str,
        sans: Vec<String>,
        usages: &[ExtendedKeyUsagePurpose],
        validity: Duration,
    ) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name = distinguished_name(common_name, role.organization());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages.to_vec();
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        set_validity(&mut params, validity);
        Ok(params)
    }
}

fn distinguished_name(common_name: &str, organization: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, organization);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - backdate(validity);
    params.not_after = now + validity;
}

/// How far before now a certificate living `validity` starts: [`BACKDATE`], or a quarter of a
/// short lifetime, so that half of the validity window (when agents renew) stays in the future.
fn backdate(validity: Duration) -> Duration {
    BACKDATE.min(validity / 4)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::rng().random();
    // A positive DER integer without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// A random host id in the UUID v4 text format.
pub fn new_host_id() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = tunnel_proto::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authorities() -> Authorities {
        Authorities::load(&StoredAuthorities::generate("test").unwrap()).unwrap()
    }

    #[test]
    fn stored_authorities_reload_with_the_same_pin() {
        let stored = StoredAuthorities::generate("c1").unwrap();
        let json = serde_json::to_vec(&stored).unwrap();
        let again: StoredAuthorities = serde_json::from_slice(&json).unwrap();
        let a = Authorities::load(&stored).unwrap();
        let b = Authorities::load(&again).unwrap();
        assert_eq!(a.pin, b.pin);
        assert_eq!(a.cluster_name, "c1");
        assert_eq!(a.host_ssh_public().unwrap(), b.host_ssh_public().unwrap());
    }

    #[test]
    fn leaf_certificates_carry_their_role_and_chain_to_the_ca() {
        let ca = authorities();
        let admin = ca.issue_admin_identity().unwrap();
        let der = burrow_net::tls::parse_certs(&admin.cert_pem, "admin").unwrap();
        assert_eq!(CertRole::of_certificate(&der[0]), Some(CertRole::Admin));
        let (_, parsed) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca.host_tls_cert_der).unwrap();
        parsed.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(CertRole::of_certificate(b"junk"), None);
    }

    #[test]
    fn node_csr_is_signed_with_the_cas_idea_of_the_subject() {
        let ca = authorities();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut req = CertificateParams::new(vec!["evil.example".into()]).unwrap();
        req.distinguished_name = distinguished_name("someone", "burrow-admin");
        let csr = req.serialize_request(&key).unwrap().pem().unwrap();
        let pem = ca.sign_node_csr(&csr, "host-1", "pi").unwrap();
        let der = burrow_net::tls::parse_certs(&pem, "node").unwrap();
        assert_eq!(CertRole::of_certificate(&der[0]), Some(CertRole::Node));
        let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "host-1"
        );
        assert_eq!(
            cert.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
        assert!(ca.sign_node_csr("not a csr", "h", "n").is_err());
    }

    #[test]
    fn ssh_host_certificates_name_the_host() {
        let ca = authorities();
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let cert = ca.sign_host_ssh(key.public_key(), "host-1", "pi").unwrap();
        assert_eq!(cert.cert_type(), CertType::Host);
        assert_eq!(
            cert.valid_principals(),
            ["host-1", "pi", "host-1.test", "pi.test"]
        );
        let ca_fp = ca.host_ssh.public_key().fingerprint(Default::default());
        cert.validate(&[ca_fp]).unwrap();
    }

    #[test]
    fn host_ids_are_uuid_shaped_and_distinct() {
        let a = new_host_id();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, new_host_id());
    }
}
