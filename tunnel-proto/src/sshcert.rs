//! What the proxy's and the node's SSH servers share: their russh configuration, and the checks
//! every user certificate must pass before either looks at logins.

use std::time::Duration;

use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::{Certificate, PrivateKey, PublicKey};
use russh::{MethodKind, MethodSet};

/// A server that presents `cert` for `key` and takes public keys (certificates) only.
pub fn server_config(key: PrivateKey, cert: Certificate) -> russh::server::Config {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    russh::server::Config {
        keys: vec![key],
        certificates: vec![cert],
        methods,
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    }
}

/// A user certificate: of type user, signed by one of `user_cas`, valid at `now`.
pub fn check_user_certificate(
    cert: &Certificate,
    user_cas: &[PublicKey],
    now: u64,
) -> Result<(), String> {
    if cert.cert_type() != CertType::User {
        return Err("not a user certificate".into());
    }
    if !user_cas
        .iter()
        .any(|ca| ca.key_data() == cert.signature_key())
    {
        return Err("not signed by this cluster's user CA".into());
    }
    if now < cert.valid_after() || now >= cert.valid_before() {
        return Err("the certificate has expired or is not yet valid".into());
    }
    Ok(())
}
