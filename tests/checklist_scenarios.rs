//! The go-live checklist's scenarios A–E, end to end: real PostgreSQL and Redis, Parley on port 0,
//! fake Meta and LLM servers on loopback.

mod support;

use std::time::Duration;

use support::{OTHER_USER, TestApp, USER};

const WAIT: Duration = Duration::from_secs(15);

fn position(names: &[String], name: &str) -> usize {
    names.iter().position(|n| n == name).unwrap_or_else(|| panic!("no `{name}` in {names:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_message_gets_one_answer_with_the_events_in_order() {
    let app = TestApp::spawn().await;

    assert_eq!(app.send_text(USER, "wamid.A1", "Bonjour, ceci est un test").await, 200);

    let sent = app.meta().wait_for_sends(1, WAIT).await;
    assert_eq!(sent[0]["to"], USER);
    assert_eq!(sent[0]["text"]["body"], "Réponse à « Bonjour, ceci est un test »");
    assert_eq!(sent[0]["context"]["message_id"], "wamid.A1");
    app.events.wait_for("message_sent", 1, WAIT).await;
    let names = app.events.names_for("wamid.A1");
    let order = ["message_received", "job_added", "llm_request", "message_sent"].map(|n| position(&names, n));
    assert!(order.windows(2).all(|w| w[0] < w[1]), "events out of order: {names:?}");

    let inbound = app
        .count("select count(*) from messages where direction = 'inbound' and provider_message_id = 'wamid.A1'")
        .await;
    let outbound = app.count("select count(*) from messages where direction = 'outbound' and in_reply_to = 'wamid.A1' and status = 'sent'").await;
    assert_eq!((inbound, outbound), (1, 1));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_the_same_message_delivered_twice_is_answered_once() {
    let app = TestApp::spawn().await;

    assert_eq!(app.send_text(USER, "wamid.E1", "Test idempotence").await, 200);
    app.meta().wait_for_sends(1, WAIT).await;
    assert_eq!(app.send_text(USER, "wamid.E1", "Test idempotence").await, 200);
    app.events.wait_for("duplicate_message_dropped", 1, WAIT).await;

    // Twice at the same time, for another message.
    let body = support::webhook_body(support::PHONE_NUMBER_ID, &[(OTHER_USER, "wamid.E2", "En double")]);
    let (a, b) = tokio::join!(app.post(&body), app.post(&body));
    assert_eq!((a.0, b.0), (200, 200));
    app.events.wait_for("duplicate_message_dropped", 2, WAIT).await;
    app.meta().wait_for_sends(2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(app.meta().sent().len(), 2, "one answer per message: {:?}", app.meta().texts());
    let rows = app.count("select count(*) from messages where direction = 'inbound' and provider_message_id in ('wamid.E1', 'wamid.E2')").await;
    assert_eq!(rows, 2);
    assert_eq!(app.env.llm.requests(), 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_ten_messages_in_thirty_seconds_get_five_answers_and_one_notice() {
    let app = TestApp::spawn().await;

    for i in 1..=10 {
        assert_eq!(app.send_text(USER, &format!("wamid.D{i}"), &format!("Message rapide {i}")).await, 200);
    }
    app.meta().wait_for_sends(6, WAIT).await;
    let limited = app.events.wait_for("rate_limited", 5, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let texts = app.meta().texts();
    assert_eq!(texts.len(), 6, "five answers and one notice: {texts:?}");
    let notices: Vec<_> = texts.iter().filter(|t| t.contains("Trop de messages")).collect();
    assert_eq!(notices.len(), 1);
    assert_eq!(app.env.llm.requests(), 5);
    let first = limited.iter().filter(|e| e["alreadyNotified"] == false).count();
    let later = limited.iter().filter(|e| e["alreadyNotified"] == true).count();
    assert_eq!((first, later), (1, 4));
    assert!(limited.iter().all(|e| e["reason"] == "conversation limit exceeded"));
    for i in 7..=10 {
        let names = app.events.names_for(&format!("wamid.D{i}"));
        assert!(!names.contains(&"llm_request".to_owned()) && !names.contains(&"message_sent".to_owned()), "{names:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_and_c_a_tenant_over_its_quota_gets_the_notice_without_the_llm() {
    let app = TestApp::spawn_with(support::Options { monthly_messages: Some(1), ..Default::default() }).await;

    assert_eq!(app.send_text(USER, "wamid.B0", "Premier message").await, 200);
    app.meta().wait_for_sends(1, WAIT).await;

    // B: the first message over the quota.
    assert_eq!(app.send_text(USER, "wamid.B1", "Deuxième message").await, 200);
    app.meta().wait_for_sends(2, WAIT).await;
    let names = app.events.names_for("wamid.B1");
    assert!(position(&names, "quota_exceeded") < position(&names, "quota_exceeded_handled"), "{names:?}");
    assert!(!names.contains(&"llm_request".to_owned()), "{names:?}");
    assert!(app.meta().texts()[1].contains("limite de messages pour ce mois"));
    let blocked = app.count("select count(*) from conversations where quota_blocked_period is not null").await;
    assert_eq!(blocked, 1);

    // C: the next message there — the notice again, without asking the quota.
    assert_eq!(app.send_text(USER, "wamid.C1", "Troisième message").await, 200);
    app.meta().wait_for_sends(3, WAIT).await;
    let names = app.events.names_for("wamid.C1");
    assert!(
        names.contains(&"quota_exceeded_handled".to_owned()) && !names.contains(&"quota_exceeded".to_owned()),
        "{names:?}"
    );
    let handled = app.events.named("quota_exceeded_handled");
    assert_eq!(handled.last().unwrap()["alreadyBlocked"], true);
    assert_eq!(app.env.llm.requests(), 1);
    let used = app.count("select coalesce(sum(used), 0)::bigint from monthly_usage").await;
    assert_eq!(used, 1, "refused messages are not counted");
    app.stop().await;
}
