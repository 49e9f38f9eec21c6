//! Inbound media end to end: a user sends an image, a voice message or a document; Parley fetches
//! the file through the fake Meta media API, keeps it in object storage, records it on the
//! message, and answers from the caption or a placeholder. Also the `ack` stage's read receipt
//! through the real Meta sender.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{API_KEY, Options, PHONE_NUMBER_ID, TestApp, USER, webhook_body};

const WAIT: Duration = Duration::from_secs(20);

/// A webhook body with one media message of `kind` (`image`, `audio`, …) whose media object is
/// `media`: the text message of `webhook_body`, turned into it.
fn media_body(wamid: &str, kind: &str, media: Value) -> String {
    let mut body: Value = serde_json::from_str(&webhook_body(PHONE_NUMBER_ID, &[(USER, wamid, "")])).unwrap();
    let message = &mut body["entry"][0]["changes"][0]["value"]["messages"][0];
    message.as_object_mut().expect("a message object").remove("text");
    message["type"] = json!(kind);
    message[kind] = media;
    body.to_string()
}

/// Parley with its object storage in a directory of the test's own.
async fn spawn(extra_env: &[(&str, &str)]) -> (TestApp, tempfile::TempDir) {
    let storage = tempfile::tempdir().unwrap();
    let mut options = Options::default();
    options.extra_env.push(("KNOWLEDGE_DIR".into(), storage.path().display().to_string()));
    for (k, v) in extra_env {
        options.extra_env.push(((*k).into(), (*v).into()));
    }
    (TestApp::spawn_with(options).await, storage)
}

/// The media columns of the inbound message `wamid`.
async fn media_row(app: &TestApp, wamid: &str) -> (Option<String>, Option<String>, Option<i64>, Option<String>) {
    sqlx::query_as(
        "SELECT media_key, media_mime_type, media_bytes, media_error FROM messages
         WHERE provider_message_id = $1 AND direction = 'inbound'",
    )
    .bind(wamid)
    .fetch_one(app.env.store.pool())
    .await
    .expect("the inbound row")
}

#[tokio::test]
async fn image_with_a_caption_is_answered_from_the_caption_and_kept_in_storage() {
    let (app, storage) = spawn(&[]).await;
    let jpeg: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    app.meta().add_media("MEDIA_IMG_1", "image/jpeg", &jpeg);
    let wamid = "wamid.IMG==";

    let body = media_body(
        wamid,
        "image",
        json!({"id": "MEDIA_IMG_1", "caption": "Is this receipt paid?", "mime_type": "image/jpeg"}),
    );
    assert_eq!(app.post(&body).await.0, 200);

    let sent = app.meta().wait_for_sends(1, WAIT).await;
    assert_eq!(sent[0]["text"]["body"], "Réponse à « Is this receipt paid? »");
    assert_eq!(sent[0]["context"]["message_id"], wamid);

    let tenant = app.env.tenant.tenant_id;
    let key = format!("media/{tenant}/wamid.IMG_3D_3D");
    assert_eq!(std::fs::read(storage.path().join(&key)).expect("the stored image"), jpeg);
    let (media_key, mime, bytes, error) = media_row(&app, wamid).await;
    assert_eq!(media_key.as_deref(), Some(key.as_str()));
    assert_eq!(mime.as_deref(), Some("image/jpeg"));
    assert_eq!(bytes, Some(3000));
    assert_eq!(error, None);

    let requests = app.meta().media_requests();
    assert_eq!(
        requests.iter().map(|(path, _)| path.as_str()).collect::<Vec<_>>(),
        ["/MEDIA_IMG_1", "/lookaside/MEDIA_IMG_1"],
        "looked up, then downloaded"
    );
    assert!(requests.iter().all(|(_, auth)| auth == &format!("Bearer {API_KEY}")), "{requests:?}");
    let stored = app.events.wait_for("media_stored", 1, WAIT).await;
    assert_eq!(stored[0]["objectKey"], key.as_str());
    assert_eq!(stored[0]["bytes"], 3000);
    assert_eq!(stored[0]["providerMessageId"], wamid);
    assert!(!app.events.text().contains(API_KEY));
    app.stop().await;
}

#[tokio::test]
async fn voice_message_gets_an_answer_to_the_placeholder() {
    let (app, storage) = spawn(&[]).await;
    app.meta().add_media("MEDIA_VOICE", "audio/ogg", b"OggS fake voice");

    let body = media_body(
        "wamid.VOICE",
        "audio",
        json!({"id": "MEDIA_VOICE", "mime_type": "audio/ogg; codecs=opus", "voice": true}),
    );
    assert_eq!(app.post(&body).await.0, 200);

    let sent = app.meta().wait_for_sends(1, WAIT).await;
    assert_eq!(sent[0]["text"]["body"], "Réponse à « [The user sent a voice message] »");
    let tenant = app.env.tenant.tenant_id;
    assert_eq!(std::fs::read(storage.path().join(format!("media/{tenant}/wamid.VOICE"))).unwrap(), b"OggS fake voice");
    assert_eq!(app.events.named("message_ignored").len(), 0, "no longer ignored");
    app.stop().await;
}

#[tokio::test]
async fn file_over_the_limit_is_not_downloaded_and_the_answer_says_so() {
    let (app, storage) = spawn(&[("MEDIA_MAX_BYTES", "1000")]).await;
    app.meta().add_media("MEDIA_BIG", "application/pdf", &vec![b'%'; 5000]);

    let body = media_body(
        "wamid.BIG",
        "document",
        json!({"id": "MEDIA_BIG", "filename": "contrat.pdf", "mime_type": "application/pdf"}),
    );
    assert_eq!(app.post(&body).await.0, 200);

    let sent = app.meta().wait_for_sends(1, WAIT).await;
    assert_eq!(
        sent[0]["text"]["body"],
        "Réponse à « [The user sent a document: contrat.pdf]\n[The document could not be opened: it is too large] »"
    );
    let paths: Vec<String> = app.meta().media_requests().into_iter().map(|(path, _)| path).collect();
    assert_eq!(paths, ["/MEDIA_BIG"], "refused from its declared size, before downloading");
    let failed = app.events.wait_for("media_fetch_failed", 1, WAIT).await;
    assert_eq!(failed[0]["reason"], "too_large");
    assert_eq!(failed[0]["retryable"], false);
    assert_eq!(failed[0]["from"], "3361XXXXX78", "the number is masked");
    assert!(!app.events.text().contains(USER), "no unmasked number in the logs");
    let (media_key, _, _, error) = media_row(&app, "wamid.BIG").await;
    assert_eq!((media_key, error.as_deref()), (None, Some("too_large")));
    assert!(!storage.path().join("media").exists(), "nothing stored");
    app.stop().await;
}

#[tokio::test]
async fn media_api_outage_retries_the_job_then_answers() {
    let (app, storage) = spawn(&[]).await;
    app.meta().add_media("MEDIA_LATE", "image/png", b"\x89PNG fake");
    // More than the client's own three attempts: the job itself has to come back.
    app.meta().media_unavailable_for(3);

    let body = media_body("wamid.LATE", "image", json!({"id": "MEDIA_LATE", "caption": "Voici la photo"}));
    assert_eq!(app.post(&body).await.0, 200);

    let sent = app.meta().wait_for_sends(1, WAIT).await;
    assert_eq!(sent[0]["text"]["body"], "Réponse à « Voici la photo »");
    assert_eq!(sent.len(), 1);
    let failed = app.events.named("media_fetch_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["retryable"], true);
    assert_eq!(failed[0]["reason"], "http_503");
    assert_eq!(app.events.named("job_retry").len(), 1);
    let tenant = app.env.tenant.tenant_id;
    assert!(storage.path().join(format!("media/{tenant}/wamid.LATE")).exists());
    app.stop().await;
}

#[tokio::test]
async fn sticker_is_kept_but_not_answered() {
    let (app, storage) = spawn(&[]).await;
    app.meta().add_media("MEDIA_STICKER", "image/webp", b"RIFF webp");

    let body = media_body("wamid.STICKER", "sticker", json!({"id": "MEDIA_STICKER", "mime_type": "image/webp"}));
    assert_eq!(app.post(&body).await.0, 200);

    let ignored = app.events.wait_for("message_ignored", 1, WAIT).await;
    assert_eq!(ignored[0]["messageType"], "sticker");
    let tenant = app.env.tenant.tenant_id;
    assert!(storage.path().join(format!("media/{tenant}/wamid.STICKER")).exists());
    assert!(app.meta().sent().is_empty(), "no answer to a sticker");
    app.stop().await;
}

#[tokio::test]
async fn ack_stage_marks_the_message_read_with_the_typing_indicator_before_answering() {
    let pipeline = std::fs::read_to_string("pipelines/whatsapp.toml").expect("the shipped pipeline");
    let llm_stage = "[[stages]]\nkind = \"llm\"";
    assert!(pipeline.contains(llm_stage), "the shipped pipeline has an llm stage");
    let pipeline =
        pipeline.replacen(llm_stage, &format!("[[stages]]\nkind = \"ack\"\ntyping = true\n\n{llm_stage}"), 1);
    let storage = tempfile::tempdir().unwrap();
    let app = TestApp::spawn_with(Options {
        pipeline,
        extra_env: vec![("KNOWLEDGE_DIR".into(), storage.path().display().to_string())],
        ..Options::default()
    })
    .await;

    assert_eq!(app.send_text(USER, "wamid.ACK", "Bonjour").await, 200);

    let sent = app.meta().wait_for_sends(1, WAIT).await;
    assert_eq!(sent[0]["text"]["body"], "Réponse à « Bonjour »");
    assert_eq!(
        app.meta().read_receipts(),
        [
            json!({"messaging_product": "whatsapp", "status": "read", "message_id": "wamid.ACK", "typing_indicator": {"type": "text"}})
        ]
    );
    assert!(app.events.named("stage_failed_open").is_empty());
    app.stop().await;
}
