//! The engine runs stages in order and applies each one's failure policy and timeout.

mod support;

use engine::{events::names, runtime::Outcome, stage::StageError, testing::TestBench};
use support::labels_of;

#[tokio::test]
async fn a_failing_open_stage_is_skipped_logged_and_marks_the_message_degraded() {
    let bench = TestBench::new();
    bench.kv.set_failing(true);
    let pipeline = bench.pipeline(
        r#"
[[stages]]
kind = "probe"
id = "guard"
label = "guard"
use_kv = true
on_error = "open"

[[stages]]
kind = "probe"
id = "answer"
label = "answer"

[[stages]]
kind = "send"
"#,
    );
    let mut msg = bench.message("Bonjour");
    let outcome = bench.run(&pipeline, &mut msg).await;

    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(bench.sender.sent_texts(), vec!["answer via answer"]);
    assert!(msg.is_degraded());
    assert_eq!(msg.degraded[0].stage, "guard");
    let failed = bench.events.named(names::STAGE_FAILED_OPEN);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].field("stage").unwrap(), "guard");
    assert_eq!(failed[0].field("kind").unwrap(), "probe");
    assert!(failed[0].field("error").unwrap().as_str().unwrap().contains("redis"));
    assert_eq!(failed[0].field("jobId").unwrap(), msg.job.id.as_str());
}

#[tokio::test]
async fn a_failing_closed_stage_fails_the_job_and_stops_the_pipeline() {
    let bench = TestBench::new();
    bench.kv.set_failing(true);
    let pipeline = bench.pipeline(
        r#"
[[stages]]
kind = "probe"
id = "guard"
label = "guard"
use_kv = true
on_error = "closed"

[[stages]]
kind = "probe"
id = "after"
label = "after"

[[stages]]
kind = "send"
"#,
    );
    let mut msg = bench.message("Bonjour");
    let outcome = bench.run(&pipeline, &mut msg).await;

    match outcome {
        Outcome::Failed { stage, retryable, error: StageError::Port(_), .. } => {
            assert_eq!(stage, "guard");
            assert!(retryable);
        }
        other => panic!("expected a failed job, got {other:?}"),
    }
    assert_eq!(labels_of(msg.job.id.as_str()), vec!["guard"]);
    assert!(bench.sender.sent().is_empty());
    assert_eq!(bench.events.count(names::STAGE_FAILED_OPEN), 0);
}

#[tokio::test]
async fn a_stage_that_overruns_its_timeout_fails_under_its_policy() {
    let bench = TestBench::new();
    let pipeline = bench.pipeline(
        r#"
[[stages]]
kind = "probe"
id = "slow"
label = "slow"
sleep = "2s"
timeout = "50ms"
on_error = "closed"

[[stages]]
kind = "send"
"#,
    );
    let mut msg = bench.message("Bonjour");
    match bench.run(&pipeline, &mut msg).await {
        Outcome::Failed { stage, error: StageError::Timeout(d), .. } => {
            assert_eq!(stage, "slow");
            assert_eq!(d.as_millis(), 50);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }

    let open = bench.pipeline(
        r#"
[[stages]]
kind = "probe"
id = "slow"
label = "slow"
sleep = "2s"
timeout = "50ms"

[[stages]]
kind = "probe"
id = "answer"
label = "answer"

[[stages]]
kind = "send"
"#,
    );
    let mut msg = bench.message("Bonjour");
    assert_eq!(bench.run(&open, &mut msg).await, Outcome::Completed);
    assert!(msg.degraded[0].error.contains("timed out after 50ms"));
    assert_eq!(bench.sender.sent_texts(), vec!["answer via answer"]);
}

#[tokio::test]
async fn a_reply_skips_to_the_last_stage_which_delivers_it() {
    let bench = TestBench::new();
    let pipeline = bench.pipeline(
        r#"
[[stages]]
kind = "probe"
id = "gate"
label = "gate"
decision = "reply"

[[stages]]
kind = "probe"
id = "llm-like"
label = "llm-like"

[[stages]]
kind = "send"
"#,
    );
    let mut msg = bench.message("Bonjour");
    let outcome = bench.run(&pipeline, &mut msg).await;

    assert_eq!(outcome, Outcome::Replied { stage: "gate".into() });
    assert_eq!(labels_of(msg.job.id.as_str()), vec!["gate"], "the stage after the reply must not run");
    assert_eq!(bench.sender.sent_texts(), vec!["notice from gate"]);
}

#[tokio::test]
async fn a_drop_stops_everything_and_sends_nothing() {
    let bench = TestBench::new();
    let pipeline = bench.pipeline(
        r#"
[[stages]]
kind = "probe"
id = "gate"
label = "gate"
decision = "drop"

[[stages]]
kind = "probe"
id = "answer"
label = "answer"

[[stages]]
kind = "send"
"#,
    );
    let mut msg = bench.message("Bonjour");
    let outcome = bench.run(&pipeline, &mut msg).await;

    assert_eq!(outcome, Outcome::Dropped { stage: "gate".into(), reason: "dropped by gate".into() });
    assert_eq!(labels_of(msg.job.id.as_str()), vec!["gate"]);
    assert!(bench.sender.sent().is_empty());
}

#[tokio::test]
async fn tiers_get_their_own_pipeline_and_unknown_tiers_the_base_one() {
    let bench = TestBench::new();
    let generation = bench.generation(
        r#"
[[stages]]
kind = "probe"
id = "a"
label = "base-a"

[[stages]]
kind = "send"

[tiers.gold]
stages.a.label = "gold-a"

[tiers.lite]
remove = ["a"]
"#,
    );
    assert_eq!(generation.pipeline(Some("gold")).stage_ids(), vec!["a", "send"]);
    assert_eq!(generation.pipeline(Some("lite")).stage_ids(), vec!["send"]);
    assert_eq!(generation.pipeline(Some("nope")).stage_ids(), vec!["a", "send"]);

    let mut msg = bench.message("x");
    msg.tenant.tier = Some("gold".into());
    let p = generation.pipeline(msg.tenant.tier.as_deref()).clone();
    bench.run(&p, &mut msg).await;
    assert_eq!(labels_of(msg.job.id.as_str()), vec!["gold-a"]);
}
