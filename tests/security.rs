//! Access control from outside: TLS and mutual TLS, bearer tokens, grants checked in every RPC
//! of the three services, the audit trail (one record per denial and per administrative action,
//! its hash chain checked by `verify`), private files, and start-up errors that name the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use crate::common::pki::Ca;
use crate::common::server::{TestServer, message, test_config};
use bytes::Bytes;
use sluice::auth::policy::{AuthConfig, GrantConfig, PrincipalConfig, to_hex, token_hash};
use sluice::auth::{Action, ClientAuth, TlsConfig};
use sluice::broker::audit::{AuditRecord, Decision, check_chain};
use sluice::cli::{Credentials, Link, link_with};
use sluice::proto::seed;
use sluice::proto::v1 as pb;
use tonic::Code;

const ALL: &str = "all-token-0000000000000000000000000000000000";
const NONE: &str = "none-token-000000000000000000000000000000000";
const WRITER: &str = "writer-token-0000000000000000000000000000000";

fn principal(name: &str, token: &str) -> PrincipalConfig {
    PrincipalConfig {
        name: name.into(),
        token_sha256: to_hex(&token_hash(token)),
        tls_subject: String::new(),
    }
}

fn grant(who: &str, topics: &[&str], groups: &[&str], allow: &[Action]) -> GrantConfig {
    GrantConfig {
        principal: who.into(),
        topics: topics.iter().map(|s| s.to_string()).collect(),
        groups: groups.iter().map(|s| s.to_string()).collect(),
        allow: allow.to_vec(),
        deny: Vec::new(),
    }
}

const EVERYTHING: [Action; 4] = [
    Action::Produce,
    Action::Consume,
    Action::Describe,
    Action::Admin,
];

/// `all` may do everything (but never admin on `locked.*`), `none` nothing, `writer` produce
/// and describe on `epro.*`.
fn auth() -> AuthConfig {
    let mut locked = grant("all", &["locked.*"], &[], &[]);
    locked.deny = vec![Action::Admin];
    AuthConfig {
        required: true,
        principals: vec![
            principal("all", ALL),
            principal("none", NONE),
            principal("writer", WRITER),
        ],
        grants: vec![
            grant("all", &["*"], &["*"], &EVERYTHING),
            // The audit trail is named explicitly: `*` does not include it.
            grant(
                "all",
                &["_audit"],
                &[],
                &[Action::Consume, Action::Describe],
            ),
            locked,
            grant(
                "writer",
                &["epro.*"],
                &[],
                &[Action::Produce, Action::Describe],
            ),
        ],
        ..AuthConfig::default()
    }
}

/// A broker on `dir` under [`auth`], and a link as the principal allowed everything.
async fn start_with_auth(dir: &Path) -> (TestServer, Link) {
    let mut config = test_config(dir);
    config.auth = auth();
    let server = TestServer::start(config).await;
    let all = as_principal(&server, Some(ALL)).await;
    (server, all)
}

async fn as_principal(server: &TestServer, token: Option<&str>) -> Link {
    let credentials = Credentials {
        token: token.map(str::to_string),
        ..Credentials::default()
    };
    link_with(&server.addr.to_string(), &credentials)
        .await
        .unwrap()
}

fn broker(link: &Link) -> pb::broker_client::BrokerClient<Link> {
    pb::broker_client::BrokerClient::new(link.clone())
}

fn admin(link: &Link) -> pb::admin_client::AdminClient<Link> {
    pb::admin_client::AdminClient::new(link.clone())
}

/// Every record of `_audit`, read through the API as `all`.
async fn audit_records(link: &Link) -> Vec<AuditRecord> {
    let end = admin(link)
        .describe_topic(pb::DescribeTopicRequest {
            name: "_audit".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .partitions[0]
        .next_offset;
    let mut stream = broker(link)
        .subscribe(pb::SubscribeRequest {
            topic: "_audit".into(),
            ..pb::SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while (out.len() as u64) < end {
        for d in stream.message().await.unwrap().unwrap().deliveries {
            out.push(serde_json::from_slice(&d.value.unwrap()).unwrap());
        }
    }
    out
}

/// What a refused call must leave as it was: every topic file (but the audit trail's) with its
/// length, and every consumer group's directory. (Group logs' lengths are left out: members of
/// earlier calls leave their groups in the background.)
fn files(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.join("topics"), dir.join("groups")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            if name.starts_with("topics/_audit") {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                out.insert(name.clone(), 0);
                if name.starts_with("topics") {
                    stack.push(path);
                }
            } else {
                out.insert(name, e.metadata().unwrap().len());
            }
        }
    }
    out
}

/// One call of each RPC of the three services, on topic `epro.t` and group `etl`.
async fn call(rpc: &str, link: &Link) -> Result<(), tonic::Status> {
    let topic = "epro.t".to_string();
    let group = "etl".to_string();
    match rpc {
        "Send" => broker(link)
            .send(pb::SendRequest {
                topic,
                messages: vec![message("x")],
            })
            .await
            .map(drop),
        "Send(auto-create)" => broker(link)
            .send(pb::SendRequest {
                topic: "epro.new".into(),
                messages: vec![message("x")],
            })
            .await
            .map(drop),
        "Subscribe" => broker(link)
            .subscribe(pb::SubscribeRequest {
                topic,
                ..pb::SubscribeRequest::default()
            })
            .await
            .map(drop),
        "Subscribe(group)" => broker(link)
            .subscribe(pb::SubscribeRequest {
                topic,
                group,
                ..pb::SubscribeRequest::default()
            })
            .await
            .map(drop),
        "Ack" => broker(link)
            .ack(pb::AckRequest {
                topic,
                group,
                ack_ids: vec!["0:0".into()],
            })
            .await
            .map(drop),
        "Nack" => broker(link)
            .nack(pb::NackRequest {
                topic,
                group,
                ack_ids: vec!["0:0".into()],
                delay_ms: 0,
            })
            .await
            .map(drop),
        "CreateTopic" => admin(link)
            .create_topic(pb::CreateTopicRequest {
                name: "epro.created".into(),
                settings: None,
            })
            .await
            .map(drop),
        "DeleteTopic" => admin(link)
            .delete_topic(pb::DeleteTopicRequest {
                name: "epro.doomed".into(),
            })
            .await
            .map(drop),
        "DescribeTopic" => admin(link)
            .describe_topic(pb::DescribeTopicRequest { name: topic })
            .await
            .map(drop),
        "DescribeGroup" => admin(link)
            .describe_group(pb::DescribeGroupRequest { group })
            .await
            .map(drop),
        "ResetGroup" => admin(link)
            .reset_group(pb::ResetGroupRequest {
                group,
                topic,
                to: common::server::start(pb::start_position::Kind::Earliest(true)),
                force: true,
                ..pb::ResetGroupRequest::default()
            })
            .await
            .map(drop),
        "DeleteGroup" => admin(link)
            .delete_group(pb::DeleteGroupRequest {
                group: "etl-doomed".into(),
            })
            .await
            .map(drop),
        "Compact" => admin(link)
            .compact(pb::CompactRequest {
                topic,
                dry_run: false,
            })
            .await
            .map(drop),
        "TransferLeader" => admin(link)
            .transfer_leader(pb::TransferLeaderRequest {
                topic,
                partition: 0,
                to: 2,
            })
            .await
            .map(drop),
        "RebalanceLeaders" => admin(link)
            .rebalance_leaders(pb::RebalanceLeadersRequest { dry_run: false })
            .await
            .map(drop),
        "AddNode" => admin(link)
            .add_node(pb::AddNodeRequest {
                node_id: 4,
                address: "127.0.0.1:7174".into(),
            })
            .await
            .map(drop),
        "RemoveNode" => admin(link)
            .remove_node(pb::RemoveNodeRequest { node_id: 3 })
            .await
            .map(drop),
        "seed Send" => seed::broker_client::BrokerClient::new(link.clone())
            .send(seed::SendRequest {
                msg: Some(seed::Message {
                    topic,
                    payload: Bytes::from_static(b"s"),
                }),
            })
            .await
            .map(drop),
        "seed Subscribe" => seed::broker_client::BrokerClient::new(link.clone())
            .subscribe(seed::SubscribeRequest {
                topic,
                consumer_group: group,
            })
            .await
            .map(drop),
        other => panic!("no call for {other}"),
    }
}

/// (RPC, whether it is administrative and so recorded when allowed).
/// Every RPC: whether it is administrative (recorded when allowed), and what it answers when
/// allowed (`None`: success; on a single node the cluster's calls are refused as such).
const RPCS: [(&str, bool, Option<Code>); 19] = [
    ("Send", false, None),
    ("Send(auto-create)", true, None),
    ("Subscribe", false, None),
    ("Subscribe(group)", false, None),
    ("Ack", false, None),
    ("Nack", false, None),
    ("CreateTopic", true, None),
    ("DeleteTopic", true, None),
    ("DescribeTopic", false, None),
    ("DescribeGroup", false, None),
    ("ResetGroup", true, None),
    ("DeleteGroup", true, None),
    ("Compact", true, None),
    ("TransferLeader", true, Some(Code::FailedPrecondition)),
    ("RebalanceLeaders", true, Some(Code::FailedPrecondition)),
    ("AddNode", true, Some(Code::FailedPrecondition)),
    ("RemoveNode", true, Some(Code::FailedPrecondition)),
    ("seed Send", false, None),
    ("seed Subscribe", false, None),
];

#[tokio::test]
async fn every_rpc_obeys_grants_and_each_denial_and_admin_action_leaves_one_audit_record() {
    let dir = tempfile::tempdir().unwrap();
    let (server, all) = start_with_auth(dir.path()).await;
    let none = as_principal(&server, Some(NONE)).await;
    // What the calls act on.
    for name in ["epro.t", "epro.doomed"] {
        admin(&all)
            .create_topic(pb::CreateTopicRequest {
                name: name.into(),
                settings: None,
            })
            .await
            .unwrap();
    }
    call("Send", &all).await.unwrap();
    for g in ["etl", "etl-doomed"] {
        drop(
            broker(&all)
                .subscribe(pb::SubscribeRequest {
                    topic: "epro.t".into(),
                    group: g.into(),
                    ..pb::SubscribeRequest::default()
                })
                .await
                .unwrap(),
        );
    }

    // Each kind of denial (call, resource, answer) is recorded at once; one seen before is
    // counted, and summarised when its window ends or the broker stops.
    let mut kinds = BTreeSet::new();
    for (rpc, administrative, allowed) in RPCS {
        // Refused: PERMISSION_DENIED, nothing changed, one record of a new kind of denial.
        let before_files = files(dir.path());
        let before = audit_records(&all).await.len();
        let status = call(rpc, &none).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{rpc}: {status:?}");
        assert_eq!(
            files(dir.path()),
            before_files,
            "{rpc}: a denied call changed files"
        );
        let records = audit_records(&all).await;
        let added = &records[before..];
        assert!(added.len() <= 1, "{rpc}: at most one record per denial");
        if let Some(r) = added.first() {
            assert_eq!(
                (r.principal.as_str(), r.decision),
                ("none", Decision::Denied),
                "{rpc}"
            );
            assert!(
                kinds.insert((r.rpc.clone(), r.resource.clone(), r.outcome.clone())),
                "{rpc}: a kind recorded twice: {r:?}"
            );
        }

        // Allowed: answered as it would be without access control; administrative actions
        // leave exactly one record, the others none.
        let before = audit_records(&all).await.len();
        let answered = call(rpc, &all).await.map_err(|s| s.code());
        match allowed {
            None => assert!(answered.is_ok(), "{rpc}: {answered:?}"),
            Some(code) => assert_eq!(answered, Err(code), "{rpc}"),
        }
        let records = audit_records(&all).await;
        let added = records.len() - before;
        assert_eq!(added, usize::from(administrative), "{rpc}: {records:?}");
        if administrative {
            let r = records.last().unwrap();
            assert_eq!(
                (r.principal.as_str(), r.decision),
                ("all", Decision::Allowed),
                "{rpc}"
            );
        }
    }

    // A failed administrative action is recorded with what was answered, not as done.
    let status = admin(&all)
        .compact(pb::CompactRequest {
            topic: "epro.ghost".into(),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let last = audit_records(&all).await.pop().unwrap();
    assert!(last.outcome.starts_with("NotFound"), "{last:?}");

    // Listing shows only what may be described; deny wins over allow.
    let writer = as_principal(&server, Some(WRITER)).await;
    let listed: Vec<String> = admin(&writer)
        .list_topics(pb::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(listed.iter().all(|t| t.starts_with("epro.")), "{listed:?}");
    assert!(listed.contains(&"epro.t".to_string()));
    let groups = admin(&writer)
        .list_groups(pb::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    assert!(
        groups.is_empty(),
        "writer may describe no group: {groups:?}"
    );
    let status = admin(&all)
        .create_topic(pb::CreateTopicRequest {
            name: "locked.x".into(),
            settings: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    server.stop().await;

    // Every denial is in the trail: the kinds recorded at once, the others in the summary
    // written at the stop.
    let (server, all) = start_with_auth(dir.path()).await;
    let records = audit_records(&all).await;
    let summarised: u64 = records
        .iter()
        .filter(|r| r.principal == "none" && r.decision == Decision::Denied)
        .filter_map(|r| r.counts.get("refusals"))
        .sum();
    assert_eq!(
        kinds.len() as u64 + summarised,
        RPCS.len() as u64,
        "every denial of the table recorded or counted"
    );
    assert!(summarised > 0, "the table denies a kind twice (Subscribe)");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_failing_fast_adds_a_bounded_number_of_records_and_every_refusal_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (server, all) = start_with_auth(dir.path()).await;
    let before = audit_records(&all).await.len();
    // 2,000 calls with a wrong token, 500 at a time over four connections.
    let mut links = Vec::new();
    for _ in 0..4 {
        links.push(
            as_principal(
                &server,
                Some("wrong-token-11111111111111111111111111111111"),
            )
            .await,
        );
    }
    let calls = 2_000u64;
    let slots = Arc::new(tokio::sync::Semaphore::new(500));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..calls {
        let (link, slots) = (links[i as usize % 4].clone(), Arc::clone(&slots));
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await.unwrap();
            call("Send", &link).await.unwrap_err().code()
        });
    }
    while let Some(code) = tasks.join_next().await {
        assert_eq!(code.unwrap(), Code::Unauthenticated);
    }
    // One kind of refusal from one source: one record now, whatever the rate.
    let added = audit_records(&all).await.len() - before;
    assert_eq!(added, 1, "records added by {calls} refusals");
    // A good client is answered meanwhile, and at once.
    call("Send", &all).await.unwrap();
    server.stop().await;
    // The stop wrote the summary: every refusal is counted.
    let (server, all) = start_with_auth(dir.path()).await;
    let records = audit_records(&all).await;
    let refused: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.decision == Decision::Unauthenticated)
        .collect();
    assert_eq!(
        refused.len(),
        2,
        "the first refusal and the summary: {refused:?}"
    );
    assert_eq!(refused[1].counts.get("refusals"), Some(&(calls - 1)));
    assert_eq!(
        refused[1].peer, "127.0.0.1",
        "the source is the address, not a connection"
    );
    server.stop().await;
}

#[tokio::test]
async fn missing_or_wrong_credentials_are_unauthenticated_with_the_same_words() {
    let dir = tempfile::tempdir().unwrap();
    let (server, all) = start_with_auth(dir.path()).await;
    let mut messages = Vec::new();
    for token in [None, Some("wrong-token-00000000000000000000000000000000")] {
        let before = audit_records(&all).await.len();
        let link = as_principal(&server, token).await;
        let status = call("Send", &link).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
        messages.push(status.message().to_string());
        let records = audit_records(&all).await;
        assert_eq!(records.len(), before + 1);
        assert_eq!(records.last().unwrap().decision, Decision::Unauthenticated);
        assert_eq!(
            records.last().unwrap().rpc,
            "sluice.v1.Broker/Send",
            "the record names the call"
        );
    }
    assert_eq!(
        messages[0], messages[1],
        "no hint about which part was wrong"
    );
    // The client's own request id is kept in the record; without one the broker numbers it.
    // (A call not refused before: a repeat would only be counted.)
    let mut request = tonic::Request::new(pb::ListTopicsRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "submission-42".parse().unwrap());
    let anonymous = as_principal(&server, None).await;
    admin(&anonymous).list_topics(request).await.unwrap_err();
    let records = audit_records(&all).await;
    assert_eq!(records.last().unwrap().request_id, "submission-42");
    assert!(records[records.len() - 2].request_id.starts_with('r'));
    // Health stays open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        sluice::cli::connect(&server.addr.to_string())
            .await
            .unwrap(),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    server.stop().await;
}

fn tls_config(ca: &Ca, client_auth: Option<ClientAuth>) -> TlsConfig {
    let server = ca.server("server");
    TlsConfig {
        cert_file: server.cert,
        key_file: server.key,
        client_ca_file: if client_auth.is_some() {
            ca.cert.clone()
        } else {
            std::path::PathBuf::new()
        },
        client_auth: client_auth.unwrap_or_default(),
    }
}

#[tokio::test]
async fn mutual_tls_admits_only_certificates_of_its_ca_and_maps_them_to_principals() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "clinic");
    let other = Ca::new(pki.path(), "other");
    let alice = ca.client("alice");
    let mallory = other.client("mallory");
    let mut config = test_config(dir.path());
    config.tls = tls_config(&ca, Some(ClientAuth::Required));
    let mut auth = auth();
    auth.principals.push(PrincipalConfig {
        name: "alice".into(),
        tls_subject: "CN=alice,O=Clinic".into(),
        ..PrincipalConfig::default()
    });
    auth.grants.push(grant(
        "alice",
        &["epro.*"],
        &[],
        &[Action::Describe, Action::Admin],
    ));
    config.auth = auth;
    let server = TestServer::start(config).await;
    let addr = format!("https://127.0.0.1:{}", server.addr.port());
    let creds = |pair: Option<&common::pki::Pair>| Credentials {
        tls_ca: Some(ca.cert.clone()),
        tls_cert: pair.map(|p| p.cert.clone()),
        tls_key: pair.map(|p| p.key.clone()),
        tls_domain: Some("localhost".into()),
        ..Credentials::default()
    };

    // Alice's certificate is her principal: no token needed.
    let link = link_with(&addr, &creds(Some(&alice))).await.unwrap();
    admin(&link)
        .create_topic(pb::CreateTopicRequest {
            name: "epro.mtls".into(),
            settings: None,
        })
        .await
        .unwrap();
    let status = call("Send", &link).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "alice may not produce"
    );

    // No certificate, another CA's certificate, or plaintext: no call gets through.
    for (what, result) in [
        ("no certificate", link_with(&addr, &creds(None)).await),
        ("another CA", link_with(&addr, &creds(Some(&mallory))).await),
        (
            "plaintext",
            link_with(&server.addr.to_string(), &Credentials::default()).await,
        ),
    ] {
        if let Ok(link) = result {
            let r = admin(&link).list_topics(pb::ListTopicsRequest {}).await;
            assert!(r.is_err(), "{what}: {r:?}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn optional_client_certificates_let_token_holders_in_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "clinic");
    let mut config = test_config(dir.path());
    config.tls = tls_config(&ca, Some(ClientAuth::Optional));
    config.auth = auth();
    let server = TestServer::start(config).await;
    // Over TLS without a client certificate: a token is enough, none is not.
    let over_tls = |token: Option<&str>| Credentials {
        token: token.map(str::to_string),
        tls_ca: Some(ca.cert.clone()),
        tls_domain: Some("localhost".into()),
        ..Credentials::default()
    };
    let at = format!("127.0.0.1:{}", server.addr.port());
    let all = link_with(&at, &over_tls(Some(ALL))).await.unwrap();
    admin(&all)
        .create_topic(pb::CreateTopicRequest {
            name: "epro.t".into(),
            settings: None,
        })
        .await
        .unwrap();
    let writer = link_with(&at, &over_tls(Some(WRITER))).await.unwrap();
    let sent = broker(&writer)
        .send(pb::SendRequest {
            topic: "epro.t".into(),
            messages: vec![message("over tls")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.positions.len(), 1, "{sent:?}");
    // Its grants still hold: the writer may not create a topic on first use.
    let refused = broker(&writer)
        .send(pb::SendRequest {
            topic: "epro.new".into(),
            messages: vec![message("over tls")],
        })
        .await;
    assert_eq!(refused.unwrap_err().code(), Code::PermissionDenied);
    let anonymous = link_with(&at, &over_tls(None)).await.unwrap();
    let refused = broker(&anonymous)
        .send(pb::SendRequest {
            topic: "epro.t".into(),
            messages: vec![message("no credentials")],
        })
        .await;
    assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn bad_certificate_files_stop_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "clinic");
    let good = ca.server("good");
    let other = ca.server("other");
    let expired = ca.expired_server("expired");
    let cases = [
        (
            "missing",
            pki.path().join("nope.pem"),
            good.key.clone(),
            "nope.pem",
        ),
        (
            "mismatched key",
            good.cert.clone(),
            other.key.clone(),
            "does not match",
        ),
        (
            "expired",
            expired.cert.clone(),
            expired.key.clone(),
            "expired",
        ),
        (
            "not a certificate",
            good.key.clone(),
            good.key.clone(),
            "good.key",
        ),
    ];
    for (what, cert, key, want) in cases {
        let mut config = test_config(dir.path());
        config.tls = TlsConfig {
            cert_file: cert,
            key_file: key,
            ..TlsConfig::default()
        };
        let err = sluice::server::start(config, tokio_util::sync::CancellationToken::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{what}: {err}");
    }
}

#[test]
fn plaintext_beyond_loopback_is_refused_unless_allowed() {
    let mut config = sluice::config::Config {
        listen: "0.0.0.0:7070".parse().unwrap(),
        ..sluice::config::Config::default()
    };
    let err = config.sanitize().unwrap_err().to_string();
    assert!(err.contains("allow_plaintext"), "{err}");
    config.allow_plaintext = true;
    config.sanitize().unwrap();
}

#[test]
fn a_config_file_with_token_hashes_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sluice.toml");
    std::fs::write(
        &file,
        format!(
            "[[auth.principals]]\nname = \"app\"\ntoken_sha256 = \"{}\"\n",
            to_hex(&token_hash(ALL))
        ),
    )
    .unwrap();
    for (mode, ok) in [(0o644, false), (0o640, false), (0o600, true), (0o400, true)] {
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let loaded = sluice::config::Config::load(Some(&file), Vec::new());
        assert_eq!(loaded.is_ok(), ok, "mode {mode:o}: {loaded:?}");
        if let Err(e) = loaded {
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
    }
}

#[tokio::test]
async fn the_data_directory_is_private_whatever_the_umask() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let server = TestServer::start(test_config(&dir)).await;
    let link = as_principal(&server, None).await;
    call("Send", &link).await.unwrap();
    drop(
        broker(&link)
            .subscribe(pb::SubscribeRequest {
                topic: "epro.t".into(),
                group: "etl".into(),
                ..pb::SubscribeRequest::default()
            })
            .await
            .unwrap(),
    );
    server.stop().await;
    let mut stack = vec![dir.clone()];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let mode = e.metadata().unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", e.path().display());
                seen += 1;
            }
        }
    }
    assert!(seen > 5, "checked {seen} files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_made_at_once_share_batches_and_the_chain_stays_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let link = as_principal(&server, None).await;
    // 300 administrative actions at once: each answered only once its record is durable.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let link = link.clone();
        tasks.spawn(async move {
            admin(&link)
                .create_topic(pb::CreateTopicRequest {
                    name: format!("t{i}"),
                    settings: None,
                })
                .await
                .unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    server.stop().await;
    let stored = common::audit_values(dir.path());
    let records: Vec<AuditRecord> = stored
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect();
    // start, 300 creations (each once), stop; in offset order, the chain unbroken.
    assert_eq!(records.len(), 302);
    let created: BTreeSet<&str> = records.iter().map(|r| r.resource.as_str()).collect();
    assert_eq!(created.len(), 302 - 1, "{created:?}");
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.seq, i as u64);
    }
    let indexed: Vec<(u64, Vec<u8>)> = stored
        .into_iter()
        .enumerate()
        .map(|(i, b)| (i as u64, b))
        .collect();
    assert!(check_chain(indexed).is_empty());
}

#[tokio::test]
async fn verify_names_the_audit_record_that_was_changed_removed_or_moved() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let link = as_principal(&server, None).await;
    for name in ["a", "b", "c", "d"] {
        admin(&link)
            .create_topic(pb::CreateTopicRequest {
                name: name.into(),
                settings: None,
            })
            .await
            .unwrap();
    }
    server.stop().await;
    let stored = common::audit_values(dir.path());
    // start, four creations, stop.
    assert_eq!(stored.len(), 6);
    let indexed = |v: &[Vec<u8>]| -> Vec<(u64, Vec<u8>)> {
        v.iter()
            .cloned()
            .enumerate()
            .map(|(i, b)| (i as u64, b))
            .collect()
    };
    assert!(check_chain(indexed(&stored)).is_empty());

    let mut changed = stored.clone();
    let mut r: AuditRecord = serde_json::from_slice(&changed[2]).unwrap();
    r.principal = "someone else".into();
    changed[2] = serde_json::to_vec(&r).unwrap();
    let mut removed = stored.clone();
    removed.remove(2);
    let mut moved = stored.clone();
    moved.swap(2, 3);
    for (what, records, word) in [
        ("changed", &changed, "changed"),
        ("removed", &removed, "removed"),
        ("moved", &moved, "moved"),
    ] {
        let breaks = check_chain(indexed(records));
        assert_eq!(
            breaks.first().map(|b| b.offset),
            Some(2),
            "{what}: {breaks:?}"
        );
        assert!(breaks[0].problem.contains(word), "{what}: {breaks:?}");
    }

    // `sluice verify` reports it, on a data directory whose trail was rewritten with valid CRCs.
    common::rewrite_audit_trail(dir.path(), &changed);
    let out = std::process::Command::new(common::server::bin())
        .args(["verify", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("audit record 2: changed"), "{stdout}");
}

#[tokio::test]
async fn without_required_credentials_callers_are_anonymous_but_a_wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    let mut auth = auth();
    auth.required = false;
    auth.reflection = false;
    auth.grants.push(grant(
        "anonymous",
        &["public.*"],
        &[],
        &[Action::Describe, Action::Admin, Action::Produce],
    ));
    config.auth = auth;
    let server = TestServer::start(config).await;
    let anonymous = as_principal(&server, None).await;
    broker(&anonymous)
        .send(pb::SendRequest {
            topic: "public.board".into(),
            messages: vec![message("hi")],
        })
        .await
        .unwrap();
    let status = call("Send", &anonymous).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "anonymous has only its grants"
    );
    let wrong = as_principal(&server, Some("wrong-token-0000000000000000000000000000000")).await;
    let status = call("DescribeTopic", &wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // Reflection is off: not served, to anyone.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_request};
    let all = as_principal(&server, Some(ALL)).await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let status = ServerReflectionClient::new(all)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    server.stop().await;
}

#[tokio::test]
async fn a_token_and_a_certificate_naming_different_principals_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "clinic");
    let alice = ca.client("alice");
    let mut config = test_config(dir.path());
    config.tls = tls_config(&ca, Some(ClientAuth::Optional));
    let mut auth = auth();
    auth.principals.push(PrincipalConfig {
        name: "alice".into(),
        tls_subject: "alice.clinic.test".into(),
        ..PrincipalConfig::default()
    });
    auth.grants
        .push(grant("alice", &["*"], &[], &[Action::Describe]));
    config.auth = auth;
    let server = TestServer::start(config).await;
    let addr = format!("127.0.0.1:{}", server.addr.port());
    let creds = |token: Option<&str>| Credentials {
        token: token.map(str::to_string),
        tls_ca: Some(ca.cert.clone()),
        tls_cert: Some(alice.cert.clone()),
        tls_key: Some(alice.key.clone()),
        tls_domain: Some("localhost".into()),
    };
    // By an alternative name alone, alice is known.
    let link = link_with(&addr, &creds(None)).await.unwrap();
    admin(&link)
        .list_topics(pb::ListTopicsRequest {})
        .await
        .unwrap();
    // With another principal's token as well: refused.
    let link = link_with(&addr, &creds(Some(WRITER))).await.unwrap();
    let status = admin(&link)
        .list_topics(pb::ListTopicsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn the_audit_trail_cannot_be_written_deleted_or_shortened_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(test_config(dir.path())).await;
    let link = as_principal(&server, None).await;
    let before = audit_records(&link).await;
    let refusals = [
        broker(&link)
            .send(pb::SendRequest {
                topic: "_audit".into(),
                messages: vec![message("forged")],
            })
            .await
            .map(drop),
        admin(&link)
            .delete_topic(pb::DeleteTopicRequest {
                name: "_audit".into(),
            })
            .await
            .map(drop),
        admin(&link)
            .compact(pb::CompactRequest {
                topic: "_audit".into(),
                dry_run: false,
            })
            .await
            .map(drop),
        seed::broker_client::BrokerClient::new(link.clone())
            .send(seed::SendRequest {
                msg: Some(seed::Message {
                    topic: "_audit".into(),
                    payload: Bytes::from_static(b"forged"),
                }),
            })
            .await
            .map(drop),
    ];
    for r in &refusals {
        assert_eq!(r.as_ref().unwrap_err().code(), Code::PermissionDenied);
    }
    let after = audit_records(&link).await;
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "nothing earlier changed"
    );
    let denials = &after[before.len()..];
    assert_eq!(
        denials.len(),
        refusals.len(),
        "one record per refusal: {denials:?}"
    );
    assert!(denials.iter().all(|r| r.decision == Decision::Denied));
    let listed = admin(&link)
        .list_topics(pb::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert!(
        listed.iter().all(|t| t.name != "_audit"),
        "internal: not listed"
    );
    server.stop().await;
}

/// The HTTP port under `auth.required`: health and the console's files stay open; the API and
/// `/metrics` need a token (401, recorded) and show only what the principal may describe; a
/// topic or group asked for by name without `describe` is a 403, recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_obeys_tokens_and_describe_grants() {
    use common::http::{get, get_with_token, topic_names};
    let dir = tempfile::tempdir().unwrap();
    let (server, all) = start_with_auth(dir.path()).await;
    for topic in ["epro.a", "other"] {
        broker(&all)
            .send(pb::SendRequest {
                topic: topic.into(),
                messages: vec![message("x")],
            })
            .await
            .unwrap();
    }
    let http = server.http.unwrap();
    for open in ["/healthz", "/readyz", "/", "/app.js"] {
        assert_eq!(get(http, open).await.status, 200, "{open}");
    }
    let trail = |records: Vec<AuditRecord>| -> Vec<(String, Decision)> {
        records
            .into_iter()
            .filter(|r| r.rpc.starts_with("http "))
            .map(|r| (r.rpc, r.decision))
            .collect()
    };
    assert!(trail(audit_records(&all).await).is_empty());

    for (path, token) in [
        ("/metrics", None),
        (
            "/api/v1/topics",
            Some("wrong-token-00000000000000000000000000000000"),
        ),
    ] {
        let r = match token {
            Some(t) => get_with_token(http, path, t).await,
            None => get(http, path).await,
        };
        assert_eq!(r.status, 401, "{path}: {}", r.body);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(r.json()["error"], "missing or invalid credentials");
    }

    // writer may describe epro.* only.
    let topics = get_with_token(http, "/api/v1/topics", WRITER).await;
    assert_eq!(topic_names(&topics), ["epro.a"]);
    let metrics = get_with_token(http, "/metrics", WRITER).await.body;
    assert!(metrics.contains("topic=\"epro.a\""), "{metrics}");
    assert!(!metrics.contains("topic=\"other\""), "{metrics}");
    assert_eq!(
        get_with_token(http, "/api/v1/topics/epro.a", WRITER)
            .await
            .status,
        200
    );
    let denied = get_with_token(http, "/api/v1/topics/other", WRITER).await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    // Dead letters show keys and headers: describe is not enough, they need consume.
    let path = "/api/v1/topics/epro.a/dead-letters";
    let denied = get_with_token(http, path, WRITER).await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert_eq!(get_with_token(http, path, ALL).await.status, 200);
    // none may describe nothing: empty lists, and a 403 by name.
    let topics = get_with_token(http, "/api/v1/topics", NONE).await;
    assert!(topic_names(&topics).is_empty());
    let denied = get_with_token(http, "/api/v1/groups/g", NONE).await;
    assert_eq!(denied.status, 403, "{}", denied.body);

    assert_eq!(
        trail(audit_records(&all).await),
        [
            ("http GET /metrics".to_string(), Decision::Unauthenticated),
            (
                "http GET /api/v1/topics".to_string(),
                Decision::Unauthenticated
            ),
            (
                "http GET /api/v1/topics/other".to_string(),
                Decision::Denied
            ),
            (format!("http GET {path}"), Decision::Denied),
            ("http GET /api/v1/groups/g".to_string(), Decision::Denied),
        ],
        "exactly one record per refusal, none for what was allowed"
    );
    server.stop().await;
}

/// The suite a TLS client offering `suites` (in its order of preference) gets from `addr`.
async fn negotiated(
    addr: std::net::SocketAddr,
    ca: &Path,
    suites: &[tokio_rustls::rustls::CipherSuite],
    tls12: bool,
) -> tokio_rustls::rustls::CipherSuite {
    use tokio_rustls::rustls::{self, pki_types::pem::PemObject};
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = suites
        .iter()
        .map(|want| {
            *provider
                .cipher_suites
                .iter()
                .find(|s| s.suite() == *want)
                .unwrap()
        })
        .collect();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider.into())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
}

#[tokio::test]
async fn the_broker_picks_aes_128_gcm_whatever_the_client_prefers_and_serves_clients_without_it() {
    use tokio_rustls::rustls::CipherSuite as S;
    let dir = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "clinic");
    let mut config = test_config(dir.path());
    config.tls = tls_config(&ca, None);
    let server = TestServer::start(config).await;
    // (the client's suites, most preferred first; TLS 1.2 only; what the broker picks)
    let table = [
        (
            vec![
                S::TLS13_AES_256_GCM_SHA384,
                S::TLS13_AES_128_GCM_SHA256,
                S::TLS13_CHACHA20_POLY1305_SHA256,
            ],
            false,
            S::TLS13_AES_128_GCM_SHA256,
        ),
        (
            vec![
                S::TLS13_CHACHA20_POLY1305_SHA256,
                S::TLS13_AES_128_GCM_SHA256,
            ],
            false,
            S::TLS13_AES_128_GCM_SHA256,
        ),
        (
            vec![S::TLS13_AES_256_GCM_SHA384],
            false,
            S::TLS13_AES_256_GCM_SHA384,
        ),
        (
            vec![S::TLS13_CHACHA20_POLY1305_SHA256],
            false,
            S::TLS13_CHACHA20_POLY1305_SHA256,
        ),
        (
            vec![
                S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ],
            true,
            S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
    ];
    for (offered, tls12, want) in table {
        let got = negotiated(server.addr, &ca.cert, &offered, tls12).await;
        assert_eq!(got, want, "client offering {offered:?}");
    }
    server.stop().await;
}
