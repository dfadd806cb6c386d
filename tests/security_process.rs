//! Access control with `sluice serve` as a real process: TLS and tokens through the CLI, and a
//! SIGHUP that brings in new principals and a new certificate while a stream goes on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::pki::{Ca, Pair};
use crate::common::server::{BrokerProcess, assert_succeeded, bin, cli, message, take};
use sluice::auth::policy::{to_hex, token_hash};
use sluice::cli::{Credentials, link_with};
use sluice::proto::v1 as pb;

const WRITER: &str = "writer-token-0000000000000000000000000000000";
const READER: &str = "reader-token-0000000000000000000000000000000";
const AUDITOR: &str = "auditor-token-000000000000000000000000000000";
const LATE: &str = "late-token-000000000000000000000000000000000";

/// A config file (mode 600) with TLS from `server` and the principals above (`late` only when
/// `with_late`).
fn write_config(path: &Path, server: &Pair, with_late: bool) {
    let principal = |name: &str, token: &str| {
        format!(
            "[[auth.principals]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\n",
            to_hex(&token_hash(token))
        )
    };
    let mut text = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\n[auth]\nrequired = true\n",
        server.cert, server.key
    );
    text += &principal("writer", WRITER);
    text += &principal("reader", READER);
    text += &principal("auditor", AUDITOR);
    text += "[[auth.grants]]\nprincipal = \"writer\"\ntopics = [\"epro.*\"]\nallow = [\"produce\", \"admin\"]\n";
    text += "[[auth.grants]]\nprincipal = \"reader\"\ntopics = [\"epro.*\"]\nallow = [\"consume\", \"describe\"]\n";
    text += "[[auth.grants]]\nprincipal = \"auditor\"\ntopics = [\"_audit\"]\nallow = [\"consume\", \"describe\"]\n";
    if with_late {
        text += &principal("late", LATE);
        text +=
            "[[auth.grants]]\nprincipal = \"late\"\ntopics = [\"epro.*\"]\nallow = [\"produce\"]\n";
    }
    // Written beside and renamed: the broker never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn the_cli_speaks_tls_with_tokens() {
    let data = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "clinic");
    let server = ca.server("server");
    let config = pki.path().join("sluice.toml");
    write_config(&config, &server, false);
    let broker = BrokerProcess::spawn(data.path(), &["--config", config.to_str().unwrap()]);
    let addr = format!("https://127.0.0.1:{}", broker.addr.port());
    let ca_file = ca.cert.to_str().unwrap();
    let tls = [
        "--broker",
        &addr,
        "--tls-ca",
        ca_file,
        "--tls-domain",
        "localhost",
    ];
    let with = |token: &str, rest: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
        v.extend(tls.iter().map(|s| s.to_string()));
        v.extend(["--token".to_string(), token.to_string()]);
        v
    };

    let produce = with(WRITER, &["produce", "--topic", "epro.cli"]);
    let out = cli(&args(&produce), "first\nsecond\n");
    assert_succeeded(&out, "produce over TLS with the writer's token: ");
    let consume = with(READER, &["consume", "--topic", "epro.cli", "--count", "2"]);
    let out = cli(&args(&consume), "");
    assert_succeeded(&out, "consume with the reader's token: ");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "first\nsecond\n");

    // The reader may not produce; nobody gets in without a token or over plaintext.
    let out = cli(
        &args(&with(READER, &["produce", "--topic", "epro.cli"])),
        "x\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"));
    let mut no_token: Vec<&str> = vec!["topics", "list"];
    no_token.extend(tls);
    let out = cli(&no_token, "");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
    let plain = format!("127.0.0.1:{}", broker.addr.port());
    let out = cli(
        &["topics", "list", "--broker", &plain, "--token", WRITER],
        "",
    );
    assert!(!out.status.success());

    // The trail, through the broker and from the files.
    let out = cli(
        &args(&with(AUDITOR, &["audit", "--principal", "reader"])),
        "",
    );
    assert_succeeded(&out, "audit through the broker: ");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().count() == 1 && text.contains("Denied"),
        "one denial of the reader: {text}"
    );
    let out = cli(
        &[
            "audit",
            "--data-dir",
            data.path().to_str().unwrap(),
            "--format",
            "json",
        ],
        "",
    );
    assert_succeeded(&out, "audit from the data directory: ");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("topic created on first use"), "{text}");
    assert!(text.contains("\"decision\":\"unauthenticated\""), "{text}");
    broker.signal("TERM");
    assert!(broker.wait().success());
    let out = cli(&["verify", "--data-dir", data.path().to_str().unwrap()], "");
    assert_succeeded(&out, "verify after a clean stop: ");
}

#[tokio::test]
async fn sighup_brings_new_principals_and_certificates_while_a_stream_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new(pki.path(), "clinic");
    let ca2 = Ca::new(pki.path(), "rotated");
    let config = pki.path().join("sluice.toml");
    write_config(&config, &ca.server("server"), false);
    let broker = BrokerProcess::spawn(data.path(), &["--config", config.to_str().unwrap()]);
    let addr = format!("127.0.0.1:{}", broker.addr.port());
    let creds = |token: &str, ca: &Ca| Credentials {
        token: Some(token.into()),
        tls_ca: Some(ca.cert.clone()),
        tls_domain: Some("localhost".into()),
        ..Credentials::default()
    };
    let writer = link_with(&addr, &creds(WRITER, &ca)).await.unwrap();
    pb::broker_client::BrokerClient::new(writer.clone())
        .send(pb::SendRequest {
            topic: "epro.live".into(),
            messages: vec![message("before")],
        })
        .await
        .unwrap();
    let reader = link_with(&addr, &creds(READER, &ca)).await.unwrap();
    let mut stream = pb::broker_client::BrokerClient::new(reader)
        .subscribe(pb::SubscribeRequest {
            topic: "epro.live".into(),
            ..pb::SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        take(&mut stream, 1).await[0].value.as_deref(),
        Some(&b"before"[..])
    );

    // New principal and a certificate from another CA; then SIGHUP.
    write_config(&config, &ca2.server("server2"), true);
    broker.signal("HUP");
    // Reloading takes a moment: a new client of the new CA, with the new token, gets in once it
    // has happened (each try is a new connection and handshake).
    let mut late = None;
    for _ in 0..200 {
        if let Ok(link) = link_with(&addr, &creds(LATE, &ca2)).await {
            let sent = pb::broker_client::BrokerClient::new(link.clone())
                .send(pb::SendRequest {
                    topic: "epro.live".into(),
                    messages: vec![message("after")],
                })
                .await;
            if sent.is_ok() {
                late = Some(link);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(late.is_some(), "the reload never let the new principal in");
    // The stream opened before the reload goes on, and so does the writer's connection.
    assert_eq!(
        take(&mut stream, 1).await[0].value.as_deref(),
        Some(&b"after"[..])
    );
    pb::broker_client::BrokerClient::new(writer)
        .send(pb::SendRequest {
            topic: "epro.live".into(),
            messages: vec![message("old connection")],
        })
        .await
        .unwrap();
    assert_eq!(
        take(&mut stream, 1).await[0].value.as_deref(),
        Some(&b"old connection"[..])
    );
    // New connections trusting only the old CA are refused now.
    if let Ok(link) = link_with(&addr, &creds(WRITER, &ca)).await {
        let r = pb::admin_client::AdminClient::new(link)
            .list_topics(pb::ListTopicsRequest {})
            .await;
        assert!(r.is_err(), "the old certificate is still served: {r:?}");
    }
    // A reload that cannot be used changes nothing, and is recorded as refused.
    std::fs::write(&config, "[auth]\nrequired = maybe\n").unwrap();
    broker.signal("HUP");
    let auditor = link_with(&addr, &creds(AUDITOR, &ca2)).await.unwrap();
    let mut refused = false;
    for _ in 0..200 {
        let out = tokio::task::spawn_blocking({
            let data = data.path().to_path_buf();
            move || {
                Command::new(bin())
                    .args(["audit", "--format", "json", "--data-dir"])
                    .arg(data)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("\"outcome\":\"refused") {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(refused, "the refused reload was not recorded");
    pb::admin_client::AdminClient::new(auditor)
        .describe_topic(pb::DescribeTopicRequest {
            name: "_audit".into(),
        })
        .await
        .expect("the principals of the last good reload still hold");
    drop((stream, late));
    broker.signal("TERM");
    // Waited for off the runtime, so that our connections can answer the broker's GOAWAY.
    let status = tokio::task::spawn_blocking(move || broker.wait())
        .await
        .unwrap();
    assert!(status.success());
}
