//! CA rotation: the phases a CA goes through to be replaced without downtime, as stored in the
//! backend with the authorities.
//!
//! | phase | signs | trusted | proxies' own certificates from |
//! | --- | --- | --- | --- |
//! | (standby) | the CA | the CA | the CA |
//! | `init` | old | old and new | old |
//! | `update_clients` | new | old and new | old |
//! | `update_servers` | new | old and new | new |
//! | `rollback` | old | old and new | old |
//!
//! `standby` after `update_servers` retires the old CA; after `rollback`, the new one. The fields
//! of [`StoredAuthorities`] always hold the CA that signs; [`StoredRotation::other`] the other
//! one of the rotating type. Every change is one compare-and-swap of the authorities record, so
//! proxies sharing a backend agree on the phase; each follows the record within seconds
//! ([`crate::certs`]) and tells its agents ([`tunnel_proto::wire::Trust`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tunnel_proto::secret::Secret;

use super::ca::{CaError, StoredAuthorities};

/// How long an automatic rotation takes unless `--grace-period` says: the seeds' default, long
/// enough for agents that are offline for a day to come back into it.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30 * 3600);
/// The shortest grace period (tests use seconds; nobody should in production).
pub const MIN_GRACE_PERIOD: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaType {
    Host,
    User,
}

impl CaType {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "host" => Some(CaType::Host),
            "user" => Some(CaType::User),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CaType::Host => "host",
            CaType::User => "user",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Standby,
    Init,
    UpdateClients,
    UpdateServers,
    Rollback,
}

impl Phase {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "standby" => Phase::Standby,
            "init" => Phase::Init,
            "update_clients" => Phase::UpdateClients,
            "update_servers" => Phase::UpdateServers,
            "rollback" => Phase::Rollback,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Standby => "standby",
            Phase::Init => "init",
            Phase::UpdateClients => "update_clients",
            Phase::UpdateServers => "update_servers",
            Phase::Rollback => "rollback",
        }
    }

    /// The new CA signs (its keys are in the authorities' own fields).
    fn new_signs(self) -> bool {
        matches!(self, Phase::UpdateClients | Phase::UpdateServers)
    }
}

/// The rotating type's CA that does not sign now.
#[derive(Clone, Serialize, Deserialize)]
pub struct OtherCa {
    /// Host rotations: the X.509 CA certificate (PEM) and its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<Secret>,
    /// The SSH CA key (host or user).
    pub ssh_key: Secret,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct StoredRotation {
    pub ca_type: CaType,
    pub phase: Phase,
    /// Unix seconds.
    pub started: u64,
    pub phase_started: u64,
    /// An automatic rotation's length (seconds): it moves on at each third.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<u64>,
    pub other: OtherCa,
}

impl StoredRotation {
    /// When an automatic rotation moves to its next phase.
    pub fn next_phase_at(&self) -> Option<u64> {
        let grace = self.grace_period?;
        let thirds = match self.phase {
            Phase::Init => 1,
            Phase::UpdateClients => 2,
            Phase::UpdateServers => 3,
            Phase::Standby | Phase::Rollback => return None,
        };
        Some(self.started + grace * thirds / 3)
    }

    /// The phase an automatic rotation is due to move to at `now`.
    pub fn due(&self, now: u64) -> Option<Phase> {
        if now < self.next_phase_at()? {
            return None;
        }
        Some(match self.phase {
            Phase::Init => Phase::UpdateClients,
            Phase::UpdateClients => Phase::UpdateServers,
            _ => Phase::Standby,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RotateError {
    #[error("a {0} CA rotation is under way: finish it (--phase standby) or roll it back first")]
    OtherType(&'static str),
    #[error("no {0} CA rotation is under way: start one with --phase init (or no --phase)")]
    NotRotating(&'static str),
    #[error("the {ca} CA rotation is in phase {from}; it cannot move to {to} (next: {next})")]
    BadStep {
        ca: &'static str,
        from: &'static str,
        to: &'static str,
        next: &'static str,
    },
    #[error("the grace period must be at least {0} s")]
    GraceTooShort(u64),
    #[error("cannot create the new CA: {0}")]
    Ca(String),
}

/// `stored` moved to `target` (`None`: an automatic rotation over `grace`) for `ca_type`.
pub fn step(
    stored: &StoredAuthorities,
    ca_type: CaType,
    target: Option<Phase>,
    grace: Option<Duration>,
    now: u64,
) -> Result<StoredAuthorities, RotateError> {
    let name = ca_type.as_str();
    let mut next = stored.clone();
    let current = stored.rotation.as_ref();
    if let Some(r) = current
        && r.ca_type != ca_type
    {
        return Err(RotateError::OtherType(r.ca_type.as_str()));
    }
    let from = current.map_or(Phase::Standby, |r| r.phase);
    let to = target.unwrap_or(Phase::Init);
    let allowed = match from {
        Phase::Standby => &[Phase::Init][..],
        Phase::Init => &[Phase::UpdateClients, Phase::Rollback],
        Phase::UpdateClients => &[Phase::UpdateServers, Phase::Rollback],
        Phase::UpdateServers => &[Phase::Standby, Phase::Rollback],
        Phase::Rollback => &[Phase::Standby],
    };
    if !allowed.contains(&to) {
        if from == Phase::Standby {
            return Err(RotateError::NotRotating(name));
        }
        return Err(RotateError::BadStep {
            ca: name,
            from: from.as_str(),
            to: to.as_str(),
            next: allowed[0].as_str(),
        });
    }
    let grace = match (target, grace) {
        (None, g) => {
            let g = g.unwrap_or(DEFAULT_GRACE_PERIOD);
            if g < MIN_GRACE_PERIOD {
                return Err(RotateError::GraceTooShort(MIN_GRACE_PERIOD.as_secs()));
            }
            Some(g.as_secs())
        }
        // Moving by hand makes a rotation manual from then on.
        (Some(_), _) => None,
    };
    if to == Phase::Standby {
        next.rotation = None;
        return Ok(next);
    }
    let mut rotation = match current {
        Some(r) => r.clone(),
        None => StoredRotation {
            ca_type,
            phase: Phase::Init,
            started: now,
            phase_started: now,
            grace_period: grace,
            other: new_ca(stored, ca_type)?,
        },
    };
    if from.new_signs() != to.new_signs() && from != Phase::Standby {
        swap(&mut next, &mut rotation.other, ca_type);
    }
    rotation.phase = to;
    rotation.phase_started = now;
    rotation.grace_period = grace;
    next.rotation = Some(rotation);
    Ok(next)
}

/// `stored` moved on by its automatic rotation, if one is due at `now`.
pub fn advance(stored: &StoredAuthorities, now: u64) -> Option<StoredAuthorities> {
    let rotation = stored.rotation.as_ref()?;
    let to = rotation.due(now)?;
    let mut next = step(stored, rotation.ca_type, Some(to), None, now).ok()?;
    if let Some(r) = next.rotation.as_mut() {
        r.grace_period = rotation.grace_period;
    }
    Some(next)
}

/// A fresh CA of `ca_type` for `stored`'s cluster.
fn new_ca(stored: &StoredAuthorities, ca_type: CaType) -> Result<OtherCa, RotateError> {
    let fresh = StoredAuthorities::generate(&stored.cluster_name)
        .map_err(|e: CaError| RotateError::Ca(e.to_string()))?;
    Ok(match ca_type {
        CaType::Host => OtherCa {
            tls_cert: Some(fresh.host_tls_cert),
            tls_key: Some(fresh.host_tls_key),
            ssh_key: fresh.host_ssh_key,
        },
        CaType::User => OtherCa {
            tls_cert: None,
            tls_key: None,
            ssh_key: fresh.user_ssh_key,
        },
    })
}

/// Makes `other` sign and the signing CA the other one.
fn swap(stored: &mut StoredAuthorities, other: &mut OtherCa, ca_type: CaType) {
    match ca_type {
        CaType::Host => {
            if let (Some(cert), Some(key)) = (other.tls_cert.as_mut(), other.tls_key.as_mut()) {
                std::mem::swap(&mut stored.host_tls_cert, cert);
                std::mem::swap(&mut stored.host_tls_key, key);
            }
            std::mem::swap(&mut stored.host_ssh_key, &mut other.ssh_key);
        }
        CaType::User => std::mem::swap(&mut stored.user_ssh_key, &mut other.ssh_key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(s: &StoredAuthorities) -> Phase {
        s.rotation.as_ref().map_or(Phase::Standby, |r| r.phase)
    }

    #[test]
    fn a_host_rotation_signs_with_the_new_ca_from_update_clients_and_retires_the_old_at_standby() {
        let old = StoredAuthorities::generate("c").unwrap();
        let init = step(&old, CaType::Host, Some(Phase::Init), None, 100).unwrap();
        assert_eq!(phase(&init), Phase::Init);
        assert_eq!(
            init.host_tls_cert, old.host_tls_cert,
            "the old CA still signs"
        );
        let new_cert = init
            .rotation
            .as_ref()
            .unwrap()
            .other
            .tls_cert
            .clone()
            .unwrap();
        assert_ne!(new_cert, old.host_tls_cert);
        assert_eq!(init.user_ssh_key.expose(), old.user_ssh_key.expose());

        let clients = step(&init, CaType::Host, Some(Phase::UpdateClients), None, 200).unwrap();
        assert_eq!(clients.host_tls_cert, new_cert, "the new CA signs");
        let other = &clients.rotation.as_ref().unwrap().other;
        assert_eq!(other.tls_cert.as_deref(), Some(old.host_tls_cert.as_str()));
        assert_eq!(other.ssh_key.expose(), old.host_ssh_key.expose());

        let servers = step(
            &clients,
            CaType::Host,
            Some(Phase::UpdateServers),
            None,
            300,
        )
        .unwrap();
        assert_eq!(servers.host_tls_cert, new_cert);
        let done = step(&servers, CaType::Host, Some(Phase::Standby), None, 400).unwrap();
        assert!(done.rotation.is_none());
        assert_eq!(done.host_tls_cert, new_cert);
    }

    #[test]
    fn a_rollback_makes_the_old_ca_sign_again_and_standby_then_retires_the_new_one() {
        let old = StoredAuthorities::generate("c").unwrap();
        let init = step(&old, CaType::User, Some(Phase::Init), None, 1).unwrap();
        let clients = step(&init, CaType::User, Some(Phase::UpdateClients), None, 2).unwrap();
        assert_ne!(clients.user_ssh_key.expose(), old.user_ssh_key.expose());
        let back = step(&clients, CaType::User, Some(Phase::Rollback), None, 3).unwrap();
        assert_eq!(back.user_ssh_key.expose(), old.user_ssh_key.expose());
        let done = step(&back, CaType::User, Some(Phase::Standby), None, 4).unwrap();
        assert!(done.rotation.is_none());
        assert_eq!(done.user_ssh_key.expose(), old.user_ssh_key.expose());
        assert_eq!(done.host_tls_cert, old.host_tls_cert);
    }

    #[test]
    fn phases_go_in_order_and_one_type_at_a_time() {
        let old = StoredAuthorities::generate("c").unwrap();
        assert_eq!(
            step(&old, CaType::Host, Some(Phase::UpdateServers), None, 1).err(),
            Some(RotateError::NotRotating("host"))
        );
        let init = step(&old, CaType::Host, Some(Phase::Init), None, 1).unwrap();
        assert_eq!(
            step(&init, CaType::User, Some(Phase::Init), None, 1).err(),
            Some(RotateError::OtherType("host"))
        );
        assert!(matches!(
            step(&init, CaType::Host, Some(Phase::Standby), None, 1),
            Err(RotateError::BadStep {
                next: "update_clients",
                ..
            })
        ));
        assert!(matches!(
            step(&init, CaType::Host, None, None, 1),
            Err(RotateError::BadStep { .. })
        ));
    }

    #[test]
    fn an_automatic_rotation_moves_on_at_each_third_of_its_grace_period() {
        let old = StoredAuthorities::generate("c").unwrap();
        assert_eq!(
            step(&old, CaType::Host, None, Some(Duration::from_secs(5)), 0).err(),
            Some(RotateError::GraceTooShort(15))
        );
        let init = step(
            &old,
            CaType::Host,
            None,
            Some(Duration::from_secs(300)),
            1000,
        )
        .unwrap();
        let r = init.rotation.as_ref().unwrap();
        assert_eq!(r.phase, Phase::Init);
        assert_eq!(r.next_phase_at(), Some(1100));
        assert_eq!(r.due(1099), None);
        assert_eq!(r.due(1100), Some(Phase::UpdateClients));
        assert!(advance(&init, 1099).is_none());
        let clients = advance(&init, 1100).unwrap();
        let r = clients.rotation.as_ref().unwrap();
        assert_eq!(
            (r.phase, r.next_phase_at()),
            (Phase::UpdateClients, Some(1200))
        );
        let servers = advance(&clients, 1250).unwrap();
        assert_eq!(
            servers.rotation.as_ref().unwrap().phase,
            Phase::UpdateServers
        );
        let done = advance(&servers, 1300).unwrap();
        assert!(done.rotation.is_none());
        assert_eq!(
            done.host_tls_cert, clients.host_tls_cert,
            "the new CA stays"
        );
        // Moved by hand, a rotation is manual from then on.
        let manual = step(&clients, CaType::Host, Some(Phase::Rollback), None, 1150).unwrap();
        assert_eq!(manual.rotation.as_ref().unwrap().grace_period, None);
        assert!(advance(&manual, 99_999).is_none());
    }
}
