//! Nodes as the cluster knows them, read and changed through the backend: the inventory
//! (`burrowctl nodes ls`), removal and revocation (`nodes rm`), and node names (who holds one,
//! freeing one). The tunnel server follows revocations through a backend watch.

use std::collections::{BTreeMap, HashMap, HashSet};

use burrow_daemon::unix_now;
use tunnel_proto::api::{Labels, NodeInfo, Presence};

use crate::backend::{Backend, BackendError};
use crate::state::{self, NodeRecord};

/// Every joined node: those with a tunnel to a live proxy (online), with those proxies, and the
/// others (offline, no proxies) as they were last seen. A proxy that died leaves presence
/// records behind until their TTL; they are not counted.
pub async fn inventory(backend: &dyn Backend) -> Result<Vec<NodeInfo>, BackendError> {
    let live: HashSet<String> = backend
        .list(state::PROXIES)
        .await?
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix(state::PROXIES).map(str::to_string))
        .collect();
    let mut nodes: BTreeMap<String, NodeInfo> = BTreeMap::new();
    for (_, value) in backend.list(state::PRESENCE).await? {
        let Ok(p) = serde_json::from_slice::<Presence>(&value) else {
            continue;
        };
        if !live.contains(&p.proxy_id) {
            continue;
        }
        let node = nodes.entry(p.host_id.clone()).or_insert_with(|| NodeInfo {
            host_id: p.host_id.clone(),
            node_name: p.node_name.clone(),
            version: p.version.clone(),
            labels: Labels::new(),
            proxies: vec![],
            transports: vec![],
            last_seen: 0,
        });
        if p.last_seen >= node.last_seen {
            node.node_name = p.node_name;
            node.version = p.version;
            node.labels = p.labels;
            node.last_seen = p.last_seen;
        }
        node.proxies.push(p.proxy_id);
        node.transports.push(p.transport);
    }
    let mut seen: HashMap<String, Presence> = HashMap::new();
    for (_, value) in backend.list(state::SEEN).await? {
        if let Ok(p) = serde_json::from_slice::<Presence>(&value) {
            seen.insert(p.host_id.clone(), p);
        }
    }
    for (_, value) in backend.list(state::NODES).await? {
        let Ok(record) = serde_json::from_slice::<NodeRecord>(&value) else {
            continue;
        };
        if nodes.contains_key(&record.host_id) {
            continue;
        }
        let last = seen.remove(&record.host_id);
        let node = NodeInfo {
            host_id: record.host_id.clone(),
            node_name: record.node_name,
            version: last.as_ref().map(|p| p.version.clone()).unwrap_or_default(),
            labels: last.as_ref().map_or(record.labels, |p| p.labels.clone()),
            proxies: vec![],
            transports: vec![],
            last_seen: last.map_or(record.joined, |p| p.last_seen),
        };
        nodes.insert(record.host_id, node);
    }
    Ok(nodes.into_values().collect())
}

/// The host ids of every removed node, for the revocation list of their host certificates.
pub async fn revoked_host_ids(backend: &dyn Backend) -> Result<Vec<String>, BackendError> {
    Ok(backend
        .list(state::REVOKED)
        .await?
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix(state::REVOKED).map(str::to_string))
        .collect())
}

/// Revokes a node: it is disconnected everywhere and refused from now on.
pub async fn revoke(backend: &dyn Backend, host_id: &str) -> Result<bool, BackendError> {
    let presence = backend.list(&state::presence_of(host_id)).await?;
    let record = backend.get(&state::node(host_id)).await?;
    if presence.is_empty() && record.is_none() {
        return Ok(false);
    }
    backend
        .put(
            &state::revoked(host_id),
            unix_now().to_string().into_bytes(),
            None,
        )
        .await?;
    backend.delete(&state::node(host_id)).await?;
    backend.delete(&state::seen(host_id)).await?;
    if let Some(record) = record.and_then(|r| serde_json::from_slice::<NodeRecord>(&r).ok()) {
        release_name(backend, &record.node_name, host_id).await?;
    }
    for (key, _) in presence {
        backend.delete(&key).await?;
    }
    Ok(true)
}

/// The host id that holds `name`, if any.
pub async fn name_holder(
    backend: &dyn Backend,
    name: &str,
) -> Result<Option<String>, BackendError> {
    Ok(backend
        .get(&state::node_name(name))
        .await?
        .map(|h| String::from_utf8_lossy(&h).into_owned()))
}

/// Frees `name` if `host_id` holds it. (Nobody else can claim it meanwhile: a claim needs the key
/// to be absent.)
pub async fn release_name(
    backend: &dyn Backend,
    name: &str,
    host_id: &str,
) -> Result<(), BackendError> {
    let key = state::node_name(name);
    if backend.get(&key).await?.as_deref() == Some(host_id.as_bytes()) {
        backend.delete(&key).await?;
    }
    Ok(())
}
