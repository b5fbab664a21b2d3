//! What a user may do on this node: the checks OpenSSH's sshd makes of a user certificate
//! (principals, critical options, extensions), and where `direct-tcpip` may connect.

use std::net::IpAddr;

use russh::keys::ssh_key::{Certificate, PublicKey};

/// What a valid certificate grants.
#[derive(Debug, PartialEq, Eq)]
pub struct Grant {
    pub force_command: Option<String>,
    pub permit_pty: bool,
    pub permit_port_forwarding: bool,
}

/// The checks OpenSSH's sshd makes of a user certificate, against this cluster's user CAs.
pub fn check_certificate(
    cert: &Certificate,
    login: &str,
    user_cas: &[PublicKey],
    client_ip: Option<IpAddr>,
    now: u64,
) -> Result<Grant, String> {
    burrow_sshd::check_user_certificate(cert, user_cas, now)?;
    if !cert.valid_principals().iter().any(|p| p == login) {
        return Err(format!(
            "login {login:?} is not among the certificate's principals"
        ));
    }
    let mut force_command = None;
    for (name, value) in cert.critical_options().iter() {
        match name.as_str() {
            "force-command" => force_command = Some(value.clone()),
            "source-address" => {
                let ip = client_ip.ok_or("the client address is unknown")?;
                if !value.split(',').any(|cidr| cidr_contains(cidr.trim(), ip)) {
                    return Err(format!(
                        "source address {ip} is not allowed by the certificate"
                    ));
                }
            }
            other => return Err(format!("unsupported critical option {other:?}")),
        }
    }
    Ok(Grant {
        force_command,
        permit_pty: cert.extensions().contains_key("permit-pty"),
        permit_port_forwarding: cert.extensions().contains_key("permit-port-forwarding"),
    })
}

pub fn cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    let (net, bits) = match cidr.split_once('/') {
        Some((n, b)) => (n, b.parse::<u32>().ok()),
        None => (cidr, None),
    };
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (net.parse::<IpAddr>(), ip) {
        (Ok(IpAddr::V4(n)), IpAddr::V4(a)) => {
            let bits = bits.unwrap_or(32).min(32);
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (Ok(IpAddr::V6(n)), IpAddr::V6(a)) => {
            let bits = bits.unwrap_or(128).min(128);
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// Where `direct-tcpip` (`ssh -L`) may connect from the node, as sshd's `PermitOpen`: `any` (the
/// default, as in OpenSSH), `none`, or a list of `host:port` where either side may be `*`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PermitOpen {
    #[default]
    Any,
    None,
    Only(Vec<(String, Option<u16>)>),
}

impl PermitOpen {
    /// Parses the config's list; the error says which entry is wrong.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        match entries {
            [] => return Ok(PermitOpen::Any),
            [one] if one == "any" => return Ok(PermitOpen::Any),
            [one] if one == "none" => return Ok(PermitOpen::None),
            _ => {}
        }
        let mut allowed = Vec::with_capacity(entries.len());
        for entry in entries {
            let bad = || {
                format!(
                    "permit_open entry {entry:?} is not HOST:PORT (either may be *), any or none"
                )
            };
            let (host, port) = entry.rsplit_once(':').ok_or_else(bad)?;
            let host = host.trim_matches(['[', ']']);
            if host.is_empty() {
                return Err(bad());
            }
            let port = match port {
                "*" => None,
                p => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?),
            };
            allowed.push((host.to_ascii_lowercase(), port));
        }
        Ok(PermitOpen::Only(allowed))
    }

    /// Whether a forward to `host:port`, as the client named it, is allowed.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        match self {
            PermitOpen::Any => true,
            PermitOpen::None => false,
            PermitOpen::Only(list) => list
                .iter()
                .any(|(h, p)| (h == "*" || *h == host) && p.is_none_or(|p| p == port)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(cidr_contains("10.0.0.0/8", ip));
        assert!(cidr_contains("10.1.2.3", ip));
        assert!(!cidr_contains("10.1.2.4", ip));
        assert!(!cidr_contains("192.168.0.0/16", ip));
        assert!(cidr_contains("0.0.0.0/0", ip));
        assert!(cidr_contains("::1/128", "::1".parse().unwrap()));
        assert!(cidr_contains(
            "127.0.0.0/8",
            "::ffff:127.0.0.1".parse().unwrap()
        ));
        assert!(!cidr_contains("garbage", ip));
    }

    #[test]
    fn permit_open_follows_sshd() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(PermitOpen::parse(&[]).unwrap(), PermitOpen::Any);
        assert!(PermitOpen::parse(&list(&["any"])).unwrap().allows("x", 1));
        assert!(!PermitOpen::parse(&list(&["none"])).unwrap().allows("x", 1));
        let p =
            PermitOpen::parse(&list(&["127.0.0.1:8080", "Db.lan:*", "*:443", "[::1]:22"])).unwrap();
        assert!(p.allows("127.0.0.1", 8080));
        assert!(!p.allows("127.0.0.1", 8081));
        assert!(p.allows("db.lan", 5432));
        assert!(p.allows("example.org", 443));
        assert!(p.allows("::1", 22));
        assert!(!p.allows("10.0.0.1", 22));
        for bad in ["nocolon", ":80", "h:0", "h:x", "h:70000"] {
            assert!(PermitOpen::parse(&list(&[bad])).is_err(), "{bad}");
        }
    }
}
