//! `parley simulate` against a running `parley serve` with the embedded defaults (sandbox sender,
//! local LLM): the README's promise that a fresh install answers.

mod support;

use std::time::Duration;

use support::{Environment, Options, PHONE_NUMBER_ID, ParleyProcess};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_prints_the_answer_of_a_running_parley() {
    let options = Options {
        extra_env: vec![
            ("WHATSAPP_PROVIDER".into(), "sandbox".into()),
            ("LLM_PROVIDER".into(), "local".into()),
            ("LOG_LEVEL".into(), "info".into()),
        ],
        ..Default::default()
    };
    let env = Environment::new(&options).await;
    let mut serve = ParleyProcess::start(&env, "serve").await;

    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"));
    cmd.args(["simulate", "Bonjour", "--phone-number-id", PHONE_NUMBER_ID, "--timeout", "20s", "--url"])
        .arg(format!("{}/api/v1/whatsapp/webhook", serve.base()))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in &env.vars {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(40), cmd.output()).await.expect("simulate finishes").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "simulate failed: {}\n{}", String::from_utf8_lossy(&out.stderr), serve.output.text());
    assert!(stdout.contains("Bonjour"), "the local assistant greets back: {stdout}");
    assert!(serve.output.text().contains("\"event\":\"sandbox_reply\""));

    assert_eq!(serve.terminate().await.and_then(|s| s.code()), Some(0), "SIGTERM stops parley cleanly");
    env.cleanup(&options.redis_url).await;
}

/// Issue 4's acceptance: with the embedded defaults, `parley seed` then `parley simulate` with a
/// question of the sample knowledge base prints an answer quoting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_then_simulate_answers_a_question_from_the_sample_knowledge() {
    let knowledge_dir = tempfile::tempdir().unwrap();
    let options = Options {
        extra_env: vec![
            ("WHATSAPP_PROVIDER".into(), "sandbox".into()),
            ("LLM_PROVIDER".into(), "local".into()),
            ("EMBEDDING_PROVIDER".into(), "hash".into()),
            ("KNOWLEDGE_DIR".into(), knowledge_dir.path().display().to_string()),
            ("LOG_LEVEL".into(), "info".into()),
        ],
        ..Default::default()
    };
    let env = Environment::new(&options).await;
    let parley = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"));
        cmd.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &env.vars {
            cmd.env(k, v);
        }
        cmd
    };

    let seeded = tokio::time::timeout(Duration::from_secs(60), parley(&["seed"]).output())
        .await
        .expect("seed finishes")
        .unwrap();
    assert!(seeded.status.success(), "parley seed failed: {}", String::from_utf8_lossy(&seeded.stderr));
    let mut serve = ParleyProcess::start(&env, "serve").await;
    let url = format!("{}/api/v1/whatsapp/webhook", serve.base());
    let out = tokio::time::timeout(
        Duration::from_secs(40),
        parley(&["simulate", "Combien coûte la livraison ?", "--timeout", "20s", "--url", &url]).output(),
    )
    .await
    .expect("simulate finishes")
    .unwrap();

    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "simulate failed: {}\n{}", String::from_utf8_lossy(&out.stderr), serve.output.text());
    assert!(stdout.contains("La livraison à domicile coûte 4,90 euros"), "the answer quotes the sample: {stdout}");
    assert_eq!(serve.terminate().await.and_then(|s| s.code()), Some(0));
    env.cleanup(&options.redis_url).await;
}
