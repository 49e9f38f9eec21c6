//! SIGHUP reloads the pipeline. Alone in its own test binary: the signal goes to the whole process.

mod support;

use std::{sync::Arc, time::Duration};

use engine::{events::names, reload::Reloader, testing::TestBench};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_pipeline() {
    let bench = TestBench::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("whatsapp.toml");
    let file =
        |label: &str| format!("[[stages]]\nkind = \"probe\"\nlabel = \"{label}\"\n\n[[stages]]\nkind = \"send\"\n");
    std::fs::write(&path, file("one")).unwrap();
    let reloader = Arc::new(Reloader::start(&path, bench.resources()).unwrap());
    let _handler = reloader.reload_on_sighup().unwrap();

    std::fs::write(&path, file("two")).unwrap();
    let status = std::process::Command::new("kill").arg("-HUP").arg(std::process::id().to_string()).status().unwrap();
    assert!(status.success());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while reloader.runtime().generation() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "SIGHUP did not reload the pipeline");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(bench.events.named(names::PIPELINE_RELOADED).last().unwrap().field("trigger").unwrap(), "sighup");
}
