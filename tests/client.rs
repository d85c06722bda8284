//! The typed client (`pdvault::client`) against a real server over TLS: the
//! order service's read and the courier's grant as its docs show them, its
//! typed errors (the problem `code`, the request id), and TLS that trusts
//! only the CA it is given. (Client certificates: tests/grants.rs, mTLS.)

mod common;
use common::*;
use pdvault::client::{Client, ClientError, GrantRequest};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_read_and_the_courier_grant_as_documented() {
    let s = Server::start().await;
    let order = s.api_as(
        &s.token("order-service", &["order", "delivery"], &["read", "write", "grant"])
            .await,
    );
    let v = order.create("order", &full_subject()).await.unwrap();
    assert_eq!(v.version, 1);

    // The order service reads what a label needs.
    let got = order
        .read("delivery", &v.id, Some(&["given_name", "address"]))
        .await
        .unwrap();
    assert_eq!((got.id.as_str(), got.version), (v.id.as_str(), 1));
    assert_eq!(got.fields.len(), 2, "{:?}", got.fields.keys().collect::<Vec<_>>());

    // A field the purpose does not cover: the problem code, typed.
    let e = order.read("delivery", &v.id, Some(&["email"])).await.err().unwrap();
    match &e {
        ClientError::Problem {
            status,
            code,
            request_id,
            ..
        } => {
            assert_eq!((*status, code.as_str()), (403, "field_not_allowed"));
            assert!(request_id.as_deref().is_some_and(|r| !r.is_empty()));
        }
        other => panic!("not a problem: {other}"),
    }
    assert!(!e.to_string().contains("example.kz"), "{e}");

    // The courier's grant: two reads, then refused.
    let g = order
        .grant(
            "delivery",
            &GrantRequest::new("courier-kazpost", vec![v.id.clone()], 600)
                .fields(&["address"])
                .max_uses(2),
        )
        .await
        .unwrap();
    assert!(g.token.starts_with("pdv_"));
    let courier = s.api_as(&g.token);
    for _ in 0..2 {
        let r = courier.read("delivery", &v.id, None).await.unwrap();
        assert_eq!(r.fields.keys().collect::<Vec<_>>(), ["address"]);
    }
    let e = courier.read("delivery", &v.id, None).await.err().unwrap();
    assert_eq!(e.code(), Some("token_invalid"));

    // A change with If-Match, then a stale one.
    let w = order
        .patch("order", &v.id, &json!({"patronymic": null}), Some(1))
        .await
        .unwrap();
    assert_eq!(w.version, 2);
    let e = order
        .patch("order", &v.id, &json!({"patronymic": null}), Some(1))
        .await
        .err()
        .unwrap();
    match e {
        ClientError::Problem { code, problem, .. } => {
            assert_eq!(code, "version_conflict");
            assert_eq!(problem["current_version"], 2);
        }
        other => panic!("{other}"),
    }

    // Look-up, erasure, and the 410 after it.
    let email = full_subject()["email"].as_str().unwrap().to_owned();
    assert_eq!(order.lookup("order", "email", &email).await.unwrap(), v.id);
    let eraser = s.api_as(&s.token("deletion", &["erasure"], &["erase"]).await);
    let receipt = eraser.erase("erasure", &v.id).await.unwrap();
    assert_eq!(receipt["id"], v.id.as_str());
    let e = order.read("delivery", &v.id, None).await.err().unwrap();
    assert_eq!(e.code(), Some("subject_erased"));

    // The admin calls the CLI makes.
    let st = s.api().status().await.unwrap();
    assert!(!st.sealed);
    let rot = s.api().rotate_kek().await.unwrap();
    assert!(rot.epoch >= 1);
    let tokens = s.api().list_tokens().await.unwrap();
    assert!(tokens.tokens.len() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_trusts_only_the_ca_it_is_given() {
    let s = Server::start().await;
    // Another CA: the handshake fails, and the error says why.
    let key = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let c = Client::builder(s.base())
        .ca_pem(other.pem().as_bytes())
        .unwrap()
        .build()
        .unwrap();
    match c.health().await {
        Err(ClientError::Transport { cause, .. }) => {
            assert!(cause.to_lowercase().contains("certificate"), "{cause}");
        }
        other => panic!("a foreign CA was accepted: {:?}", other.map(|v| v.to_string())),
    }
    // No CA at all is a set-up error, not a client that trusts the system's roots.
    assert!(matches!(
        Client::builder(s.base()).ca_pem(b"no pem here"),
        Err(ClientError::Setup(_))
    ));
    // The vault's own certificate file.
    let c = Client::builder(s.base())
        .ca_file(s.keys_dir().join("tls-cert.pem"))
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(c.health().await.unwrap()["status"], "ok");
    // No token: 401 token_invalid, typed.
    let e = c.read("order", "x", None).await.err().unwrap();
    assert_eq!(e.code(), Some("token_invalid"));
}
