//! The membership state machine's tests: every decision, without sockets or a runtime.

use super::*;
use crate::pool::TransportMode;

fn proxies(ids: &[&str]) -> Vec<ProxyEntry> {
    ids.iter()
        .map(|id| ProxyEntry { id: id.to_string() })
        .collect()
}

fn landed(plan: DialPlan, proxy: &str, transport: Transport, list: &[&str]) -> DialOutcome {
    DialOutcome {
        plan,
        result: Ok(Landed {
            proxy_id: proxy.to_string(),
            transport,
            proxies: proxies(list),
        }),
        failed: Vec::new(),
    }
}

fn advised(after: Duration) -> Advice {
    Advice {
        reconnect_after: Some(after),
        return_window: None,
    }
}

fn refused(plan: DialPlan, code: Refusal) -> DialOutcome {
    DialOutcome {
        plan,
        result: Err(DialFailure::Refused {
            code: Some(code),
            reason: format!("{code:?}"),
        }),
        failed: Vec::new(),
    }
}

/// Dials until no dial is due, letting each land on the next proxy of `landings`; returns
/// the decisions.
fn dial_all(
    m: &mut Membership,
    now: &mut Instant,
    landings: &[(&str, Transport)],
    list: &[&str],
) -> Vec<Decision> {
    let mut decisions = Vec::new();
    for (proxy, transport) in landings {
        *now = m.poll_timeout(*now).max(*now);
        let plan = m.poll_dial(*now).expect("a dial is due");
        decisions.push(m.handle_dialed(*now, landed(plan, proxy, *transport, list)));
    }
    decisions
}

#[test]
fn the_first_dial_is_due_at_once_and_one_dial_runs_at_a_time() {
    let now = Instant::now();
    let mut m = Membership::new(TransportMode::Auto.ladder(), now);
    let plan = m.poll_dial(now).unwrap();
    assert_eq!(
        plan,
        DialPlan {
            tries: vec![Transport::Quic, Transport::Tcp, Transport::Upgrade],
            retry: false
        }
    );
    assert_eq!(m.poll_dial(now), None, "a second dial while one runs");
    assert!(m.poll_timeout(now) >= now + Duration::from_secs(60));
}

#[test]
fn a_tunnel_to_a_proxy_already_held_is_closed_and_the_next_dial_comes_soon() {
    let mut now = Instant::now();
    let mut m = Membership::new(TransportMode::Tcp.ladder(), now);
    let d = dial_all(
        &mut m,
        &mut now,
        &[
            ("a", Transport::Tcp),
            ("a", Transport::Tcp),
            ("b", Transport::Tcp),
        ],
        &["a", "b"],
    );
    assert_eq!(
        d,
        [
            Decision::Adopt {
                tunnel: 1,
                replaces: None
            },
            Decision::Duplicate,
            Decision::Adopt {
                tunnel: 2,
                replaces: None
            },
        ]
    );
    assert_eq!(m.counts(), (2, 2));
    // Every proxy held: no dial is due.
    assert_eq!(m.poll_dial(now + Duration::from_secs(600)), None);
}

#[test]
fn duplicates_back_off_from_50ms_up_to_5s() {
    let mut now = Instant::now();
    let mut m = Membership::new(TransportMode::Tcp.ladder(), now);
    dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a", "b"]);
    let mut waits = Vec::new();
    for _ in 0..12 {
        let plan = m.poll_dial(now).unwrap();
        assert_eq!(
            m.handle_dialed(now, landed(plan, "a", Transport::Tcp, &["a", "b"])),
            Decision::Duplicate
        );
        let due = m.poll_timeout(now);
        waits.push(due - now);
        now = due;
    }
    assert!(
        waits.iter().all(|w| *w <= Duration::from_secs(5)),
        "{waits:?}"
    );
    assert!(waits[0] <= Duration::from_millis(50), "{waits:?}");
}

#[test]
fn a_proxy_leaving_the_list_is_let_go_and_one_joining_is_dialed() {
    let mut now = Instant::now();
    let mut m = Membership::new(TransportMode::Tcp.ladder(), now);
    dial_all(
        &mut m,
        &mut now,
        &[("a", Transport::Tcp), ("b", Transport::Tcp)],
        &["a", "b"],
    );
    assert_eq!(m.poll_dial(now), None);
    // b leaves: its tunnel (2) is let go, nothing to dial.
    assert_eq!(m.handle_proxies(proxies(&["a"])), [("b".to_string(), 2)]);
    assert_eq!(m.counts(), (1, 1));
    assert_eq!(m.poll_dial(now), None);
    // c joins: a dial is due at once.
    assert!(m.handle_proxies(proxies(&["a", "c"])).is_empty());
    let plan = m.poll_dial(now).expect("dial for the new proxy");
    assert_eq!(
        m.handle_dialed(now, landed(plan, "c", Transport::Tcp, &["a", "c"])),
        Decision::Adopt {
            tunnel: 3,
            replaces: None
        }
    );
    // The released tunnel's end is not a loss: no reconnect is scheduled for it.
    assert!(!m.handle_closed(now, "b", 2, Advice::default()));
    assert_eq!(m.poll_dial(now), None);
}

#[test]
fn blocked_udp_falls_back_to_tcp_and_quic_replaces_each_tcp_tunnel_when_it_returns() {
    let mut now = Instant::now();
    let mut m = Membership::new(TransportMode::Auto.ladder(), now);
    let plan = m.poll_dial(now).unwrap();
    let mut first = landed(plan, "a", Transport::Tcp, &["a"]);
    first.failed = vec![(Transport::Quic, "no answer".into())];
    assert_eq!(
        m.handle_dialed(now, first),
        Decision::Adopt {
            tunnel: 1,
            replaces: None
        }
    );
    assert_eq!(
        m.take_notes(),
        [Note::Blocked {
            blocked: Transport::Quic,
            using: Transport::Tcp,
            reason: "no answer".into()
        }]
    );
    // Held on TCP: the next wake is the QUIC retry, RETRY_EVERY later.
    assert_eq!(m.poll_dial(now), None);
    let retry_at = m.poll_timeout(now);
    assert_eq!(retry_at - now, RETRY_EVERY);
    now = retry_at;
    let retry = m.poll_dial(now).unwrap();
    assert_eq!(
        retry,
        DialPlan {
            tries: vec![Transport::Quic],
            retry: true
        }
    );
    // Still blocked: the tunnel stays on TCP and each retry waits twice as long as the last,
    // up to the cap (a network that blocks UDP for good is not probed every 10 s).
    let mut waits = Vec::new();
    let retry = loop {
        let blocked = DialOutcome {
            plan: retry.clone(),
            result: Err(DialFailure::Failed("no QUIC answer".into())),
            failed: vec![(Transport::Quic, "no QUIC answer".into())],
        };
        assert_eq!(m.handle_dialed(now, blocked), Decision::Retry);
        assert!(matches!(m.take_notes()[..], [Note::StillBlocked { .. }]));
        let next = m.poll_timeout(now);
        waits.push((next - now).as_secs());
        now = next;
        let retry = m.poll_dial(now).unwrap();
        assert!(retry.retry);
        if waits.len() == 8 {
            break retry;
        }
    };
    assert_eq!(waits, [20, 40, 80, 160, 320, 640, 900, 900]);
    // QUIC gets through: the QUIC tunnel replaces the TCP one to the same proxy.
    assert_eq!(
        m.handle_dialed(now, landed(retry, "a", Transport::Quic, &["a"])),
        Decision::Adopt {
            tunnel: 2,
            replaces: Some(1)
        }
    );
    assert_eq!(m.take_notes(), [Note::Back(Transport::Quic)]);
    // The replaced tunnel's end changes nothing; on QUIC no retry is due any more.
    assert!(!m.handle_closed(now, "a", 1, Advice::default()));
    assert_eq!(m.poll_dial(now + RETRY_EVERY * 3), None);
}

#[test]
fn a_quic_tunnel_is_not_replaced_by_tcp() {
    let mut now = Instant::now();
    let mut m = Membership::new(TransportMode::Auto.ladder(), now);
    let d = dial_all(
        &mut m,
        &mut now,
        &[("a", Transport::Quic), ("a", Transport::Tcp)],
        &["a", "b"],
    );
    assert_eq!(d[1], Decision::Duplicate);
}

#[test]
fn revocation_arriving_in_the_handshake_ends_the_pool_even_with_tunnels_held() {
    let mut now = Instant::now();
    let mut m = Membership::new(TransportMode::Tcp.ladder(), now);
    dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a", "b"]);
    let plan = m.poll_dial(now).unwrap();
    assert_eq!(
        m.handle_dialed(now, refused(plan, Refusal::Revoked)),
        Decision::GiveUp {
            reason: "Revoked".into()
        }
    );
    assert_eq!(m.release_all(), [1]);
}

#[test]
fn transient_refusals_back_off_and_keep_dialing() {
    for code in [
        Refusal::UnsupportedVersion,
        Refusal::Overloaded,
        Refusal::ShuttingDown,
        Refusal::Protocol,
        Refusal::Unknown,
    ] {
        let mut now = Instant::now();
        let mut m = Membership::new(TransportMode::Tcp.ladder(), now);
        let mut ceilings = Vec::new();
        for _ in 0..4 {
            let plan = m.poll_dial(now).expect("still dialing");
            assert_eq!(m.handle_dialed(now, refused(plan, code)), Decision::Retry);
            match &m.take_notes()[..] {
                [Note::DialFailed { retry_in, reason }] => {
                    assert!(reason.contains(&format!("{code:?}")), "{reason}");
                    ceilings.push(*retry_in);
                }
                other => panic!("{other:?}"),
            }
            now = m.poll_timeout(now);
        }
        assert!(
            ceilings.iter().all(|d| *d <= Duration::from_secs(4)),
            "{code:?}: {ceilings:?}"
        );
    }
}

#[test]
fn a_reconnect_advisory_brings_the_agent_back_after_a_jittered_wait() {
    let mut now = Instant::now();
    let mut m = Membership::new(TransportMode::Tcp.ladder(), now);
    dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a"]);
    let after = Duration::from_secs(2);
    assert!(m.handle_closed(now, "a", 1, advised(after)));
    let wait = m.poll_timeout(now) - now;
    assert!(wait >= after / 2 && wait <= after * 3 / 2, "{wait:?}");
    assert_eq!(m.poll_dial(now + wait / 2), None, "not before the advisory");
    assert!(m.poll_dial(now + wait).is_some());
}

#[test]
fn a_reconnect_advisory_cannot_park_the_agent_for_more_than_a_minute_and_a_half() {
    let mut now = Instant::now();
    let mut m = Membership::new(TransportMode::Tcp.ladder(), now);
    dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a"]);
    assert!(m.handle_closed(now, "a", 1, advised(Duration::from_secs(86_400))));
    assert!(m.poll_timeout(now) - now <= MAX_RECONNECT_AFTER * 3 / 2);
}

#[test]
fn a_fleet_losing_its_proxy_spreads_its_return_over_the_proxys_window() {
    let window = Duration::from_millis(16_384);
    let mut waits = Vec::new();
    for _ in 0..1000 {
        let mut now = Instant::now();
        let mut m = Membership::new(TransportMode::Tcp.ladder(), now);
        dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a"]);
        let lost = Advice {
            reconnect_after: None,
            return_window: Some(window),
        };
        assert!(m.handle_closed(now, "a", 1, lost));
        waits.push(m.poll_timeout(now) - now);
    }
    assert!(
        waits.iter().all(|w| *w <= window),
        "a wait beyond the window"
    );
    // Spread over the whole window, not bunched in the first backoff (0-0.5 s).
    let late = waits.iter().filter(|w| **w > window / 2).count();
    assert!(
        late > 350 && late < 650,
        "{late} of 1000 in the second half"
    );
    // Without a window, the first backoff step (at most 0.5 s) is all the agent waits.
    let mut now = Instant::now();
    let mut m = Membership::new(TransportMode::Tcp.ladder(), now);
    dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a"]);
    assert!(m.handle_closed(now, "a", 1, Advice::default()));
    assert!(m.poll_timeout(now) - now <= Duration::from_millis(500));
}

#[test]
fn through_a_balancer_that_terminates_tls_auto_goes_down_to_the_upgrade_and_back_up() {
    let start = Instant::now();
    let mut now = start;
    let mut m = Membership::new(TransportMode::Auto.ladder(), now);
    let plan = m.poll_dial(now).unwrap();
    let mut first = landed(plan, "a", Transport::Upgrade, &["a", "b"]);
    first.failed = vec![
        (Transport::Quic, "no answer".into()),
        (Transport::Tcp, "no tunnel protocol".into()),
    ];
    assert_eq!(
        m.handle_dialed(now, first),
        Decision::Adopt {
            tunnel: 1,
            replaces: None
        }
    );
    assert_eq!(
        m.take_notes(),
        [
            Note::Blocked {
                blocked: Transport::Quic,
                using: Transport::Upgrade,
                reason: "no answer".into()
            },
            Note::Blocked {
                blocked: Transport::Tcp,
                using: Transport::Upgrade,
                reason: "no tunnel protocol".into()
            }
        ]
    );
    // The next tunnel starts on the upgrade: no time lost on QUIC and TCP again.
    let plan = m.poll_dial(now).unwrap();
    assert_eq!(
        plan,
        DialPlan {
            tries: vec![Transport::Upgrade],
            retry: false
        }
    );
    assert!(matches!(
        m.handle_dialed(now, landed(plan, "b", Transport::Upgrade, &["a", "b"])),
        Decision::Adopt { tunnel: 2, .. }
    ));
    // In the background: QUIC, then TLS over TCP.
    now = m.poll_timeout(now);
    assert_eq!(now - start, RETRY_EVERY);
    let retry = m.poll_dial(now).unwrap();
    assert_eq!(
        retry,
        DialPlan {
            tries: vec![Transport::Quic, Transport::Tcp],
            retry: true
        }
    );
    // TLS over TCP gets through again (QUIC still does not): b's tunnel moves up to it.
    let mut up = landed(retry, "b", Transport::Tcp, &["a", "b"]);
    up.failed = vec![(Transport::Quic, "no answer".into())];
    assert_eq!(
        m.handle_dialed(now, up),
        Decision::Adopt {
            tunnel: 3,
            replaces: Some(2)
        }
    );
    assert_eq!(m.take_notes(), [Note::Back(Transport::Tcp)]);
    // A tunnel lost now comes back from TLS over TCP down.
    assert!(m.handle_closed(now, "a", 1, Advice::default()));
    now += m.dial_wait(now);
    let plan = m.poll_dial(now).unwrap();
    assert_eq!(
        plan,
        DialPlan {
            tries: vec![Transport::Tcp, Transport::Upgrade],
            retry: false
        }
    );
    // An upgraded tunnel never replaces a TCP one.
    assert_eq!(
        m.handle_dialed(now, landed(plan, "b", Transport::Upgrade, &["a", "b"])),
        Decision::Duplicate
    );
}

#[test]
fn a_dial_where_every_transport_fails_tries_the_whole_ladder_next() {
    let mut now = Instant::now();
    let mut m = Membership::new(TransportMode::Auto.ladder(), now);
    // Down to the upgrade (a balancer that terminates TLS), then the tunnel is lost.
    let plan = m.poll_dial(now).unwrap();
    let mut first = landed(plan, "a", Transport::Upgrade, &["a"]);
    first.failed = vec![
        (Transport::Quic, "no answer".into()),
        (Transport::Tcp, "no tunnel protocol".into()),
    ];
    m.handle_dialed(now, first);
    assert!(m.handle_closed(now, "a", 1, Advice::default()));
    now += m.dial_wait(now);
    let plan = m.poll_dial(now).unwrap();
    assert_eq!(plan.tries, [Transport::Upgrade]);
    // The upgrade fails too (the balancer is gone): the next dial tries everything again,
    // rather than the upgrade alone for ever.
    let down = DialOutcome {
        plan,
        result: Err(DialFailure::Failed("connection refused".into())),
        failed: vec![(Transport::Upgrade, "connection refused".into())],
    };
    assert_eq!(m.handle_dialed(now, down), Decision::Retry);
    now = m.poll_timeout(now);
    assert_eq!(
        m.poll_dial(now).unwrap().tries,
        TransportMode::Auto.ladder()
    );
}

#[test]
fn a_retry_that_reaches_a_proxy_held_as_well_backs_off() {
    let start = Instant::now();
    let mut now = start;
    let mut m = Membership::new(TransportMode::Auto.ladder(), now);
    // a over TCP (QUIC blocked), b over the upgrade.
    let plan = m.poll_dial(now).unwrap();
    let mut first = landed(plan, "a", Transport::Tcp, &["a", "b"]);
    first.failed = vec![(Transport::Quic, "no answer".into())];
    m.handle_dialed(now, first);
    let plan = m.poll_dial(now).unwrap();
    let mut second = landed(plan, "b", Transport::Upgrade, &["a", "b"]);
    second.failed = vec![(Transport::Tcp, "no tunnel protocol".into())];
    m.handle_dialed(now, second);
    // Each retry lands on a over TCP again: the retries space out instead of every 10 s.
    let mut waits = Vec::new();
    for _ in 0..4 {
        let due = m.poll_timeout(now);
        waits.push((due - now).as_secs());
        now = due;
        let retry = m.poll_dial(now).unwrap();
        assert!(retry.retry);
        let mut again = landed(retry, "a", Transport::Tcp, &["a", "b"]);
        again.failed = vec![(Transport::Quic, "no answer".into())];
        assert_eq!(m.handle_dialed(now, again), Decision::Duplicate);
    }
    assert_eq!(waits, [10, 20, 40, 80], "{waits:?}");
}
