//! The service against a scripted agent session: the session's command
//! channel is answered by a task playing the agent (no network here; the
//! namespace tests run the real agent).

use std::collections::BTreeMap;

use super::*;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let dir =
            std::env::temp_dir().join(format!("dots-client-svc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Fixture { dir }
    }

    fn start(&self) -> Arc<Service> {
        let mut customers = BTreeMap::new();
        customers.insert(
            "cpe1".to_string(),
            vec![net("203.0.113.1/32"), net("192.0.2.0/24")],
        );
        customers.insert("cpe2".to_string(), vec![net("203.0.113.5/32")]);
        Service::start(ServiceOptions {
            cuid: "test-cuid".into(),
            state_dir: Some(self.dir.clone()),
            audit_log: None,
            customers,
            shared: None,
        })
        .unwrap()
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the scripted agent saw.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Put(u32, Option<i64>),
    Delete(u32),
}

/// Connects a scripted agent: PUT -> 2.01 (or `refuse`), DELETE -> 2.02
/// with counters.
fn connect(
    s: &Arc<Service>,
    agent: &str,
    refuse: Option<&'static str>,
) -> (u64, Arc<Mutex<Vec<Seen>>>) {
    let (tx, mut rx) = mpsc::channel(8);
    let (notify, _) = broadcast::channel(4);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let info = AgentInfo {
        id: agent.into(),
        state: "connected".into(),
        connected_at: Some(unix_now()),
        ..AgentInfo::default()
    };
    let generation = s.session_started(info, tx, notify);
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Command::Mitigate { scope, mid, reply } => {
                    lock(&log).push(Seen::Put(mid, scope.lifetime));
                    let r = match refuse {
                        Some(code) => Reply {
                            ok: true,
                            code: Some(code.into()),
                            body: json!({"diagnostic": "no"}),
                            ..Reply::default()
                        },
                        None => Reply {
                            ok: true,
                            code: Some("2.01 Created".into()),
                            body: MitigationScope {
                                scopes: vec![Scope {
                                    mid: Some(mid),
                                    status: Some(MitigationStatus::InProgress),
                                    // An agent capping indefinite requests.
                                    lifetime: Some(
                                        scope.lifetime.filter(|l| *l > 0).unwrap_or(100),
                                    ),
                                    ..Scope::default()
                                }],
                            }
                            .to_json()
                            .unwrap(),
                            ..Reply::default()
                        },
                    };
                    let _ = reply.send(r);
                }
                Command::Withdraw { mid, reply } => {
                    lock(&log).push(Seen::Delete(mid));
                    let body = MitigationScope {
                        scopes: vec![Scope {
                            mid: Some(mid),
                            pkts_dropped: Some(4242),
                            ..Scope::default()
                        }],
                    }
                    .to_json()
                    .unwrap();
                    let _ = reply.send(Reply {
                        ok: true,
                        code: Some("2.02 Deleted".into()),
                        body,
                        ..Reply::default()
                    });
                }
                _ => {}
            }
        }
    });
    (generation, seen)
}

fn request(attacker: &str, label: Option<&str>) -> NewMitigation {
    NewMitigation {
        agent: None,
        scope: Scope {
            source_prefix: vec![net(attacker)],
            source_port_range: vec![dots_proto::model::PortRange {
                lower: 52727,
                upper: None,
            }],
            target_prefix: vec![net("198.51.100.10/32")],
            lifetime: Some(600),
            ..Scope::default()
        },
        label: label.map(Into::into),
    }
}

fn api() -> Principal {
    Principal::api("detector")
}

#[tokio::test]
async fn the_attacker_picks_the_agent_and_the_mid_increases() {
    let f = Fixture::new("pick");
    let s = f.start();
    let (_, seen1) = connect(&s, "cpe1", None);
    let (_, seen2) = connect(&s, "cpe2", None);
    let a = s
        .mitigate(&api(), request("203.0.113.1/32", None))
        .await
        .unwrap();
    let b = s
        .mitigate(&api(), request("192.0.2.7/32", None))
        .await
        .unwrap();
    let c = s
        .mitigate(&api(), request("203.0.113.5/32", None))
        .await
        .unwrap();
    assert_eq!(a.mitigation.agent, "cpe1");
    assert_eq!(c.mitigation.agent, "cpe2");
    assert_eq!(a.mitigation.state, State::Active);
    assert_eq!(a.coap.as_deref(), Some("2.01 Created"));
    assert_eq!(
        a.mitigation.status.as_deref(),
        Some("attack-mitigation-in-progress")
    );
    assert_eq!(b.mitigation.mid, a.mitigation.mid + 1);
    assert_eq!(lock(&seen1).len(), 2);
    assert_eq!(lock(&seen2).len(), 1);
    // A restart: the next mid is still larger.
    s.save(); // as the listener does on its way out
    drop(s);
    let s = f.start();
    connect(&s, "cpe1", None);
    let d = s
        .mitigate(&api(), request("203.0.113.1/32", None))
        .await
        .unwrap();
    assert!(d.mitigation.mid > b.mitigation.mid);
}

#[tokio::test]
async fn bad_requests_change_nothing() {
    let f = Fixture::new("bad");
    let s = f.start();
    let (_, seen) = connect(&s, "cpe1", None);
    let before = s.mitigations(None, None, None);
    // Outside every customer: 404.
    let e = s
        .mitigate(&api(), request("10.1.2.3/32", None))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 404, "{e}");
    // Named agent, source of another customer: 400 naming source-prefix.
    let mut r = request("203.0.113.5/32", None);
    r.agent = Some("cpe1".into());
    let e = s.mitigate(&api(), r).await.unwrap_err();
    assert_eq!(e.status(), 400);
    assert_eq!(e.field(), Some("source-prefix"));
    assert!(
        e.to_string()
            .contains("outside the customer prefixes of agent cpe1"),
        "{e}"
    );
    // Unknown agent: 404.
    let mut r = request("203.0.113.1/32", None);
    r.agent = Some("cpe9".into());
    assert_eq!(s.mitigate(&api(), r).await.unwrap_err().status(), 404);
    // trigger-mitigation false is never sent (RFC 9066 §5.3.1).
    let mut r = request("203.0.113.1/32", None);
    r.scope.trigger_mitigation = Some(false);
    let e = s.mitigate(&api(), r).await.unwrap_err();
    assert_eq!(e.field(), Some("trigger-mitigation"), "{e}");
    // Loopback source, no target.
    let mut r = request("203.0.113.1/32", None);
    r.scope.target_prefix.clear();
    assert_eq!(
        s.mitigate(&api(), r).await.unwrap_err().field(),
        Some("target-prefix")
    );
    assert_eq!(s.mitigations(None, None, None), before);
    assert!(lock(&seen).is_empty(), "nothing reached the agent");
    // Every refusal is in the trail, with who and the code.
    let trail = f.audit();
    let refused: Vec<&Value> = trail.iter().filter(|e| e["event"] == "request").collect();
    assert_eq!(refused.len(), 5);
    assert!(refused.iter().all(|e| e["by"]["name"] == "detector"));
    assert_eq!(refused[0]["code"], 404);
    assert_eq!(refused[1]["detail"]["field"], "source-prefix");
}

#[tokio::test]
async fn labels_are_unique_and_withdrawals_final() {
    let f = Fixture::new("label");
    let s = f.start();
    let (_, seen) = connect(&s, "cpe1", None);
    let a = s
        .mitigate(&api(), request("203.0.113.1/32", Some("ban:203.0.113.1")))
        .await
        .unwrap();
    let e = s
        .mitigate(&api(), request("203.0.113.1/32", Some("ban:203.0.113.1")))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 409);
    assert_eq!(e.id(), Some(&a.mitigation.id));
    let w = s.withdraw(&api(), &a.mitigation.id).await.unwrap();
    assert_eq!(w.mitigation.state, State::Withdrawn);
    assert_eq!(w.mitigation.counters.pkts_dropped, Some(4242));
    let e = s.withdraw(&api(), &a.mitigation.id).await.unwrap_err();
    assert_eq!(e.status(), 409, "{e}");
    assert!(e.to_string().contains("withdrawn already"), "{e}");
    assert_eq!(
        *lock(&seen),
        vec![
            Seen::Put(a.mitigation.mid, Some(600)),
            Seen::Delete(a.mitigation.mid)
        ]
    );
    // After the withdrawal the label is free again.
    s.mitigate(&api(), request("203.0.113.1/32", Some("ban:203.0.113.1")))
        .await
        .unwrap();
    let e = s
        .withdraw(&api(), &"1@cpe1".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.status(), 404);
    let fin: Vec<Value> = f
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "final")
        .collect();
    assert_eq!(fin[0]["detail"]["counters"]["pkts-dropped"], 4242);
}

#[tokio::test]
async fn offline_agents_get_their_queue_when_they_connect() {
    let f = Fixture::new("queue");
    let s = f.start();
    let q = s
        .mitigate(&api(), request("203.0.113.5/32", None))
        .await
        .unwrap();
    assert!(q.queued);
    assert_eq!(q.mitigation.state, State::Queued);
    let dropped = s
        .mitigate(&api(), request("203.0.113.5/32", None))
        .await
        .unwrap();
    s.withdraw(&api(), &dropped.mitigation.id).await.unwrap();
    // A restart keeps the queue.
    s.save(); // as the listener does on its way out
    drop(s);
    let s = f.start();
    let (_, seen) = connect(&s, "cpe2", None);
    let id = q.mitigation.id.clone();
    for _ in 0..100 {
        if s.mitigation(&id).map(|m| m.state) == Some(State::Active) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.mitigation(&id).unwrap().state, State::Active);
    // Sent once, with the lifetime left: a second may have passed since
    // the request was queued.
    let sent = lock(&seen).clone();
    assert!(
        matches!(sent.as_slice(), [Seen::Put(mid, Some(599 | 600))] if *mid == id.mid),
        "the withdrawn one was never sent: {sent:?}"
    );
}

#[tokio::test]
async fn what_the_agent_lost_is_sent_again() {
    let f = Fixture::new("resync");
    let s = f.start();
    connect(&s, "cpe1", None);
    let kept = s
        .mitigate(&api(), request("203.0.113.1/32", None))
        .await
        .unwrap();
    let lost = s
        .mitigate(&api(), request("192.0.2.9/32", None))
        .await
        .unwrap();
    // Sent in an earlier second than the next session starts.
    for id in [&kept.mitigation.id, &lost.mitigation.id] {
        lock(&s.book).get_mut(id).unwrap().sent_at = Some(unix_now() - 100);
    }
    let (generation, seen) = connect(&s, "cpe1", None);
    s.on_session_event(SessionEvent::Snapshot {
        agent: "cpe1".into(),
        generation,
        mids: vec![kept.mitigation.mid],
    });
    for _ in 0..100 {
        if !lock(&seen).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Only the lost one, with the lifetime left (600 - 100).
    assert_eq!(
        *lock(&seen),
        vec![Seen::Put(lost.mitigation.mid, Some(500))]
    );
}

#[tokio::test]
async fn status_changes_and_refusals_are_recorded() {
    let f = Fixture::new("status");
    let s = f.start();
    connect(&s, "cpe1", None);
    let mut events = s.subscribe();
    let a = s
        .mitigate(&api(), request("203.0.113.1/32", None))
        .await
        .unwrap();
    s.on_session_event(SessionEvent::Scopes {
        agent: "cpe1".into(),
        scopes: vec![Scope {
            mid: Some(a.mitigation.mid),
            status: Some(MitigationStatus::SuccessfullyMitigated),
            pkts_dropped: Some(10),
            ..Scope::default()
        }],
    });
    let m = s.mitigation(&a.mitigation.id).unwrap();
    assert_eq!(m.status.as_deref(), Some("attack-successfully-mitigated"));
    assert_eq!(m.counters.pkts_dropped, Some(10));
    let mut last = None;
    while let Ok(ev) = events.try_recv() {
        last = Some(ev);
    }
    assert!(
        matches!(last, Some(ServiceEvent::Mitigation { mitigation }) if mitigation.counters.pkts_dropped == Some(10))
    );
    let statuses: Vec<Value> = f
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "status")
        .collect();
    assert_eq!(
        statuses.last().unwrap()["detail"]["to"],
        "attack-successfully-mitigated"
    );
    // The agent ends it: final.
    s.on_session_event(SessionEvent::Scopes {
        agent: "cpe1".into(),
        scopes: vec![Scope {
            mid: Some(a.mitigation.mid),
            status: Some(MitigationStatus::Terminated),
            ..Scope::default()
        }],
    });
    assert_eq!(s.mitigation(&a.mitigation.id).unwrap().state, State::Ended);

    // An agent that refuses: 4.xx becomes 422 and the mitigation is rejected.
    let (_, _) = connect(&s, "cpe2", Some("4.00 Bad Request"));
    let e = s
        .mitigate(&api(), request("203.0.113.5/32", None))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 422);
    let id = e.id().unwrap().clone();
    assert_eq!(s.mitigation(&id).unwrap().state, State::Rejected);
    let (_, _) = connect(&s, "cpe2", Some("4.09 Conflict"));
    assert_eq!(
        s.mitigate(&api(), request("203.0.113.5/32", None))
            .await
            .unwrap_err()
            .status(),
        409
    );
}

#[tokio::test]
async fn the_registry_through_the_service() {
    let f = Fixture::new("reg");
    let s = f.start();
    let a = s
        .set_prefixes(&api(), "cpe3", vec![net("198.18.0.0/24")])
        .unwrap();
    assert_eq!(a.state, "offline");
    assert_eq!(a.prefixes, [net("198.18.0.0/24")]);
    let e = s
        .set_prefixes(&api(), "cpe3", vec![net("192.0.2.128/25")])
        .unwrap_err();
    assert_eq!(e.status(), 409, "{e}");
    assert_eq!(s.agents().len(), 3);
    let q = s
        .mitigate(&api(), request("198.18.0.5/32", None))
        .await
        .unwrap();
    assert_eq!(q.mitigation.agent, "cpe3");
    assert!(q.queued);
    s.remove_prefixes(&api(), "cpe3").unwrap();
    assert_eq!(s.remove_prefixes(&api(), "cpe3").unwrap_err().status(), 404);
    // Reload with an overlap: refused, nothing changes.
    let mut bad = BTreeMap::new();
    bad.insert("x".to_string(), vec![net("192.0.0.0/16")]);
    bad.insert("y".to_string(), vec![net("192.0.2.0/24")]);
    assert!(s.reload_customers(&api(), bad).is_err());
    assert_eq!(
        s.agent("cpe1").unwrap().prefixes,
        [net("203.0.113.1/32"), net("192.0.2.0/24")]
    );
}

#[tokio::test]
async fn indefinite_mitigations_are_refreshed() {
    let f = Fixture::new("refresh");
    let s = f.start();
    let (_, seen) = connect(&s, "cpe1", None);
    let mut r = request("203.0.113.1/32", None);
    r.scope.lifetime = Some(-1);
    let a = s.mitigate(&api(), r).await.unwrap();
    assert_eq!(a.mitigation.granted, Some(100), "the agent's cap");
    assert_eq!(s.refresh_due().await, 0, "not due yet");
    let finite = s
        .mitigate(&api(), request("192.0.2.3/32", None))
        .await
        .unwrap();
    for id in [&a.mitigation.id, &finite.mitigation.id] {
        lock(&s.book).get_mut(id).unwrap().sent_at = Some(unix_now() - 80);
    }
    assert_eq!(s.refresh_due().await, 1, "only the indefinite one");
    let puts: Vec<Seen> = lock(&seen).clone();
    assert_eq!(puts.last(), Some(&Seen::Put(a.mitigation.mid, Some(-1))));
    let m = s.mitigation(&a.mitigation.id).unwrap();
    assert!(m.sent_at.unwrap() >= unix_now() - 1);
    assert!(f
        .audit()
        .iter()
        .any(|e| e["action"] == "refresh" && e["by"]["via"] == "service" && e["code"] == 200));
}
