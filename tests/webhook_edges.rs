//! The webhook's edges, end to end against Parley in-process: authentication (unsigned, tampered),
//! size and shape (413, 400), the legacy URL (410), Meta's subscription check, delivery statuses
//! (nothing sent, rows updated monotonically), bodies with several entries and messages, messages
//! without text, and the health and readiness probes.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{OTHER_USER, PHONE_NUMBER_ID, TestApp, USER, eventually, post_webhook, sign, status_body, webhook_body};

const WAIT: Duration = Duration::from_secs(15);

/// Lets the workers run whatever they would run, so that "nothing was sent" means something.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(700)).await;
}

async fn inbound_rows(app: &TestApp) -> i64 {
    app.count("select count(*) from messages where direction = 'inbound'").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_and_tampered_bodies_are_refused_with_401_and_never_run() {
    let app = TestApp::spawn().await;
    let body = webhook_body(PHONE_NUMBER_ID, &[(USER, "wamid.SIG1", "Bonjour")]);

    let (unsigned, _) = post_webhook(&app.base, &body, Some("")).await;
    let other = webhook_body(PHONE_NUMBER_ID, &[(USER, "wamid.SIG2", "Un autre message")]);
    let (tampered, _) = post_webhook(&app.base, &body, Some(&sign(&other))).await;
    let (malformed, _) = post_webhook(&app.base, &body, Some("sha256=not-hex")).await;
    let (wrong_secret, _) = post_webhook(
        &app.base,
        &body,
        Some(&parley::whatsapp::meta_signature(&secrecy::SecretString::from("another-secret"), body.as_bytes())),
    )
    .await;

    assert_eq!((unsigned, tampered, malformed, wrong_secret), (401, 401, 401, 401));
    settle().await;
    assert!(app.meta().sent().is_empty(), "a refused body must not be answered: {:?}", app.meta().texts());
    assert!(app.events.named("message_received").is_empty());
    assert_eq!(inbound_rows(&app).await, 0);

    // The same body, correctly signed, goes through: the refusals were about the signature.
    assert_eq!(app.post(&body).await.0, 200);
    app.meta().wait_for_sends(1, WAIT).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_three_mebibytes_is_refused_with_413() {
    let app = TestApp::spawn().await;
    // A well-formed, signed body whose only fault is its size.
    let padding = "x".repeat(3 * 1024 * 1024);
    let body = webhook_body(PHONE_NUMBER_ID, &[(USER, "wamid.BIG", &padding)]);
    assert!(body.len() > 3 * 1024 * 1024);

    let (status, answer) = app.post(&body).await;

    assert_eq!(status, 413, "{answer}");
    settle().await;
    assert!(app.meta().sent().is_empty());
    assert_eq!(inbound_rows(&app).await, 0);
    app.stop().await;
}

/// A sender that is still writing an oversized body when the webhook has decided gets the 413,
/// not a reset connection: the refused body is read to its end (within a bound) before the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_still_writing_an_oversized_body_reads_the_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = TestApp::spawn().await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let len = 4 * 1024 * 1024;
    let head = format!(
        "POST /api/v1/whatsapp/webhook HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {len}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The declared length is refused from the headers: give the webhook time to decide before
    // the body comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..len / chunk.len() {
        stream.write_all(&chunk).await.expect("the connection must stay open while the body is sent");
    }

    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("the answer must not be a reset connection");
        assert!(read > 0, "the connection closed without an answer");
        answer.extend_from_slice(&buf[..read]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    settle().await;
    assert!(app.meta().sent().is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_bodies_without_entries_are_refused_with_400() {
    let app = TestApp::spawn().await;

    for garbage in
        ["this is not json", "[1, 2, 3]", r#"{"object": "x"}"#, r#"{"entry": []}"#, r#"{"object": "x", "entry": {}}"#]
    {
        let (status, answer) = app.post(garbage).await;
        assert_eq!(status, 400, "{garbage} → {answer}");
        let reason: Value =
            serde_json::from_str(&answer).unwrap_or_else(|_| panic!("a JSON reason for {garbage}: {answer}"));
        assert!(reason["error"].as_str().is_some_and(|r| !r.is_empty()), "a short reason: {answer}");
    }

    settle().await;
    assert!(app.meta().sent().is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_legacy_webhook_url_is_gone_for_get_and_post() {
    let app = TestApp::spawn().await;
    let client = reqwest::Client::new();
    let url = format!("{}/whatsapp/webhook", app.base);
    let body = webhook_body(PHONE_NUMBER_ID, &[(USER, "wamid.LEGACY", "Bonjour")]);

    let get = client
        .get(format!("{url}?hub.mode=subscribe&hub.verify_token={}&hub.challenge=42", support::VERIFY_TOKEN))
        .send()
        .await
        .unwrap();
    let post = client
        .post(&url)
        .header("content-type", "application/json")
        .header(parley::whatsapp::signature::META_SIGNATURE_HEADER, sign(&body))
        .body(body.clone())
        .send()
        .await
        .unwrap();

    assert_eq!(get.status().as_u16(), 410);
    assert_eq!(post.status().as_u16(), 410);
    let answer: Value = post.json().await.unwrap();
    assert!(answer.to_string().contains("/api/v1/whatsapp/webhook"), "the answer names the new URL: {answer}");
    settle().await;
    assert!(app.meta().sent().is_empty(), "the legacy URL must not take messages in");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_challenge_is_echoed_only_with_the_right_token() {
    let app = TestApp::spawn().await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/whatsapp/webhook", app.base);

    let right = client
        .get(&url)
        .query(&[
            ("hub.mode", "subscribe"),
            ("hub.verify_token", support::VERIFY_TOKEN),
            ("hub.challenge", "1158201444"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(right.status().as_u16(), 200);
    let content_type = right.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert_eq!(right.text().await.unwrap(), "1158201444");

    let wrong = client
        .get(&url)
        .query(&[("hub.mode", "subscribe"), ("hub.verify_token", "not-the-token"), ("hub.challenge", "1158201444")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 403);
    assert!(!wrong.text().await.unwrap().contains("1158201444"));

    let no_token =
        client.get(&url).query(&[("hub.mode", "subscribe"), ("hub.challenge", "1158201444")]).send().await.unwrap();
    assert_eq!(no_token.status().as_u16(), 403);
    let wrong_mode = client
        .get(&url)
        .query(&[("hub.mode", "unsubscribe"), ("hub.verify_token", support::VERIFY_TOKEN), ("hub.challenge", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_mode.status().as_u16(), 403);
    app.stop().await;
}

async fn outbound_status(app: &TestApp, sent_id: &str) -> String {
    sqlx::query_scalar::<_, String>(
        "select status from messages where direction = 'outbound' and provider_message_id = $1",
    )
    .bind(sent_id)
    .fetch_one(app.env.store.pool())
    .await
    .expect("the outbound row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_send_nothing_and_move_the_answer_forward_only() {
    let app = TestApp::spawn().await;

    // Statuses about a message Parley never sent: accepted, nothing runs, nothing is sent.
    let (status, answer) = app.post(&status_body(PHONE_NUMBER_ID, &[("wamid.unknown-out", "delivered")])).await;
    assert_eq!((status, answer.as_str()), (200, r#"{"status":"ok"}"#));
    app.events.wait_for("status_updated", 1, WAIT).await;
    settle().await;
    assert!(app.meta().sent().is_empty());
    assert_eq!(app.env.llm.requests(), 0);
    assert!(app.events.named("job_added").is_empty(), "a status is not a message job");
    assert_eq!(inbound_rows(&app).await, 0);

    // A message answered, then its answer's statuses: sent → delivered → read.
    assert_eq!(app.send_text(USER, "wamid.ST1", "Bonjour").await, 200);
    let sent = app.meta().wait_for_sends(1, WAIT).await;
    app.events.wait_for("message_sent", 1, WAIT).await;
    let sent_id = app.events.named("message_sent")[0]["sentMessageId"].as_str().unwrap().to_owned();
    assert_eq!(sent[0]["context"]["message_id"], "wamid.ST1");
    assert_eq!(outbound_status(&app, &sent_id).await, "sent");

    let mut applied = 1;
    for (next, expected) in [("delivered", "delivered"), ("read", "read"), ("delivered", "read"), ("sent", "read")] {
        assert_eq!(app.post(&status_body(PHONE_NUMBER_ID, &[(&sent_id, next)])).await.0, 200);
        applied += 1;
        app.events.wait_for("status_updated", applied, WAIT).await;
        assert_eq!(outbound_status(&app, &sent_id).await, expected, "after a `{next}` status");
    }
    let late = app.events.named("status_updated");
    assert_eq!(late.iter().rev().take(2).filter(|e| e["changed"] == true).count(), 0, "late statuses change nothing");

    // Statuses never ran the pipeline again nor counted against the quota.
    assert_eq!(app.meta().sent().len(), 1);
    assert_eq!(app.env.llm.requests(), 1);
    let used = app.count("select coalesce(sum(used), 0)::bigint from monthly_usage").await;
    assert_eq!(used, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_with_three_messages_in_two_entries_gets_three_replies() {
    let app = TestApp::spawn().await;
    let change = |messages: Value, contacts: Value| {
        json!({"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001111", "phone_number_id": PHONE_NUMBER_ID},
            "contacts": contacts,
            "messages": messages
        }})
    };
    let text = |from: &str, id: &str, body: &str| json!({"from": from, "id": id, "timestamp": chrono::Utc::now().timestamp().to_string(), "type": "text", "text": {"body": body}});
    let contact = |from: &str| json!({"profile": {"name": "Client"}, "wa_id": from});
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [
            {"id": "WABA_ID", "changes": [change(
                json!([text(USER, "wamid.M1", "Premier"), text(OTHER_USER, "wamid.M2", "Deuxième")]),
                json!([contact(USER), contact(OTHER_USER)]),
            )]},
            {"id": "WABA_ID", "changes": [change(json!([text(USER, "wamid.M3", "Troisième")]), json!([contact(USER)]))]}
        ]
    })
    .to_string();

    assert_eq!(app.post(&body).await.0, 200);

    app.meta().wait_for_sends(3, WAIT).await;
    settle().await;
    let sent = app.meta().sent();
    assert_eq!(sent.len(), 3, "{:?}", app.meta().texts());
    let mut answered: Vec<(String, String)> = sent
        .iter()
        .map(|s| {
            (
                s["context"]["message_id"].as_str().unwrap_or_default().to_owned(),
                s["to"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    answered.sort();
    assert_eq!(
        answered,
        [("wamid.M1", USER), ("wamid.M2", OTHER_USER), ("wamid.M3", USER)].map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    // One conversation's two messages are answered in the order of the body.
    let user_texts: Vec<String> = app.meta().texts().into_iter().filter(|t| !t.contains("Deuxième")).collect();
    assert_eq!(user_texts, ["Réponse à « Premier »", "Réponse à « Troisième »"]);
    assert_eq!(app.events.named("message_received").len(), 3);
    assert_eq!(app.events.named("job_added").len(), 3);
    assert_eq!(inbound_rows(&app).await, 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_location_message_is_recorded_and_ignored_without_an_answer() {
    let app = TestApp::spawn().await;
    let mut body: Value =
        serde_json::from_str(&webhook_body(PHONE_NUMBER_ID, &[(USER, "wamid.LOCATION", "")])).unwrap();
    let message = &mut body["entry"][0]["changes"][0]["value"]["messages"][0];
    message["type"] = json!("location");
    message.as_object_mut().unwrap().remove("text");
    message["location"] = json!({"latitude": 48.8584, "longitude": 2.2945, "name": "Tour Eiffel"});

    assert_eq!(app.post(&body.to_string()).await.0, 200);

    let ignored = app.events.wait_for("message_ignored", 1, WAIT).await;
    assert_eq!(ignored[0]["providerMessageId"], "wamid.LOCATION");
    assert_eq!(ignored[0]["messageType"], "location");
    let recorded = app
        .count("select count(*) from messages where direction = 'inbound' and provider_message_id = 'wamid.LOCATION' and message_type = 'location'")
        .await;
    assert_eq!(recorded, 1);
    settle().await;
    assert!(app.meta().sent().is_empty(), "{:?}", app.meta().texts());
    assert_eq!(app.env.llm.requests(), 0);
    let names = app.events.names_for("wamid.LOCATION");
    assert!(!names.iter().any(|n| n == "llm_request" || n == "message_sent"), "{names:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_public_and_ready_reports_its_dependencies_up() {
    let app = TestApp::spawn().await;
    let client = reqwest::Client::new();

    let health = client.get(format!("{}/health", app.base)).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let text = health.to_string();
    assert!(!text.contains(support::APP_SECRET) && !text.contains(support::API_KEY), "{text}");

    // The worker registers itself within a heartbeat.
    let ready: Value = eventually(WAIT, "a ready answer with a live worker", || async {
        let resp = client.get(format!("{}/ready", app.base)).send().await.ok()?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.ok()?;
        (status == 200 && body["liveWorkers"].as_u64().is_some_and(|n| n >= 1)).then_some(body)
    })
    .await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["checks"]["postgres"]["status"], "up");
    assert_eq!(ready["checks"]["redis"]["status"], "up");
    assert_eq!(ready["pipelineGeneration"], 1);
    let strict = client.get(format!("{}/ready?strict=true", app.base)).send().await.unwrap();
    assert_eq!(strict.status().as_u16(), 200);
    app.stop().await;
}
