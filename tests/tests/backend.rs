//! The backend conformance suite: the same checks against the embedded redb backend and a real
//! etcd (Debian's etcd-server, started on loopback ports picked at run time).

use std::sync::Arc;
use std::time::Duration;

use burrow_proxy::backend::{Backend, BackendError, EtcdBackend, EtcdConfig, Event, RedbBackend};
use burrow_tests::{Etcd, eventually};
use tokio::sync::mpsc::Receiver;

async fn etcd_backend(etcd: &Etcd, prefix: &str) -> EtcdBackend {
    EtcdBackend::connect(&EtcdConfig {
        user: None,
        endpoints: vec![etcd.url.clone()],
        prefix: prefix.to_string(),
        tls: None,
    })
    .await
    .unwrap()
}

/// Waits (bounded) for the next event that is not a duplicate of what the snapshot held.
async fn next_event(rx: &mut Receiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("an event within 20s")
        .expect("the watch is still open")
}

/// Polls `f` (bounded) until it is true.
async fn until(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn get_put_delete(b: &dyn Backend) {
    assert_eq!(b.get("/a").await.unwrap(), None);
    b.put("/a", b"1".to_vec(), None).await.unwrap();
    assert_eq!(b.get("/a").await.unwrap(), Some(b"1".to_vec()));
    b.put("/a", b"2".to_vec(), None).await.unwrap();
    assert_eq!(b.get("/a").await.unwrap(), Some(b"2".to_vec()));
    assert!(b.delete("/a").await.unwrap());
    assert!(!b.delete("/a").await.unwrap());
    assert_eq!(b.get("/a").await.unwrap(), None);
}

async fn compare_and_swap(b: &dyn Backend) {
    assert!(
        b.compare_and_swap("/c", None, b"x".to_vec(), None)
            .await
            .unwrap()
    );
    assert!(
        !b.compare_and_swap("/c", None, b"y".to_vec(), None)
            .await
            .unwrap()
    );
    assert!(
        !b.compare_and_swap("/c", Some(b"y"), b"z".to_vec(), None)
            .await
            .unwrap()
    );
    assert!(
        b.compare_and_swap("/c", Some(b"x"), b"z".to_vec(), None)
            .await
            .unwrap()
    );
    assert_eq!(b.get("/c").await.unwrap(), Some(b"z".to_vec()));
}

/// Many writers race to create one key and to bump a counter: exactly one creates, and no
/// increment is lost.
async fn compare_and_swap_races(b: Arc<dyn Backend>) {
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            b.compare_and_swap("/race/create", None, vec![i], None)
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1, "exactly one creator wins");

    b.put("/race/counter", b"0".to_vec(), None).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                // Read-modify-write until our swap lands; bounded.
                let mut landed = false;
                for _ in 0..200 {
                    let cur = b.get("/race/counter").await.unwrap().unwrap();
                    let n: u32 = String::from_utf8(cur.clone()).unwrap().parse().unwrap();
                    let next = (n + 1).to_string().into_bytes();
                    if b.compare_and_swap("/race/counter", Some(&cur), next, None)
                        .await
                        .unwrap()
                    {
                        landed = true;
                        break;
                    }
                }
                assert!(landed, "an increment landed within 200 tries");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(b.get("/race/counter").await.unwrap(), Some(b"40".to_vec()));
}

async fn list_by_prefix(b: &dyn Backend) {
    for k in ["/t/b", "/t/a", "/tx/c", "/u/d"] {
        b.put(k, k.as_bytes().to_vec(), None).await.unwrap();
    }
    let keys: Vec<String> = b
        .list("/t/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec!["/t/a", "/t/b"]);
    assert_eq!(b.list("/none/").await.unwrap(), vec![]);
}

async fn ttl_expiry(b: &dyn Backend) {
    b.put("/e/short", b"v".to_vec(), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    b.put("/e/long", b"v".to_vec(), Some(Duration::from_secs(600)))
        .await
        .unwrap();
    assert!(b.get("/e/short").await.unwrap().is_some());
    // etcd rounds lease TTLs up to its minimum (about 2 s here), so allow some seconds.
    until("the 1s key expires", Duration::from_secs(10), async || {
        b.get("/e/short").await.unwrap().is_none()
    })
    .await;
    let keys: Vec<String> = b
        .list("/e/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec!["/e/long"]);
    // An expired key counts as absent for compare-and-swap too.
    assert!(
        b.compare_and_swap("/e/short", None, b"w".to_vec(), None)
            .await
            .unwrap()
    );
}

async fn lease_renewal(b: &dyn Backend) {
    let lease = b.grant_lease(Duration::from_secs(2)).await.unwrap();
    b.put_leased("/l/a", b"1".to_vec(), lease).await.unwrap();
    b.put_leased("/l/b", b"2".to_vec(), lease).await.unwrap();
    // Renewed every 500 ms for 5 s: the keys outlive the TTL.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        b.keep_alive(lease).await.unwrap();
    }
    assert_eq!(b.list("/l/").await.unwrap().len(), 2);
    // Left alone, the lease and its keys vanish.
    until(
        "the unrenewed lease expires",
        Duration::from_secs(15),
        async || b.list("/l/").await.unwrap().is_empty(),
    )
    .await;
    let renewed = b.keep_alive(lease).await;
    assert!(
        matches!(renewed, Err(BackendError::LeaseExpired)),
        "{renewed:?}"
    );
    assert!(matches!(
        b.put_leased("/l/c", b"3".to_vec(), lease).await,
        Err(BackendError::LeaseExpired)
    ));
    // Revoking deletes at once.
    let lease = b.grant_lease(Duration::from_secs(60)).await.unwrap();
    b.put_leased("/l/d", b"4".to_vec(), lease).await.unwrap();
    b.revoke_lease(lease).await.unwrap();
    assert_eq!(b.get("/l/d").await.unwrap(), None);
}

async fn watch_delivers_changes(b: &dyn Backend) {
    b.put("/w/before", b"0".to_vec(), None).await.unwrap();
    let (items, mut rx) = b.watch("/w/").await.unwrap();
    assert_eq!(items, vec![("/w/before".to_string(), b"0".to_vec())]);
    b.put("/other/x", b"-".to_vec(), None).await.unwrap();
    b.put("/w/a", b"1".to_vec(), None).await.unwrap();
    assert_eq!(
        next_event(&mut rx).await,
        Event::Put {
            key: "/w/a".into(),
            value: b"1".to_vec()
        }
    );
    b.delete("/w/a").await.unwrap();
    assert_eq!(
        next_event(&mut rx).await,
        Event::Delete { key: "/w/a".into() }
    );
    // Expiry is a delete too.
    b.put("/w/ttl", b"t".to_vec(), Some(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut rx).await,
        Event::Put {
            key: "/w/ttl".into(),
            value: b"t".to_vec()
        }
    );
    assert_eq!(
        next_event(&mut rx).await,
        Event::Delete {
            key: "/w/ttl".into()
        }
    );
}

async fn large_values(b: &dyn Backend) {
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    b.put("/big", big.clone(), None).await.unwrap();
    assert_eq!(b.get("/big").await.unwrap(), Some(big));
}

async fn conformance(b: Arc<dyn Backend>) {
    get_put_delete(b.as_ref()).await;
    compare_and_swap(b.as_ref()).await;
    compare_and_swap_races(b.clone()).await;
    list_by_prefix(b.as_ref()).await;
    ttl_expiry(b.as_ref()).await;
    lease_renewal(b.as_ref()).await;
    watch_delivers_changes(b.as_ref()).await;
    large_values(b.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let b = RedbBackend::open(&dir.path().join("state.redb")).unwrap();
    conformance(Arc::new(b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    conformance(Arc::new(etcd_backend(&etcd, "/conformance").await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_prefixes_keep_clusters_apart() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let one = etcd_backend(&etcd, "/one").await;
    let two = etcd_backend(&etcd, "/two/").await;
    one.put("/k", b"1".to_vec(), None).await.unwrap();
    assert_eq!(two.get("/k").await.unwrap(), None);
    assert_eq!(
        one.list("/").await.unwrap(),
        vec![("/k".to_string(), b"1".to_vec())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_resumes_after_etcd_restarts_and_errors_say_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(dir.path());
    let b = etcd_backend(&etcd, "/r").await;
    let (_, mut rx) = b.watch("/w/").await.unwrap();
    b.put("/w/1", b"1".to_vec(), None).await.unwrap();
    assert_eq!(
        next_event(&mut rx).await,
        Event::Put {
            key: "/w/1".into(),
            value: b"1".to_vec()
        }
    );

    tokio::task::block_in_place(|| etcd.kill());
    let err = b.put("/w/lost", b"x".to_vec(), None).await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("the state backend is unreachable"),
        "{err}"
    );
    tokio::task::block_in_place(|| etcd.restart());

    // The same client and the same watch work again once etcd is back.
    let written = eventually(Duration::from_secs(20), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(b.put("/w/2", b"2".to_vec(), None))
                .ok()
        })
    });
    assert!(written.is_some(), "etcd came back within 20s");
    assert_eq!(
        next_event(&mut rx).await,
        Event::Put {
            key: "/w/2".into(),
            value: b"2".to_vec()
        }
    );
    assert_eq!(
        b.get("/w/1").await.unwrap(),
        Some(b"1".to_vec()),
        "nothing written was lost"
    );
}
