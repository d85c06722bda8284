//! The self-service page in a real browser: headless Chromium, driven over
//! WebDriver (chromedriver + fantoccini), against the real server over TLS.
//! The vault's dev certificate is trusted by its public-key hash (the
//! `--ignore-certificate-errors-spki-list` pin), not by ignoring TLS errors.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian's
//! `chromium` and `chromium-driver`; `.ci/run` installs them). Without them
//! the tests fail, saying so: they are never skipped in silence.
//! Screenshots of the main screens go to `target/screenshots/` (with
//! `PDVAULT_UPDATE_SCREENSHOTS=1`, to `docs/screenshots/`, shown in the README).

mod common;
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const XSS: &str = "<img src=x onerror=alert(1)>";

struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
    downloads: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn which(bin: &str) -> PathBuf {
    for p in [format!("/usr/bin/{bin}"), format!("/usr/local/bin/{bin}")] {
        if Path::new(&p).exists() {
            return p.into();
        }
    }
    panic!("{bin} is missing: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does it)");
}

/// base64 SHA-256 of the certificate's SubjectPublicKeyInfo, for Chromium's pin.
fn spki_pin(s: &Server) -> String {
    use base64::Engine;
    let pem = std::fs::read(s.keys_dir().join("tls-cert.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).unwrap();
    let spki = cert.tbs_certificate.subject_pki.raw;
    base64::engine::general_purpose::STANDARD.encode(pdvault::crypto::sha256(spki))
}

impl Browser {
    async fn start(s: &Server) -> Browser {
        // fantoccini's rustls brings a second crypto provider; pick ring, as the vault does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let chromium = which("chromium");
        let port = free_port();
        let driver = Command::new(which("chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let downloads = tempfile::tempdir().unwrap();
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--ignore-certificate-errors-spki-list={}", spki_pin(s)),
                ],
                "prefs": {
                    "download.default_directory": downloads.path(),
                    "download.prompt_for_download": false,
                }
            }
        });
        let caps = caps.as_object().unwrap().clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            let r = ClientBuilder::rustls()
                .unwrap()
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await;
            match r {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => panic!("chromedriver session: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        Browser {
            client,
            driver,
            _profile: profile,
            downloads,
        }
    }

    /// Opens a link as a user does: a fresh page load (a same-document
    /// jump to a new `#code=` would not reload the page).
    async fn open(&self, url: &str) {
        self.client.goto("about:blank").await.unwrap();
        self.client.goto(url).await.unwrap();
    }

    async fn text(&self, id: &str) -> String {
        self.el(id).await.text().await.unwrap()
    }

    /// Waits (bounded) for an element by id.
    async fn el(&self, id: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("#{id}: {e}"))
    }

    /// Waits (bounded) until `#id`'s text satisfies `ok`; returns it.
    async fn until_text(&self, id: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let t = match self.client.find(Locator::Id(id)).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if ok(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "#{id} never got the expected text; it reads {t:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn visible(&self, id: &str) -> bool {
        match self.client.find(Locator::Id(id)).await {
            Ok(e) => e.is_displayed().await.unwrap_or(false),
            Err(_) => false,
        }
    }

    async fn until_visible(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.visible(id).await {
            assert!(Instant::now() < deadline, "#{id} never became visible");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&self, id: &str) {
        self.el(id)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click #{id}: {e}"));
    }

    async fn type_into(&self, id: &str, text: &str) {
        let e = self.el(id).await;
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        // Every run writes them under target/; PDVAULT_UPDATE_SCREENSHOTS=1
        // refreshes the committed ones in docs/ (so a test run leaves the
        // work tree clean).
        let sub = if std::env::var_os("PDVAULT_UPDATE_SCREENSHOTS").is_some() {
            "docs/screenshots"
        } else {
            "target/screenshots"
        };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(sub);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// The file the page downloaded (bounded wait for Chromium to finish it).
    async fn downloaded(&self, name: &str) -> Vec<u8> {
        let p = self.downloads.path().join(name);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(b) = std::fs::read(&p) {
                if !b.is_empty() {
                    return b;
                }
            }
            assert!(Instant::now() < deadline, "{name} was never downloaded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn link_url(s: &Server, shop: &str, id: &str) -> String {
    let r = s
        .post(
            &format!("/v1/subjects/{id}/self-service-links"),
            shop,
            Some("subject_access"),
            json!({}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body["url"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_sees_corrects_downloads_and_erases_their_data() {
    let s = Server::start().await;
    let order = s
        .token("order-service", &["order", "marketing"], &["read", "write"])
        .await;
    let courier = s.token("courier-kazpost", &["delivery"], &["read"]).await;
    let shop = s.token("shop-backend", &["subject_access"], &["grant"]).await;
    let mut fields = full_subject();
    fields["surname"] = json!(XSS);
    let id = s.create(&order, fields).await;
    let r = s
        .call(
            Method::PUT,
            &format!("/v1/subjects/{id}/consents/marketing"),
            &order,
            Some("order"),
            Some(json!({"granted": true})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    assert_eq!(
        s.get(&format!("/v1/subjects/{id}"), &courier, Some("delivery"))
            .await
            .status,
        200
    );
    assert_eq!(
        s.get(&format!("/v1/subjects/{id}"), &order, Some("marketing"))
            .await
            .status,
        200
    );

    let b = Browser::start(&s).await;
    let url = link_url(&s, &shop, &id).await;
    b.open(&url).await;

    // Signed in: the code has left the address bar, the fields are shown.
    b.until_text("value-given_name", |t| t.contains("Aigerim")).await;
    let here = b.client.current_url().await.unwrap();
    assert!(
        here.fragment().is_none_or(|f| !f.contains("code")),
        "the code stays in the URL: {here}"
    );
    // The XSS name is shown as its characters, and made no element.
    assert_eq!(b.text("value-surname").await, XSS);
    assert_eq!(b.js("return document.querySelectorAll('img').length").await, json!(0));
    assert_eq!(b.js("return document.documentElement.lang").await, json!("ru"));
    // Every control has a label (or an accessible name).
    let unlabelled = b
        .js("return [...document.querySelectorAll('input,select,textarea')]\
             .filter(e => e.labels.length === 0 && !e.getAttribute('aria-label')).map(e => e.id)")
        .await;
    assert_eq!(unlabelled, json!([]), "controls without a label");
    assert!(b.text("value-phone").await.contains("+77015550177"));
    assert!(b.text("value-address").await.contains("Almaty"));

    // Who received my data: the courier's delivery read, by purpose name and clause.
    let log = b.until_text("access-log", |t| t.contains("courier-kazpost")).await;
    assert!(log.contains("Доставка товара (3.2.3)"), "{log}");
    assert!(
        !log.contains("Aigerim") && !log.contains("+7701"),
        "the access log shows a value: {log}"
    );
    b.screenshot("self-service-main").await;

    // A bad phone is refused, in Russian, naming the field; nothing changes.
    b.type_into("input-phone", "12ab").await;
    b.click("save-phone").await;
    let err = b.until_text("error-phone", |t| !t.is_empty()).await;
    assert!(err.contains("Телефон"), "{err}");
    assert!(!err.contains("phone number"), "the reason is not in Russian: {err}");
    let api = s.get(&format!("/v1/subjects/{id}"), &order, Some("order")).await;
    assert_eq!(api.body["fields"]["phone"], "+77015550177");
    b.screenshot("self-service-refusal").await;

    // A good phone is stored.
    b.type_into("input-phone", "+7 701 555 99 88").await;
    b.click("save-phone").await;
    b.until_text("value-phone", |t| t.contains("+77015559988")).await;
    let api = s.get(&format!("/v1/subjects/{id}"), &order, Some("order")).await;
    assert_eq!(api.body["fields"]["phone"], "+77015559988");

    // Marketing withdrawn on the page: the API refuses marketing reads.
    let cb = b.el("consent-marketing").await;
    assert_eq!(cb.prop("checked").await.unwrap().as_deref(), Some("true"));
    cb.click().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = s.get(&format!("/v1/subjects/{id}"), &order, Some("marketing")).await;
        if r.status == 403 {
            assert_eq!(r.body["code"], "consent_required");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "marketing still allowed after the withdrawal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Download: the same data the API holds, and the access log.
    b.click("download").await;
    let file: Value = serde_json::from_slice(&b.downloaded("pdvault-my-data.json").await).unwrap();
    let api = s.get(&format!("/v1/subjects/{id}"), &order, Some("order")).await;
    assert_eq!(file["subject"]["fields"], api.body["fields"]);
    assert_eq!(file["consents"]["consents"]["marketing"]["granted"], false);
    let entries = file["access_log"].as_array().unwrap();
    assert!(entries
        .iter()
        .any(|e| e["caller"] == "courier-kazpost" && e["purpose"] == "delivery"));

    // Each language, switched in place.
    let ru = b.text("data").await;
    b.click("lang-en").await;
    b.until_text("data", |t| t != ru && t.contains("Phone")).await;
    assert_eq!(b.js("return document.documentElement.lang").await, json!("en"));
    assert!(b.text("access-log").await.contains("(3.2.3)"));
    b.screenshot("self-service-en").await;
    b.click("lang-kk").await;
    b.until_text("data", |t| t.contains("Мекенжай")).await;
    assert_eq!(b.js("return document.documentElement.lang").await, json!("kk"));
    b.screenshot("self-service-kk").await;
    b.click("lang-ru").await;
    b.until_text("data", |t| t.contains("Телефон")).await;

    // The layout holds at 360 px: nothing wider than the window.
    b.client.set_window_size(360, 800).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wide = b
        .js("return document.documentElement.scrollWidth <= window.innerWidth")
        .await;
    assert_eq!(wide, json!(true), "horizontal scrolling at 360 px");
    b.screenshot("self-service-360px").await;
    b.client.set_window_size(1280, 1000).await.unwrap();

    // Erase: confirmed, then the signed receipt, which verifies.
    b.click("erase").await;
    b.click("erase-confirm").await;
    b.until_visible("screen-erased").await;
    let receipt: Value = serde_json::from_str(&b.text("receipt").await).unwrap();
    let sig = b.text("receipt-signature").await;
    assert_eq!(receipt["id"], id.as_str());
    assert!(
        receipt_verifies(&s, &receipt, sig.trim()).await,
        "the receipt's signature does not verify"
    );
    b.screenshot("self-service-erased").await;
    let r = s.get(&format!("/v1/subjects/{id}"), &order, Some("order")).await;
    assert_eq!(r.status, 410);
    b.client.clone().close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_link_and_an_expired_session_end_on_the_expired_screen() {
    let s = Server::start().await;
    let order = s.token("order-service", &["order"], &["read", "write"]).await;
    let id = s.create(&order, full_subject()).await;
    let shop = s.token("shop-backend", &["subject_access"], &["grant"]).await;
    let b = Browser::start(&s).await;

    // A link works once.
    let url = link_url(&s, &shop, &id).await;
    b.open(&url).await;
    b.until_text("value-given_name", |t| t.contains("Aigerim")).await;
    b.click("sign-out").await;
    b.until_visible("screen-signed-out").await;
    // The sign-out also ended the session in the vault: the token the link
    // opened is revoked (the page's call is not awaited: poll the audit log).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let entries = s.audit_entries();
        let allowed = |action: &str| {
            entries
                .iter()
                .filter(|e| e["action"] == action && e["outcome"] == "allowed" && e["subject"] == id.as_str())
                .map(|e| e["target_token_id"].clone())
                .collect::<Vec<_>>()
        };
        let (opened, ended) = (allowed("self_session"), allowed("self_session_end"));
        if !ended.is_empty() {
            assert_eq!(ended, opened, "the sign-out ended another session");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the page's sign-out did not end the session in the vault"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.open(&url).await;
    b.until_visible("screen-expired").await;
    assert!(!b.visible("screen-main").await);
    b.screenshot("self-service-expired").await;

    // A session whose shop token has expired: the next call lands on the
    // expired screen, and the page holds no data any more.
    let short = s.issue("shop-backend", &["subject_access"], &["grant"], 3).await;
    let short = short.body["token"].as_str().unwrap().to_string();
    let url = link_url(&s, &short, &id).await;
    b.open(&url).await;
    b.until_text("value-given_name", |t| t.contains("Aigerim")).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    b.type_into("input-phone", "+77015550000").await;
    b.click("save-phone").await;
    b.until_visible("screen-expired").await;
    assert!(!b.visible("screen-main").await);
    // The token was never put where a script or a later visit could find it.
    let stored = b
        .js("return JSON.stringify([document.cookie, Object.keys(localStorage), Object.keys(sessionStorage)])")
        .await;
    assert_eq!(stored, json!("[\"\",[],[]]"));
    b.client.clone().close().await.unwrap();
}

/// Presses a key on whatever has the focus, as a keyboard user does.
async fn press(b: &Browser, key: fantoccini::key::Key) {
    let focused = b.client.active_element().await.unwrap();
    focused.send_keys(&key.to_string()).await.unwrap();
}

/// The id of the element with the focus ("" for one without an id).
async fn focused_id(b: &Browser) -> String {
    b.js("return document.activeElement ? document.activeElement.id : ''")
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Policy 4.2.1 for a user without a mouse: every control of the page is
/// reached with Tab, the focused one is outlined, and a field is corrected
/// with the keyboard alone (Tab to it, type, Enter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_used_from_the_keyboard_alone() {
    use fantoccini::key::Key;
    let s = Server::start().await;
    let order = s.token("order-service", &["order"], &["read", "write"]).await;
    let shop = s.token("shop-backend", &["subject_access"], &["grant"]).await;
    let id = s.create(&order, full_subject()).await;
    let b = Browser::start(&s).await;
    b.open(&link_url(&s, &shop, &id).await).await;
    b.until_text("value-given_name", |t| t.contains("Aigerim")).await;

    // Every enabled control on screen, in document order.
    let controls: Vec<String> = serde_json::from_value(
        b.js(
            "return [...document.querySelectorAll('a[href],button,input,select,textarea')]\
              .filter(e => !e.disabled && e.offsetParent !== null)\
              .map(e => e.id)",
        )
        .await,
    )
    .unwrap();
    assert!(controls.contains(&"input-phone".to_owned()), "{controls:?}");
    assert!(controls.contains(&"erase".to_owned()), "{controls:?}");
    let mut reached = Vec::new();
    for _ in 0..controls.len() + 10 {
        press(&b, Key::Tab).await;
        let f = focused_id(&b).await;
        if controls.contains(&f) && !reached.contains(&f) {
            // Focus is shown where it is (`:focus-visible` outline).
            let outline = b
                .js("return getComputedStyle(document.activeElement).outlineStyle")
                .await;
            assert_ne!(outline, json!("none"), "#{f} has the focus and no outline");
            reached.push(f);
        }
    }
    let missed: Vec<_> = controls.iter().filter(|c| !reached.contains(c)).collect();
    assert!(missed.is_empty(), "Tab never reaches {missed:?}");

    // Correct the phone: Tab to it, type, Enter.
    b.open(&link_url(&s, &shop, &id).await).await;
    b.until_text("value-given_name", |t| t.contains("Aigerim")).await;
    let mut tabs = 0;
    while focused_id(&b).await != "input-phone" {
        assert!(tabs < controls.len() + 10, "Tab never reached the phone");
        press(&b, Key::Tab).await;
        tabs += 1;
    }
    let phone = b.client.active_element().await.unwrap();
    phone.clear().await.unwrap();
    phone.send_keys("+7 701 555 44 33").await.unwrap();
    press(&b, Key::Enter).await;
    b.until_text("value-phone", |t| t.contains("+77015554433")).await;
    let api = s.get(&format!("/v1/subjects/{id}"), &order, Some("order")).await;
    assert_eq!(api.body["fields"]["phone"], "+77015554433");
    b.client.clone().close().await.unwrap();
}
