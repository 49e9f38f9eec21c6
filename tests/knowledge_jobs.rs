//! The knowledge base as jobs, end to end: uploads through the admin API (multipart) and
//! `parley kb ingest` queue documents; the knowledge worker indexes them; a WhatsApp question is
//! answered from them. Real PostgreSQL and Redis; the `local` LLM quotes the passage it was given.

mod support;

use std::{path::Path, process::Output, time::Duration};

use parley::{
    http::auth::mint_token,
    store::{PgStore, SeedTenant, testing::TestDatabase},
};
use secrecy::ExposeSecret;
use serde_json::Value;
use support::{Options, TestApp, USER, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIVRAISON: &str = include_str!("../knowledge/sample/livraison.md");
const CORRUPT_PDF: &[u8] = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 9 0 R >> endobj\nxref\nbroken\n%%EOF";
const BOUNDARY: &str = "parley-test-boundary-7MA4YWxkTrZu0gW";

/// Parley with the `local` LLM and its originals in a directory of the test's own.
async fn spawn(knowledge_dir: &Path) -> TestApp {
    TestApp::spawn_with(Options {
        extra_env: vec![
            ("LLM_PROVIDER".into(), "local".into()),
            ("KNOWLEDGE_DIR".into(), knowledge_dir.display().to_string()),
        ],
        ..Options::default()
    })
    .await
}

fn token(app: &TestApp, tenant: Option<&str>) -> String {
    mint_token(&app.app.settings.jwt_secret, "admin", tenant, Duration::from_secs(600)).unwrap()
}

fn tenant_token(app: &TestApp) -> String {
    token(app, Some(&app.env.tenant.tenant_id.to_string()))
}

/// A multipart/form-data body with one `file` part per (name, content).
fn multipart(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, content) in files {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

async fn upload(app: &TestApp, token: &str, files: &[(&str, &[u8])]) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/admin/knowledge/documents", app.base))
        .bearer_auth(token)
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(multipart(files))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn list(app: &TestApp, token: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/admin/knowledge/documents", app.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls the list until the document reaches `indexed` or `error`.
async fn settled(app: &TestApp, token: &str, id: &str) -> Value {
    eventually(Duration::from_secs(20), &format!("document {id} indexed or failed"), || async {
        let (_, body) = list(app, token).await;
        body["documents"]
            .as_array()
            .and_then(|docs| docs.iter().find(|d| d["id"] == id).cloned())
            .filter(|d| d["status"] == "indexed" || d["status"] == "error")
    })
    .await
}

#[tokio::test]
async fn an_uploaded_document_is_indexed_by_the_worker_and_answers_a_whatsapp_question() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn(dir.path()).await;
    let token = tenant_token(&app);

    let (status, body) = upload(&app, &token, &[("livraison.md", LIVRAISON.as_bytes())]).await;
    assert_eq!(status, 202, "{body}");
    let file = &body["files"][0];
    assert_eq!((file["name"].as_str(), file["status"].as_str()), (Some("livraison.md"), Some("uploaded")), "{body}");
    let id = file["documentId"].as_str().unwrap().to_owned();

    let doc = settled(&app, &token, &id).await;
    assert_eq!(doc["status"], "indexed", "{doc}");
    assert!(doc["chunks"].as_i64().unwrap() >= 3, "{doc}");
    assert_eq!(doc["bytes"], LIVRAISON.len());
    assert_eq!(doc["title"], "Livraison");
    app.events.wait_for("knowledge_document_indexed", 1, Duration::from_secs(5)).await;

    // The same content again: a duplicate of the same document, nothing added.
    let (status, body) = upload(&app, &token, &[("copie.md", LIVRAISON.as_bytes())]).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["files"][0]["status"], "duplicate");
    assert_eq!(body["files"][0]["documentId"], id.as_str());
    assert_eq!(list(&app, &token).await.1["documents"].as_array().unwrap().len(), 1);

    // A customer asks; the local LLM quotes the passage retrieval found.
    assert_eq!(app.send_text(USER, "wamid.kb-question", "La livraison est-elle gratuite ?").await, 200);
    let sent = app.meta().wait_for_sends(1, Duration::from_secs(20)).await;
    let reply = sent[0]["text"]["body"].as_str().unwrap_or_default().to_owned();
    assert!(reply.contains("gratuite dès 50 euros"), "{reply}");
    let retrieved = app.events.wait_for("knowledge_retrieved", 1, Duration::from_secs(5)).await;
    assert!(retrieved[0]["count"].as_u64().unwrap_or(0) >= 1, "{retrieved:?}");
    app.stop().await;
}

#[tokio::test]
async fn each_file_gets_its_own_outcome_and_a_corrupt_pdf_ends_in_error_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn(dir.path()).await;
    let token = tenant_token(&app);

    let (status, body) = upload(
        &app,
        &token,
        &[("tarifs.pdf", CORRUPT_PDF), ("photo.png", b"\x89PNG"), ("horaires.txt", "Ouvert de 9h à 19h.".as_bytes())],
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let files = body["files"].as_array().unwrap();
    assert_eq!(files.len(), 3);
    assert_eq!(files[0]["status"], "uploaded");
    assert_eq!(files[1]["status"], "error");
    assert_eq!(files[1]["error"], "unsupported file type (accepted: .txt, .md, .html, .pdf)");
    assert!(files[1].get("documentId").is_none());
    assert_eq!(files[2]["status"], "uploaded");

    let pdf = settled(&app, &token, files[0]["documentId"].as_str().unwrap()).await;
    assert_eq!(pdf["status"], "error");
    assert!(pdf["error"].as_str().unwrap().starts_with("unreadable PDF"), "{pdf}");
    assert_eq!(pdf["chunks"], 0);
    assert_eq!(settled(&app, &token, files[2]["documentId"].as_str().unwrap()).await["status"], "indexed");
    let failed = app.events.wait_for("knowledge_document_failed", 1, Duration::from_secs(5)).await;
    assert_eq!(failed[0]["documentId"], files[0]["documentId"]);

    // Every file refused: 422, nothing queued.
    let (status, body) = upload(&app, &token, &[("virus.exe", b"MZ")]).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["files"][0]["status"], "error");
    // No file at all: a clear 400.
    let (status, body) = upload(&app, &token, &[]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("`file`"), "{body}");
    assert_eq!(list(&app, &token).await.1["documents"].as_array().unwrap().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn the_knowledge_endpoints_need_a_token_scoped_to_an_existing_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn(dir.path()).await;

    let without = token(&app, None);
    let (status, body) = list(&app, &without).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["error"],
        "this endpoint needs a token scoped to a tenant: mint one with `parley token --role admin --tenant ID`"
    );
    let (status, _) = upload(&app, &without, &[("a.txt", b"a")]).await;
    assert_eq!(status, 403);

    let unknown = token(&app, Some("no-such-tenant"));
    let (status, body) = list(&app, &unknown).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("does not exist"), "{body}");

    let resp = reqwest::get(format!("{}/api/v1/admin/knowledge/documents", app.base)).await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    // The tenant by name works as well as by id; the pipeline reload needs no tenant.
    let tenant_name: String = sqlx::query_scalar("SELECT name FROM tenants WHERE id = $1")
        .bind(app.env.tenant.tenant_id)
        .fetch_one(app.env.store.pool())
        .await
        .unwrap();
    assert_eq!(list(&app, &token(&app, Some(&tenant_name))).await.0, 200);
    let reload = reqwest::Client::new()
        .post(format!("{}/api/v1/admin/pipelines/reload", app.base))
        .bearer_auth(&without)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status().as_u16(), 200);
    app.stop().await;
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused_before_its_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn(dir.path()).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/admin/knowledge/documents HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        tenant_token(&app),
        parley::http::knowledge::MAX_UPLOAD_BYTES + 1
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("bytes per request"), "{answer}");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// `parley kb`, the real binary

fn parley(db: &TestDatabase, knowledge_dir: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(args)
        .env_clear()
        .env("DATABASE_URL", db.url.expose_secret())
        .env("KNOWLEDGE_DIR", knowledge_dir)
        .env("JOB_BACKOFF_BASE", "100ms")
        .output()
        .expect("run parley")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn kb_ingest_waits_prints_one_line_per_file_and_exits_non_zero_on_a_failure() {
    let db = TestDatabase::create().await;
    let store = PgStore::new(db.pool.clone());
    store
        .seed_tenant(&SeedTenant {
            name: "Boutique CLI".into(),
            phone_number_id: "PNID-CLI".into(),
            plan: None,
            monthly_messages: None,
            provider: "sandbox".into(),
        })
        .await
        .unwrap();
    let files = tempfile::tempdir().unwrap();
    let originals = tempfile::tempdir().unwrap();
    let faq = files.path().join("livraison.md");
    let pdf = files.path().join("tarifs.pdf");
    let later = files.path().join("later.txt");
    std::fs::write(&faq, LIVRAISON).unwrap();
    std::fs::write(&pdf, CORRUPT_PDF).unwrap();
    std::fs::write(&later, "Plus tard.").unwrap();
    let (faq, pdf, later) = (faq.display().to_string(), pdf.display().to_string(), later.display().to_string());

    let out = parley(&db, originals.path(), &["kb", "ingest", &faq, &pdf, "--tenant", "Boutique CLI"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0], format!("{faq}: indexed"));
    assert!(lines[1].starts_with(&format!("{pdf}: error: unreadable PDF")), "{lines:?}");
    // No progress bar when stderr is not a terminal.
    assert!(!String::from_utf8_lossy(&out.stderr).contains("indexed "), "{out:?}");

    let out = parley(&db, originals.path(), &["kb", "ingest", &faq, "--tenant", "Boutique CLI"]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), format!("{faq}: duplicate\n")));

    let out = parley(&db, originals.path(), &["kb", "ingest", "--no-wait", &later, "--tenant", "Boutique CLI"]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), format!("{later}: queued\n")));
    let out = parley(&db, originals.path(), &["kb", "list", "--json", "--tenant", "Boutique CLI"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let statuses: Vec<(String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["source"].as_str().unwrap().to_owned(), d["status"].as_str().unwrap().to_owned()))
        .collect();
    assert!(statuses.contains(&("later.txt".into(), "uploaded".into())), "{statuses:?}");
    assert!(statuses.contains(&("livraison.md".into(), "indexed".into())), "{statuses:?}");
    assert!(statuses.contains(&("tarifs.pdf".into(), "error".into())), "{statuses:?}");

    // A re-index queues it again and waits for it.
    let id = listed.as_array().unwrap().iter().find(|d| d["source"] == "livraison.md").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = parley(&db, originals.path(), &["kb", "reindex", &id, "--tenant", "Boutique CLI"]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), format!("{id}: indexed\n")), "{out:?}");

    let missing = files.path().join("missing.md").display().to_string();
    let out = parley(&db, originals.path(), &["kb", "ingest", &missing, "--tenant", "Boutique CLI"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).starts_with(&format!("{missing}: error: ")), "{out:?}");
    let out = parley(&db, originals.path(), &["kb", "ingest", &faq, "--tenant", "Nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown tenant \"Nobody\""), "{out:?}");
    db.drop_database().await;
}
