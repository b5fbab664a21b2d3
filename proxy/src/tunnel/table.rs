//! The proxy's tunnels, by id and by the node they belong to: admitting a tunnel, ending one and
//! finding a node's tunnels for a dial look at that node's tunnels only, not at every tunnel the
//! proxy holds (at 10,000 tunnels a scan per admission made a fleet's return quadratic).

use std::collections::HashMap;

use burrow_tunnel::Session;

use super::route::DialError;

/// One tunnel in the table.
pub(super) struct Entry<S = Session> {
    pub host_id: String,
    pub node_name: String,
    pub session: S,
}

/// Tunnels by id (ids grow: a larger one is newer), with indexes by host id and by node name.
pub(super) struct Table<S = Session> {
    by_id: HashMap<u64, Entry<S>>,
    by_host: HashMap<String, Vec<u64>>,
    by_name: HashMap<String, Vec<u64>>,
}

impl<S> Default for Table<S> {
    fn default() -> Self {
        Self {
            by_id: HashMap::new(),
            by_host: HashMap::new(),
            by_name: HashMap::new(),
        }
    }
}

impl<S: Clone> Table<S> {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// How many tunnels `host_id` holds here.
    /// How many nodes hold at least one tunnel.
    pub fn nodes(&self) -> usize {
        self.by_host.len()
    }

    pub fn held(&self, host_id: &str) -> usize {
        self.by_host.get(host_id).map_or(0, Vec::len)
    }

    pub fn insert(&mut self, id: u64, entry: Entry<S>) {
        self.by_host
            .entry(entry.host_id.clone())
            .or_default()
            .push(id);
        self.by_name
            .entry(entry.node_name.clone())
            .or_default()
            .push(id);
        if let Some(old) = self.by_id.insert(id, entry) {
            // Ids are never reused; should one be, its old index entries go.
            unindex(&mut self.by_host, &old.host_id, id);
            unindex(&mut self.by_name, &old.node_name, id);
        }
    }

    pub fn remove(&mut self, id: u64) -> Option<Entry<S>> {
        let gone = self.by_id.remove(&id)?;
        unindex(&mut self.by_host, &gone.host_id, id);
        unindex(&mut self.by_name, &gone.node_name, id);
        Some(gone)
    }

    /// The tunnels of `host_id`.
    pub fn of_host<'a>(&'a self, host_id: &str) -> impl Iterator<Item = &'a Entry<S>> + 'a {
        let ids = self.by_host.get(host_id).map_or(&[][..], Vec::as_slice);
        ids.iter().filter_map(|id| self.by_id.get(id))
    }

    /// The newest tunnel of the one node whose host id or name is `target`; an error if the
    /// name is held by several host ids at once.
    pub fn find(&self, target: &str) -> Result<Option<S>, DialError> {
        let mut newest: HashMap<&str, u64> = HashMap::new();
        let ids = [self.by_host.get(target), self.by_name.get(target)];
        for id in ids.into_iter().flatten().flatten() {
            let Some(e) = self.by_id.get(id) else {
                continue;
            };
            // The newest tunnel of a host (a QUIC one replacing TCP, say).
            let slot = newest.entry(e.host_id.as_str()).or_insert(*id);
            *slot = (*slot).max(*id);
        }
        match newest.len() {
            0 => Ok(None),
            1 => Ok(newest
                .into_values()
                .next()
                .and_then(|id| self.by_id.get(&id))
                .map(|e| e.session.clone())),
            _ => {
                let mut host_ids: Vec<String> = newest.keys().map(|h| h.to_string()).collect();
                host_ids.sort();
                Err(DialError::Ambiguous {
                    name: target.to_string(),
                    host_ids,
                })
            }
        }
    }
}

fn unindex(index: &mut HashMap<String, Vec<u64>>, key: &str, id: u64) {
    if let Some(ids) = index.get_mut(key) {
        ids.retain(|i| *i != id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(host_id: &str, node_name: &str, session: u32) -> Entry<u32> {
        Entry {
            host_id: host_id.into(),
            node_name: node_name.into(),
            session,
        }
    }

    #[test]
    fn a_node_is_found_by_host_id_or_name_and_its_newest_tunnel_wins() {
        let mut t = Table::default();
        t.insert(1, entry("h1", "edge", 10));
        t.insert(2, entry("h2", "pi", 20));
        t.insert(3, entry("h1", "edge", 30));
        assert_eq!(
            (t.len(), t.held("h1"), t.held("h2"), t.held("h3")),
            (3, 2, 1, 0)
        );
        assert_eq!(t.find("h1").unwrap(), Some(30));
        assert_eq!(t.find("edge").unwrap(), Some(30));
        assert_eq!(t.find("pi").unwrap(), Some(20));
        assert_eq!(t.find("nobody").unwrap(), None);
        let sessions: Vec<u32> = t.of_host("h1").map(|e| e.session).collect();
        assert_eq!(sessions, [10, 30]);

        assert_eq!(t.remove(3).map(|e| e.session), Some(30));
        assert!(t.remove(3).is_none());
        assert_eq!(t.find("edge").unwrap(), Some(10));
        t.remove(1);
        assert_eq!((t.len(), t.held("h1")), (1, 0));
        assert_eq!(t.find("edge").unwrap(), None);
        assert!(!t.by_host.contains_key("h1") && !t.by_name.contains_key("edge"));
    }

    #[test]
    fn a_name_two_host_ids_hold_at_once_is_ambiguous() {
        let mut t = Table::default();
        t.insert(1, entry("h2", "edge", 1));
        t.insert(2, entry("h1", "edge", 2));
        match t.find("edge") {
            Err(DialError::Ambiguous { name, host_ids }) => {
                assert_eq!(name, "edge");
                assert_eq!(host_ids, ["h1", "h2"]);
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        // By host id each is still reachable.
        assert_eq!(t.find("h2").unwrap(), Some(1));
    }
}
