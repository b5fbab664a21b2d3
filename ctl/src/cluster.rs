//! The cluster's own state: `status`, the admin identity's renewal, and CA rotation.

use std::time::Duration;

use burrow_net::tls;
use serde_json::json;
use tunnel_proto::api::{self, RotationStatus, StatusResponse};

use crate::cli::Format;
use crate::output::{print_json, rfc3339};
use crate::{Admin, Failure, usage};

pub async fn status(admin: &Admin, format: Format) -> Result<(), Failure> {
    let s: StatusResponse = admin.client.get(api::STATUS_PATH).await?;
    match format {
        Format::Json => print_json(&json!({
            "cluster_name": s.cluster_name,
            "version": s.version,
            "ca_pin": s.ca_pins.first(),
            "ca_pins": s.ca_pins,
            "public_addr": s.public_addr,
            "admin_identity_expires": admin.expires,
            "rotation": s.rotation,
        })),
        Format::Text | Format::Ansible => {
            println!("Cluster:  {}", s.cluster_name);
            println!("Version:  {}", s.version);
            print_pins(&s);
            if let Some(to) = admin.expires {
                let days = to.saturating_sub(burrow_daemon::unix_now()) / 86_400;
                println!(
                    "Admin identity: valid until {} ({days} days left; `burrowctl auth renew` replaces it)",
                    rfc3339(to)
                );
            }
            if let Some(r) = &s.rotation {
                print_rotation(r);
            }
        }
    }
    Ok(())
}

fn print_pins(s: &StatusResponse) {
    for (i, pin) in s.ca_pins.iter().enumerate() {
        let role = match (&s.rotation, i) {
            (None, _) => "",
            (Some(_), 0) => " (signs)",
            (Some(_), _) => " (trusted during the rotation)",
        };
        println!("CA pin:   {pin}{role}");
    }
}

fn print_rotation(r: &RotationStatus) {
    println!(
        "Rotation: {} CA, phase {} since {}",
        r.ca_type,
        r.phase,
        rfc3339(r.phase_started)
    );
    if let Some(at) = r.next_phase_at {
        println!("          automatic: next phase at {}", rfc3339(at));
    }
    let t = &r.ca_type;
    let next = match r.phase.as_str() {
        "init" => format!(
            "Both {t} CAs are trusted; the old one signs. Give users both CA lines (`burrowctl auth export --type {t}`), then: burrowctl auth rotate --type {t} --phase update_clients"
        ),
        "update_clients" => format!(
            "The new {t} CA signs: nodes renew their certificates over their tunnels now; renew admin identities used elsewhere (`burrowctl auth renew`). Then: burrowctl auth rotate --type {t} --phase update_servers"
        ),
        "update_servers" => format!(
            "Proxies present certificates from the new CA. Then retire the old one: burrowctl auth rotate --type {t} --phase standby (or --phase rollback)"
        ),
        "rollback" => format!(
            "The old {t} CA signs again and nodes renew from it. Then retire the new one: burrowctl auth rotate --type {t} --phase standby"
        ),
        _ => String::new(),
    };
    println!("          {next}");
}

/// `auth rotate`: a rotation started (automatic over `grace` without a phase), moved or rolled
/// back.
pub async fn rotate(
    admin: &Admin,
    format: Format,
    kind: &str,
    phase: Option<&str>,
    grace: Option<Duration>,
) -> Result<(), Failure> {
    let request = api::RotateRequest {
        ca_type: kind.to_string(),
        phase: phase.map(str::to_string),
        grace_period_secs: grace.map(|g| g.as_secs()),
    };
    let s: StatusResponse = admin.client.post(api::AUTH_ROTATE_PATH, &request).await?;
    match format {
        Format::Json => print_json(&json!({
            "ca_pins": s.ca_pins,
            "rotation": s.rotation,
        })),
        Format::Text | Format::Ansible => {
            print_pins(&s);
            match &s.rotation {
                Some(r) => print_rotation(r),
                None => println!(
                    "Rotation: done; the {kind} CA above is the only one. Agents that join from now on take its pin."
                ),
            }
        }
    }
    Ok(())
}

/// `--grace-period`: how long an automatic rotation takes.
pub fn parse_grace(text: &str) -> Result<Duration, Failure> {
    humantime::parse_duration(text).map_err(|e| {
        usage(format!(
            "--grace-period {text:?} is not a duration like 30h or 10m: {e}"
        ))
    })
}

/// `auth renew`: a new admin identity from the proxy, written over the one in use.
pub async fn renew_identity(admin: &Admin, format: Format) -> Result<(), Failure> {
    let renewed: api::AdminIdentity = admin
        .client
        .post(api::AUTH_RENEW_ADMIN_PATH, &json!({}))
        .await?;
    let text = renewed.identity.expose();
    let expires = tls::validity(text)
        .map(|(_, to)| to)
        .ok_or_else(|| Failure {
            code: 1,
            message: "the proxy sent an admin identity whose certificate does not parse".into(),
        })?;
    let path = &admin.identity_path;
    burrow_daemon::fsutil::write_private_atomic(path, text.as_bytes()).map_err(|e| Failure {
        code: 1,
        message: format!("cannot write {}: {e}", path.display()),
    })?;
    match format {
        Format::Json => print_json(&json!({ "path": path, "expires": expires })),
        Format::Text | Format::Ansible => println!(
            "Renewed the admin identity {}: valid until {}",
            path.display(),
            rfc3339(expires)
        ),
    }
    Ok(())
}
