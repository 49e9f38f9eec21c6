//! The flow of many messages, end to end: one conversation's answers in the order its messages
//! were accepted while conversations run side by side; worker processes killed (SIGKILL) or
//! stopped (SIGTERM) mid-batch losing nothing; the pipeline file rewritten while messages stream
//! in; and no test phone number unmasked in the logs of the real binary.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use support::{
    Captured, Environment, OTHER_USER, Options, PHONE_NUMBER_ID, ParleyProcess, TestApp, USER, eventually,
    post_webhook, webhook_body,
};

const WAIT: Duration = Duration::from_secs(20);

/// The shipped pipeline with `from` replaced by `to`, checking that `from` is there.
fn shipped_pipeline_with(changes: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string("pipelines/whatsapp.toml").expect("the shipped pipeline");
    for (from, to) in changes {
        assert!(text.contains(from), "the shipped pipeline has no `{from}`");
        text = text.replacen(from, to, 1);
    }
    text
}

/// The shipped pipeline with room for a hundred messages per conversation and sender.
fn roomy_pipeline() -> String {
    shipped_pipeline_with(&[
        ("conversation = { limit = 5, window = \"30s\" }", "conversation = { limit = 100, window = \"30s\" }"),
        ("sender = { limit = 20, window = \"5m\" }", "sender = { limit = 100, window = \"5m\" }"),
    ])
}

/// What the fake LLM answers to `text`.
fn answer_to(text: &str) -> String {
    format!("Réponse à « {text} »")
}

/// The inbound message a send answers (the send quotes it).
fn quoted(send: &Value) -> String {
    send["context"]["message_id"].as_str().unwrap_or_default().to_owned()
}

/// The question of an LLM request: its last user message.
fn question(request: &Value) -> String {
    request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn set_llm_delay(env: &Environment, delay: Duration) {
    *env.llm.state.delay.lock().unwrap() = delay;
}

// ---------------------------------------------------------------------------------------------
// Order

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_messages_of_one_conversation_are_answered_in_the_order_they_were_accepted() {
    let app = TestApp::spawn_with(Options { pipeline: roomy_pipeline(), ..Default::default() }).await;
    let texts: Vec<String> = (1..=20).map(|i| format!("Question numéro {i}")).collect();

    for (i, text) in texts.iter().enumerate() {
        assert_eq!(app.send_text(USER, &format!("wamid.ORD{i}"), text).await, 200);
    }

    app.meta().wait_for_sends(20, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let expected: Vec<String> = texts.iter().map(|t| answer_to(t)).collect();
    assert_eq!(app.meta().texts(), expected, "every message answered once, in the order accepted");
    let quotes: Vec<String> = app.meta().sent().iter().map(quoted).collect();
    assert_eq!(quotes, (0..20).map(|i| format!("wamid.ORD{i}")).collect::<Vec<_>>());
    assert!(app.events.named("rate_limited").is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_conversations_keep_their_own_order_and_do_not_wait_for_each_other() {
    let app = TestApp::spawn_with(Options { pipeline: roomy_pipeline(), ..Default::default() }).await;
    set_llm_delay(&app.env, Duration::from_millis(100));
    let users = ["33611000001", "33611000002", "33611000003", "33611000004"];
    let text = |c: usize, k: usize| format!("Conversation {c}, message {k}");

    // The first conversation's five messages are all accepted before any other arrives: if
    // conversations waited for each other, it would be answered completely before the others start.
    for k in 1..=5 {
        assert_eq!(app.send_text(users[0], &format!("wamid.IL0-{k}"), &text(0, k)).await, 200);
    }
    for k in 1..=5 {
        for (c, user) in users.iter().enumerate().skip(1) {
            assert_eq!(app.send_text(user, &format!("wamid.IL{c}-{k}"), &text(c, k)).await, 200);
        }
    }

    app.meta().wait_for_sends(20, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = app.meta().sent();
    assert_eq!(sent.len(), 20, "{:?}", app.meta().texts());
    for (c, user) in users.iter().enumerate() {
        let answers: Vec<String> = sent
            .iter()
            .filter(|s| s["to"] == *user)
            .map(|s| s["text"]["body"].as_str().unwrap_or_default().to_owned())
            .collect();
        let expected: Vec<String> = (1..=5).map(|k| answer_to(&text(c, k))).collect();
        assert_eq!(answers, expected, "conversation {c} answered in its order");
    }

    let questions: Vec<String> = app.env.llm.state.requests.lock().unwrap().iter().map(question).collect();
    let last_of_first =
        questions.iter().position(|q| *q == text(0, 5)).expect("the first conversation's last question");
    let others_before: BTreeSet<&str> = questions[..last_of_first]
        .iter()
        .filter_map(|q| q.strip_prefix("Conversation ").and_then(|rest| rest.split(',').next()))
        .filter(|c| *c != "0")
        .collect();
    assert!(
        others_before.len() >= 2,
        "other conversations ran while the first one was still going; the LLM saw, in order: {questions:#?}"
    );
    // And side by side, not merely taking turns: an LLM call started while another was running —
    // never one of the same conversation.
    let mut in_flight: BTreeMap<String, String> = BTreeMap::new();
    let mut most_in_flight = 0;
    for event in app.events.events() {
        let id = event["providerMessageId"].as_str().unwrap_or_default().to_owned();
        let conversation = event["conversationId"].as_str().unwrap_or_default().to_owned();
        match event["event"].as_str() {
            Some("llm_request") => {
                assert!(!in_flight.values().any(|c| *c == conversation), "{id} ran beside its conversation's previous");
                in_flight.insert(id, conversation);
                most_in_flight = most_in_flight.max(in_flight.len());
            }
            Some("llm_request_completed") => {
                in_flight.remove(&id);
            }
            _ => {}
        }
    }
    assert!(most_in_flight >= 2, "the LLM calls never overlapped");
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Worker processes stopped mid-batch

/// A batch of messages across conversations, an api process, one worker process with few jobs in
/// flight, and an LLM slow enough that the batch takes a while.
#[derive(Clone, Copy)]
struct Batch {
    shards: u32,
    conversations: usize,
    per_conversation: usize,
    concurrency: usize,
    llm_delay: Duration,
}

const BATCH: Batch =
    Batch { shards: 4, conversations: 10, per_conversation: 3, concurrency: 4, llm_delay: Duration::from_millis(200) };

fn batch_user(c: usize) -> String {
    format!("336220000{c:02}")
}

fn batch_wamid(c: usize, k: usize) -> String {
    format!("wamid.B{c}-{k}")
}

fn batch_text(c: usize, k: usize) -> String {
    format!("Client {c}, question {k}")
}

impl Batch {
    async fn start(self) -> (Environment, ParleyProcess, ParleyProcess) {
        let (env, api) = self.start_api().await;
        let worker = ParleyProcess::start(&env, "worker").await;
        (env, api, worker)
    }

    /// The environment and `parley api`, without a worker yet.
    async fn start_api(self) -> (Environment, ParleyProcess) {
        let env = Environment::new(&Options {
            extra_env: vec![
                ("WORKER_LEASE_TTL".into(), "3s".into()),
                ("WORKER_CONCURRENCY".into(), self.concurrency.to_string()),
                ("QUEUE_SHARDS".into(), self.shards.to_string()),
            ],
            ..Default::default()
        })
        .await;
        set_llm_delay(&env, self.llm_delay);
        let api = ParleyProcess::start(&env, "api").await;
        (env, api)
    }

    /// Posts the batch, message by message, interleaving the conversations.
    async fn post(self, api: &ParleyProcess) {
        for k in 1..=self.per_conversation {
            for c in 0..self.conversations {
                let body = webhook_body(PHONE_NUMBER_ID, &[(&batch_user(c), &batch_wamid(c, k), &batch_text(c, k))]);
                assert_eq!(post_webhook(&api.base(), &body, None).await.0, 200);
            }
        }
    }

    fn wamids(self) -> BTreeSet<String> {
        (0..self.conversations).flat_map(|c| (1..=self.per_conversation).map(move |k| batch_wamid(c, k))).collect()
    }

    /// Waits until every message has an answer at the fake Meta, then a little more for stray
    /// duplicates; checks that nothing is lost and each conversation's answers (duplicates aside)
    /// came in order, and returns every send.
    async fn every_answer(self, env: &Environment) -> Vec<Value> {
        let all = self.wamids();
        eventually(Duration::from_secs(30), "an answer to every message of the batch", || async {
            let answered: BTreeSet<String> = env.meta.sent().iter().map(quoted).collect();
            all.is_subset(&answered).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        let sent = env.meta.sent();
        let answered: BTreeSet<String> = sent.iter().map(quoted).collect();
        assert_eq!(answered, all, "only the batch's messages are answered");

        for c in 0..self.conversations {
            let mut firsts: Vec<String> = Vec::new();
            for s in sent.iter().filter(|s| s["to"] == batch_user(c).as_str()) {
                let id = quoted(s);
                if !firsts.contains(&id) {
                    firsts.push(id);
                }
            }
            let expected: Vec<String> = (1..=self.per_conversation).map(|k| batch_wamid(c, k)).collect();
            assert_eq!(firsts, expected, "conversation {c} answered out of order");
        }

        let recorded: i64 = sqlx::query_scalar(
            "select count(distinct i.provider_message_id) from messages i join messages o
               on o.in_reply_to = i.provider_message_id and o.direction = 'outbound' and o.status = 'sent'
             where i.direction = 'inbound'",
        )
        .fetch_one(env.store.pool())
        .await
        .unwrap();
        assert_eq!(recorded, all.len() as i64, "every inbound row has its answer recorded as sent");
        sent
    }
}

/// The `providerMessageId`s of the events named `name` in a process's output.
fn ids_of(output: &Captured, name: &str) -> BTreeSet<String> {
    output.named(name).iter().filter_map(|e| e["providerMessageId"].as_str().map(str::to_owned)).collect()
}

/// Each send's inbound message, with the positions of its sends when there are several.
fn duplicates(sent: &[Value]) -> BTreeMap<String, Vec<usize>> {
    let mut times_sent: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, s) in sent.iter().enumerate() {
        times_sent.entry(quoted(s)).or_default().push(i);
    }
    times_sent.into_iter().filter(|(_, at)| at.len() > 1).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_nothing_and_duplicates_only_unrecorded_sends() {
    // Queued before the first worker starts: it is killed with a backlog, however fast it is.
    let (env, api) = BATCH.start_api().await;
    BATCH.post(&api).await;
    let mut first = ParleyProcess::start(&env, "worker").await;
    env.meta.wait_for_sends(4, WAIT).await;
    first.kill().await;
    // Sends the dead worker wrote before dying may still be landing at the fake.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent_by_first = env.meta.sent().len();
    let mut second = ParleyProcess::start(&env, "worker").await;

    let sent = BATCH.every_answer(&env).await;

    // Duplicates: only answers the provider accepted from the dead worker that it never recorded.
    let duplicates = duplicates(&sent);
    let recorded_by_first = ids_of(&first.output, "message_sent");
    println!(
        "{} sends for {} messages; the killed worker's sends: {sent_by_first}, recorded by it: {}; \
         duplicates (send positions): {duplicates:?}",
        sent.len(),
        BATCH.wamids().len(),
        recorded_by_first.len()
    );
    assert!(duplicates.len() <= BATCH.concurrency, "more duplicates than sends in flight: {duplicates:?}");
    for (wamid, at) in &duplicates {
        assert_eq!(at.len(), 2, "{wamid} answered more than twice: {at:?}");
        assert!(at[0] < sent_by_first, "{wamid}'s first answer did not come from the killed worker: {at:?}");
        assert!(!recorded_by_first.contains(wamid), "{wamid} was recorded as sent, yet answered again");
    }
    assert!(!ids_of(&second.output, "message_sent").is_empty(), "the second worker took over");

    second.terminate().await;
    drop(api);
    env.cleanup("redis://127.0.0.1:6379").await;
}

/// SIGTERM to `worker` (without waiting for it to exit).
fn sigterm(worker: &ParleyProcess) {
    let pid = worker.child.id().expect("the worker runs");
    let signalled = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
    assert!(signalled.success());
}

async fn exit_code(worker: &mut ParleyProcess) -> Option<i32> {
    let exit = tokio::time::timeout(Duration::from_secs(20), worker.child.wait()).await;
    exit.expect("the stopped worker exits").unwrap().code()
}

/// A worker told to stop mid-batch while a replacement starts, as in a rolling deploy: it finishes
/// what it started and exits 0; the replacement answers the rest; nothing is answered twice.
async fn rolling_replacement(batch: Batch) {
    // The whole batch is queued before the first worker starts, so that it is stopped with a
    // backlog whatever the speed of the machine (posting while it ran, a fast worker could answer
    // everything before the signal and leave nothing to its replacement).
    let (env, api) = batch.start_api().await;
    batch.post(&api).await;
    let mut first = ParleyProcess::start(&env, "worker").await;
    env.meta.wait_for_sends(2, WAIT).await;
    sigterm(&first);
    let mut second = ParleyProcess::start(&env, "worker").await;

    assert_eq!(exit_code(&mut first).await, Some(0), "{}", first.output.text());
    let started = ids_of(&first.output, "llm_request");
    let finished = ids_of(&first.output, "message_sent");
    assert!(!started.is_empty());
    assert_eq!(started, finished, "every job the stopped worker started, it finished");
    assert!(!first.output.named("worker_stopped").is_empty());

    let sent = batch.every_answer(&env).await;
    assert!(duplicates(&sent).is_empty(), "a graceful stop answers nothing twice: {:?}", duplicates(&sent));
    let by_second = ids_of(&second.output, "message_sent");
    assert!(!by_second.is_empty(), "the rest was answered by the other worker");
    let also_started = ids_of(&second.output, "llm_request");
    assert!(
        also_started.is_disjoint(&started),
        "both workers ran {:?}",
        also_started.intersection(&started).collect::<Vec<_>>()
    );

    second.terminate().await;
    drop(api);
    env.cleanup("redis://127.0.0.1:6379").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_finishes_its_jobs_and_exits_zero_while_another_takes_the_rest() {
    // One shard: a worker reads ahead on every shard it holds, and with four it could have taken
    // the whole batch on before the signal.
    rolling_replacement(Batch { shards: 1, ..BATCH }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_draining_for_longer_than_its_lease_keeps_its_shards_until_done() {
    // Two jobs at a time and eight taken on, 1.5 s each: the drain takes about 6 s, twice the 3 s
    // lease. One shard, so that the stopped worker has not read the whole batch.
    rolling_replacement(Batch {
        shards: 1,
        conversations: 7,
        per_conversation: 2,
        concurrency: 2,
        llm_delay: Duration::from_millis(1500),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_added_mid_batch_takes_its_share_without_answering_anything_twice() {
    let (env, api, mut first) = BATCH.start().await;

    BATCH.post(&api).await;
    env.meta.wait_for_sends(2, WAIT).await;
    let mut second = ParleyProcess::start(&env, "worker").await;

    let sent = BATCH.every_answer(&env).await;
    assert!(duplicates(&sent).is_empty(), "answered twice: {:?}", duplicates(&sent));
    let (by_first, by_second) = (ids_of(&first.output, "llm_request"), ids_of(&second.output, "llm_request"));
    assert!(
        by_first.is_disjoint(&by_second),
        "both workers ran {:?}",
        by_first.intersection(&by_second).collect::<Vec<_>>()
    );
    // The first worker may well have read the whole batch before the second came; the second
    // still gets its share of the shards once the first has finished their jobs.
    second.output.wait_for("shard_acquired", 1, WAIT).await;

    second.terminate().await;
    first.terminate().await;
    drop(api);
    env.cleanup("redis://127.0.0.1:6379").await;
}

// ---------------------------------------------------------------------------------------------
// Live reload

/// A message the streaming task posted.
#[derive(Debug, Clone)]
struct Posted {
    text: String,
    /// Whether `mark` was already in the events before the message was posted.
    after_mark: bool,
}

/// Posts one message every 50 ms, each from a different user, until `after` messages were posted
/// after `mark` held (at most 200).
fn stream_messages(
    base: String,
    events: Captured,
    mark: fn(&Captured) -> bool,
    after: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Posted>> {
    tokio::spawn(async move {
        let mut posted: Vec<Posted> = Vec::new();
        for i in 0..200 {
            if stop.load(Ordering::Relaxed) || posted.iter().filter(|p| p.after_mark).count() >= after {
                break;
            }
            let after_mark = mark(&events);
            let text = format!("Message en flux n°{i}");
            let body = webhook_body(PHONE_NUMBER_ID, &[(&format!("3367{i:07}"), &format!("wamid.FLUX{i}"), &text)]);
            let (status, answer) = post_webhook(&base, &body, None).await;
            assert_eq!(status, 200, "{answer}");
            posted.push(Posted { text, after_mark });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        posted
    })
}

fn generation_two_running(events: &Captured) -> bool {
    events.named("pipeline_reloaded").iter().any(|e| e["generation"] == 2)
}

fn reload_failed(events: &Captured) -> bool {
    !events.named("pipeline_reload_failed").is_empty()
}

/// Every posted message answered exactly once; returns each one's answer.
async fn answers_of(app: &TestApp, posted: &[Posted]) -> Vec<Value> {
    app.meta().wait_for_sends(posted.len(), WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = app.meta().sent();
    let mut by_text: HashMap<String, Vec<Value>> = HashMap::new();
    for s in &sent {
        by_text.entry(s["text"]["body"].as_str().unwrap_or_default().to_owned()).or_default().push(s.clone());
    }
    assert_eq!(sent.len(), posted.len(), "one answer per message: {:?}", app.meta().texts());
    posted
        .iter()
        .map(|p| match by_text.get(&answer_to(&p.text)).map(Vec::as_slice) {
            Some([one]) => one.clone(),
            other => panic!("`{}` answered {:?} time(s)", p.text, other.map(<[Value]>::len)),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_file_saved_while_messages_stream_in_applies_to_later_messages_and_loses_none() {
    let app = TestApp::spawn().await;
    let stop = Arc::new(AtomicBool::new(false));
    let stream = stream_messages(app.base.clone(), app.events.clone(), generation_two_running, 10, stop.clone());

    // Some answers under the first configuration (quoting the message), then the save.
    app.meta().wait_for_sends(5, WAIT).await;
    std::fs::write(&app.env.pipeline_path, shipped_pipeline_with(&[("quote = true", "quote = false")])).unwrap();
    let reloaded = app.events.wait_for("pipeline_reloaded", 2, Duration::from_secs(5)).await;
    let posted = tokio::time::timeout(WAIT, stream).await.expect("the stream ends").unwrap();

    assert_eq!(reloaded[1]["generation"], 2);
    assert_eq!(reloaded[1]["trigger"], "file");
    let answers = answers_of(&app, &posted).await;
    let after: Vec<(&Posted, &Value)> = posted.iter().zip(&answers).filter(|(p, _)| p.after_mark).collect();
    assert!(after.len() >= 10, "{posted:?}");
    for (p, answer) in &after {
        assert!(answer.get("context").is_none(), "`{}` accepted after the reload quoted its message: {answer}", p.text);
    }
    assert!(
        answers[..5].iter().all(|a| a.get("context").is_some()),
        "the first answers followed the first configuration"
    );
    assert!(app.events.named("pipeline_reload_failed").is_empty());
    stop.store(true, Ordering::Relaxed);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_save_while_messages_stream_in_is_refused_and_the_running_pipeline_keeps_serving() {
    let app = TestApp::spawn().await;
    let stop = Arc::new(AtomicBool::new(false));
    let stream = stream_messages(app.base.clone(), app.events.clone(), reload_failed, 10, stop.clone());

    app.meta().wait_for_sends(5, WAIT).await;
    // An invalid value in an otherwise good file: the whole file is refused.
    let invalid = shipped_pipeline_with(&[("quote = true", "quote = \"yes please\"")]);
    std::fs::write(&app.env.pipeline_path, invalid).unwrap();
    let failed = app.events.wait_for("pipeline_reload_failed", 1, Duration::from_secs(5)).await;
    let posted = tokio::time::timeout(WAIT, stream).await.expect("the stream ends").unwrap();

    assert_eq!(failed[0]["generation"], 1, "{}", failed[0]);
    assert!(failed[0]["errors"].to_string().contains("quote"), "the reason names the key: {}", failed[0]);
    let answers = answers_of(&app, &posted).await;
    assert!(posted.iter().filter(|p| p.after_mark).count() >= 10);
    for (p, answer) in posted.iter().zip(&answers) {
        assert!(answer.get("context").is_some(), "`{}` not answered with the running configuration: {answer}", p.text);
    }
    assert!(!generation_two_running(&app.events), "no new generation from an invalid file");
    stop.store(true, Ordering::Relaxed);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Masking

/// Maximal runs of 10 to 15 digits (with a `+` before them, if any) in `text` that are not part of
/// a UUID, a word, the decimals of a number, or a Redis stream entry id (`<13-digit ms
/// timestamp>-<seq>`).
fn long_digit_runs(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let is_hex = |b: u8| b.is_ascii_hexdigit();
    let is_uuid_at = |i: usize| {
        const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
        let mut at = i;
        for (g, len) in GROUPS.iter().enumerate() {
            if at + len > bytes.len() || !bytes[at..at + len].iter().all(|&b| is_hex(b)) {
                return false;
            }
            at += len;
            if g < 4 {
                if bytes.get(at) != Some(&b'-') {
                    return false;
                }
                at += 1;
            }
        }
        true
    };
    // Blank out UUIDs first (their groups may be all digits).
    let mut cleaned = bytes.to_vec();
    let mut i = 0;
    while i < bytes.len() {
        if (i == 0 || !is_hex(bytes[i - 1])) && is_uuid_at(i) {
            cleaned[i..i + 36].fill(b'_');
            i += 36;
        } else {
            i += 1;
        }
    }
    let mut runs = Vec::new();
    let mut i = 0;
    while i < cleaned.len() {
        if !cleaned[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < cleaned.len() && cleaned[i].is_ascii_digit() {
            i += 1;
        }
        let len = i - start;
        let stream_id =
            len == 13 && cleaned.get(i) == Some(&b'-') && cleaned.get(i + 1).is_some_and(u8::is_ascii_digit);
        let in_word = (start > 0 && cleaned[start - 1].is_ascii_alphabetic())
            || cleaned.get(i).is_some_and(u8::is_ascii_alphabetic);
        let decimals = start > 0 && cleaned[start - 1] == b'.';
        if (10..=15).contains(&len) && !stream_id && !in_word && !decimals {
            let plus = start > 0 && cleaned[start - 1] == b'+';
            runs.push(format!("{}{}", if plus { "+" } else { "" }, String::from_utf8_lossy(&cleaned[start..i])));
        }
    }
    runs
}

#[test]
fn the_digit_run_search_finds_numbers_and_skips_ids() {
    let line = r#"{"from":"+33612345678","jobId":"stream:0:1733055600000-0","id":"01234567-0123-0123-0123-012345678901","to":"336XXXXXX78","n":123456789,"ms":7.126602999999999}"#;
    assert_eq!(long_digit_runs(line), ["+33612345678"]);
    assert_eq!(long_digit_runs("mon numéro est 0611223344."), ["0611223344"]);
}

/// Neither the numbers nor anything shaped like one appear in `output`.
fn assert_no_number_unmasked(output: &str, numbers: &[&str]) {
    assert!(output.contains("XXXX"), "masked numbers are logged: the search looks at the right output");
    for number in numbers {
        // The whole number, and its national part (`0612345678` / `612345678`) as well.
        let national = &number[2..];
        let leaks: Vec<&str> = output.lines().filter(|l| l.contains(national)).collect();
        assert!(leaks.is_empty(), "{number} appears unmasked in {} line(s):\n{}", leaks.len(), leaks.join("\n"));
    }
    let runs: Vec<(String, &str)> =
        output.lines().flat_map(|l| long_digit_runs(l).into_iter().map(move |r| (r, l))).collect();
    assert!(runs.is_empty(), "digit runs that look like phone numbers in the logs:\n{runs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_test_phone_number_appears_unmasked_in_the_logs() {
    let env = Environment::new(&Options::default()).await;
    let mut parley = ParleyProcess::start(&env, "serve").await;
    let base = parley.base();
    let in_text = "33611223344";
    let failing_user = "33655443322";

    let messages: [(&str, &str, String); 3] = [
        (USER, "wamid.MASK1", "Bonjour, pouvez-vous m'aider ?".to_owned()),
        (OTHER_USER, "wamid.MASK2", "Salut".to_owned()),
        (USER, "wamid.MASK3", format!("mon numéro est +{in_text}, rappelez-moi")),
    ];
    for (from, wamid, text) in &messages {
        assert_eq!(post_webhook(&base, &webhook_body(PHONE_NUMBER_ID, &[(from, wamid, text)]), None).await.0, 200);
    }
    env.meta.wait_for_sends(3, WAIT).await;
    // The other paths that handle a number: a duplicate delivery, a delivery status, a media
    // message whose file cannot be fetched, and a send the provider refuses for good.
    let duplicate = webhook_body(PHONE_NUMBER_ID, &[(USER, "wamid.MASK1", "Bonjour, pouvez-vous m'aider ?")]);
    assert_eq!(post_webhook(&base, &duplicate, None).await.0, 200);
    let sent_id = eventually(WAIT, "the first answer recorded", || async {
        parley.output.named("message_sent").first().and_then(|e| e["sentMessageId"].as_str().map(str::to_owned))
    })
    .await;
    let status = support::status_body(PHONE_NUMBER_ID, &[(&sent_id, "delivered")]);
    assert_eq!(post_webhook(&base, &status, None).await.0, 200);
    let mut audio: Value =
        serde_json::from_str(&webhook_body(PHONE_NUMBER_ID, &[(OTHER_USER, "wamid.MASK4", "")])).unwrap();
    let message = &mut audio["entry"][0]["changes"][0]["value"]["messages"][0];
    message["type"] = "audio".into();
    message["audio"] = serde_json::json!({"id": "MEDIA", "mime_type": "audio/ogg"});
    assert_eq!(post_webhook(&base, &audio.to_string(), None).await.0, 200);
    env.meta.fail_with(Some((400, 131_026)));
    let refused = webhook_body(PHONE_NUMBER_ID, &[(failing_user, "wamid.MASK5", "Un message qui échouera")]);
    assert_eq!(post_webhook(&base, &refused, None).await.0, 200);

    for (name, wamid) in [
        ("duplicate_message_dropped", "wamid.MASK1"),
        ("media_fetch_failed", "wamid.MASK4"),
        ("send_failed", "wamid.MASK5"),
    ] {
        eventually(WAIT, &format!("`{name}` for {wamid}"), || async {
            parley.output.named(name).iter().any(|e| e["providerMessageId"] == wamid).then_some(())
        })
        .await;
    }
    parley.output.wait_for("status_updated", 1, WAIT).await;
    parley.terminate().await;

    assert_no_number_unmasked(&parley.output.text(), &[USER, OTHER_USER, in_text, failing_user]);
    env.cleanup("redis://127.0.0.1:6379").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_replies_printed_in_development_mask_the_numbers_they_quote() {
    let env = Environment::new(&Options {
        extra_env: vec![("WHATSAPP_PROVIDER".into(), "sandbox".into()), ("LOG_LEVEL".into(), "trace".into())],
        ..Default::default()
    })
    .await;
    let mut parley = ParleyProcess::start(&env, "serve").await;
    let (international, national) = ("33611223344", "0611223344");
    let text = format!("mon numéro est +{international}, ou le {national}");

    let body = webhook_body(PHONE_NUMBER_ID, &[(USER, "wamid.SBX1", &text)]);
    assert_eq!(post_webhook(&parley.base(), &body, None).await.0, 200);

    let printed = parley.output.wait_for("sandbox_reply", 1, WAIT).await;
    parley.terminate().await;
    // The fake LLM quoted the question, numbers included: the printed reply carries them masked.
    let reply = printed[0]["text"].as_str().unwrap_or_default();
    assert!(reply.starts_with("Réponse à « mon numéro est +336"), "{reply}");
    assert!(env.meta.sent().is_empty(), "the sandbox calls no one");
    assert_no_number_unmasked(&parley.output.text(), &[USER, international, national]);
    env.cleanup("redis://127.0.0.1:6379").await;
}
