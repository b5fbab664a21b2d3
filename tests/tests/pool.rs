//! The agent pool against several proxies on one etcd behind a real haproxy in round-robin mode:
//! given only the balancer's address, the agent holds one tunnel to each proxy, and keeps doing
//! so when a proxy dies and comes back.

use std::collections::BTreeSet;
use std::path::Path;

use burrow_tests::*;

struct Cluster {
    _dir: tempfile::TempDir,
    _etcd: Etcd,
    proxies: Vec<Option<Proxy>>,
    dirs: Vec<std::path::PathBuf>,
    addrs: Vec<String>,
    lb: Haproxy,
    extra: Vec<String>,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let etcd = Etcd::start(dir.path());
        // The balancer needs the proxies' addresses and the proxies need the balancer's (their
        // public address): pick the proxies' ports first.
        let addrs: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", closed_port()))
            .collect();
        let lb = Haproxy::start(
            dir.path(),
            &addrs.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let extra = vec![
            "--storage".to_string(),
            "etcd".into(),
            "--etcd-endpoint".into(),
            etcd.url.clone(),
            "--public-addr".into(),
            lb.addr.clone(),
        ];
        let dirs: Vec<_> = (0..n)
            .map(|i| dir.path().join(format!("proxy{i}")))
            .collect();
        let mut cluster = Cluster {
            _dir: dir,
            _etcd: etcd,
            proxies: vec![],
            dirs,
            addrs,
            lb,
            extra,
        };
        for i in 0..n {
            let p = cluster.start_proxy(i);
            cluster.proxies.push(Some(p));
        }
        cluster.wait_for_balancer();
        cluster
    }

    /// Waits until the balancer's health checks see every live proxy: round-robin readiness
    /// probes through it reach them all.
    fn wait_for_balancer(&self) {
        let want = self.ids();
        let mut seen = BTreeSet::new();
        eventually(WAIT, || {
            if let Ok(id) = ready_at(&self.lb.addr) {
                seen.insert(id);
            }
            (seen == want).then_some(())
        })
        .unwrap_or_else(|| panic!("the balancer reaches {seen:?}, not all of {want:?}"));
    }

    fn start_proxy(&self, i: usize) -> Proxy {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        Proxy::start_at(&self.dirs[i], &self.addrs[i], &extra)
    }

    fn any(&self) -> &Proxy {
        self.proxies.iter().flatten().next().unwrap()
    }

    fn ids(&self) -> BTreeSet<String> {
        self.proxies
            .iter()
            .flatten()
            .map(|p| p.ready().unwrap())
            .collect()
    }

    /// The proxies `nodes ls` says `host` holds tunnels to.
    fn tunnels_of(&self, host: &str) -> BTreeSet<String> {
        tunnels_of(self.any(), host)
    }

    fn wait_for_tunnels(&self, host: &str, want: &BTreeSet<String>) {
        eventually(WAIT, || (self.tunnels_of(host) == *want).then_some(())).unwrap_or_else(|| {
            panic!(
                "wanted tunnels to {want:?}, nodes ls shows {:?}; proxies ls shows {}",
                self.tunnels_of(host),
                self.any().ctl_json(&["proxies", "ls"])
            )
        });
    }
}

fn agent_behind_lb(cluster: &Cluster, data: &Path, extra: &[&str]) -> Daemon {
    start_agent_via(cluster.any(), &cluster.lb.addr, data, "behind-nat", extra)
}

fn one_tunnel_per_proxy(n: usize) {
    let cluster = Cluster::start(n);
    let ids = cluster.ids();
    assert_eq!(ids.len(), n);
    let data = cluster.dirs[0].parent().unwrap().join("agent");
    let agent = agent_behind_lb(&cluster, &data, &["--transport", "tcp"]);
    let host = host_id(&data);
    cluster.wait_for_tunnels(&host, &ids);
    // Exactly one tunnel per proxy: extra tunnels that landed on a held proxy were closed.
    let log = agent.log();
    let up = log.matches("tunnel up").count();
    let duplicates_closed = cluster
        .proxies
        .iter()
        .flatten()
        .map(|p| p.daemon.log().matches("tunnel down").count())
        .sum::<usize>();
    assert_eq!(up, n, "{log}");
    assert!(
        duplicates_closed <= 3 * n,
        "too many wasted dials: {duplicates_closed}"
    );
}

#[test]
fn behind_round_robin_the_agent_holds_one_tunnel_to_each_of_three_proxies() {
    one_tunnel_per_proxy(3);
}

#[test]
fn behind_round_robin_the_agent_holds_one_tunnel_to_each_of_two_proxies() {
    one_tunnel_per_proxy(2);
}

#[test]
fn a_proxy_killed_and_restarted_loses_and_regains_only_its_tunnel() {
    let mut cluster = Cluster::start(3);
    let ids = cluster.ids();
    let data = cluster.dirs[0].parent().unwrap().join("agent");
    let agent = agent_behind_lb(&cluster, &data, &["--transport", "tcp"]);
    let host = host_id(&data);
    cluster.wait_for_tunnels(&host, &ids);

    let victim = cluster.proxies[1].take().unwrap();
    let victim_id = victim.ready().unwrap();
    let mut victim = victim;
    victim.daemon.kill(); // SIGKILL: no goodbye, no lease revoke
    let survivors: BTreeSet<String> = ids.iter().filter(|id| **id != victim_id).cloned().collect();
    cluster.wait_for_tunnels(&host, &survivors);
    let log = agent.log();
    assert_eq!(
        log.matches("tunnel down").count(),
        1,
        "only the dead proxy's tunnel went down:\n{log}"
    );

    cluster.proxies[1] = Some(cluster.start_proxy(1));
    cluster.wait_for_balancer();
    cluster.wait_for_tunnels(&host, &ids);
    assert_eq!(
        agent.log().matches("tunnel down").count(),
        1,
        "the others stayed up throughout"
    );
}
