//! Hot reload: all-or-nothing swaps, no-op on identical content, reuse of unchanged stages, and
//! jobs that finish on the generation they started with.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use engine::{
    events::names,
    reload::{ReloadOutcome, Reloader},
    runtime::Outcome,
    testing::TestBench,
};
use support::labels_of;

fn pipeline(a: &str, b: &str) -> String {
    format!(
        r#"
[[stages]]
kind = "probe"
id = "a"
label = "{a}"

[[stages]]
kind = "probe"
id = "b"
label = "{b}"

[[stages]]
kind = "send"
"#
    )
}

struct Setup {
    bench: TestBench,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    reloader: Arc<Reloader>,
}

fn setup(content: &str) -> Setup {
    let bench = TestBench::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("whatsapp.toml");
    std::fs::write(&path, content).unwrap();
    let reloader = Arc::new(Reloader::start(&path, bench.resources()).unwrap());
    Setup { bench, _dir: dir, path, reloader }
}

#[tokio::test]
async fn an_invalid_file_keeps_the_old_generation_serving() {
    let s = setup(&pipeline("a1", "b1"));
    std::fs::write(&s.path, "[[stages]]\nkind = \"probe\"\nlabell = \"typo\"\n\n[[stages]]\nkind = \"send\"\n")
        .unwrap();

    let err = s.reloader.reload("test").await.unwrap_err();

    assert!(err.to_string().contains("unknown key `labell`"), "{err}");
    assert_eq!(s.reloader.runtime().generation(), 1);
    let failed = s.bench.events.named(names::PIPELINE_RELOAD_FAILED);
    assert_eq!(failed.len(), 1);
    assert!(failed[0].field("errors").unwrap().to_string().contains("labell"));
    assert_eq!(failed[0].field("generation").unwrap(), 1);

    let snapshot = s.reloader.runtime().snapshot();
    let mut msg = s.bench.message("x");
    snapshot.pipeline(None).run(&mut msg, &s.bench.events, snapshot.number).await;
    assert_eq!(labels_of(msg.job.id.as_str()), vec!["a1", "b1"]);
}

#[tokio::test]
async fn a_stage_that_fails_to_build_keeps_the_old_generation() {
    let s = setup(&pipeline("a1", "b1"));
    std::fs::write(&s.path, pipeline("a1", "unbuildable")).unwrap();
    let err = s.reloader.reload("test").await.unwrap_err();
    assert!(err.to_string().contains("refuses to build"), "{err}");
    assert_eq!(s.reloader.runtime().generation(), 1);
}

#[tokio::test]
async fn identical_content_is_a_no_op() {
    let s = setup(&pipeline("a1", "b1"));
    let before = s.bench.events.count(names::PIPELINE_RELOADED);
    let outcome = s.reloader.reload("test").await.unwrap();
    assert_eq!(outcome, ReloadOutcome::Unchanged { generation: 1 });
    assert_eq!(s.bench.events.count(names::PIPELINE_RELOADED), before);
}

#[tokio::test]
async fn unchanged_stage_instances_are_reused() {
    let s = setup(&pipeline("a1", "b1"));
    let old = s.reloader.runtime().snapshot();
    std::fs::write(&s.path, pipeline("a1", "b2")).unwrap();

    let outcome = s.reloader.reload("test").await.unwrap();

    assert_eq!(outcome, ReloadOutcome::Reloaded { generation: 2, stages_reused: 2, stages_built: 1 });
    let new = s.reloader.runtime().snapshot();
    let (old_a, new_a) = (&old.pipeline(None).stages[0], &new.pipeline(None).stages[0]);
    assert!(Arc::ptr_eq(&old_a.stage, &new_a.stage), "stage `a` did not change and must be reused");
    assert!(!Arc::ptr_eq(&old.pipeline(None).stages[1].stage, &new.pipeline(None).stages[1].stage));
    let reloaded = s.bench.events.named(names::PIPELINE_RELOADED);
    let last = reloaded.last().unwrap();
    assert_eq!(last.field("generation").unwrap(), 2);
    assert_eq!(last.field("stagesReused").unwrap(), 2);
}

#[tokio::test]
async fn a_job_in_flight_finishes_on_the_generation_it_started_with() {
    let slow = |b: &str| {
        format!(
            "[[stages]]\nkind = \"probe\"\nid = \"a\"\nlabel = \"{b}-a\"\nsleep = \"300ms\"\n\n[[stages]]\nkind = \"probe\"\nid = \"b\"\nlabel = \"{b}-b\"\n\n[[stages]]\nkind = \"send\"\n"
        )
    };
    let s = setup(&slow("g1"));
    let snapshot = s.reloader.runtime().snapshot();
    let mut msg = s.bench.message("in flight");
    let job = msg.job.id.to_string();
    let events = s.bench.events.clone();
    let running = tokio::spawn(async move { snapshot.pipeline(None).run(&mut msg, &events, snapshot.number).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(&s.path, slow("g2")).unwrap();
    s.reloader.reload("test").await.unwrap();
    assert_eq!(s.reloader.runtime().generation(), 2);

    assert_eq!(running.await.unwrap(), Outcome::Completed);
    assert_eq!(labels_of(&job), vec!["g1-a", "g1-b"], "the running job must not see the new stages");

    let next = s.reloader.runtime().snapshot();
    let mut msg = s.bench.message("after");
    next.pipeline(None).run(&mut msg, &s.bench.events, next.number).await;
    assert_eq!(labels_of(msg.job.id.as_str()), vec!["g2-a", "g2-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_processed_during_repeated_reloads_are_neither_lost_nor_mixed() {
    let s = setup(&pipeline("v0-a", "v0-b"));
    let stop = Arc::new(AtomicBool::new(false));
    let reloads = {
        let (reloader, path, stop) = (s.reloader.clone(), s.path.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                // Every third write is broken: it must be refused without disturbing anything.
                let text = if n.is_multiple_of(3) {
                    "[[stages]]\nkind = \"nope\"\n".to_owned()
                } else {
                    pipeline(&format!("v{n}-a"), &format!("v{n}-b"))
                };
                std::fs::write(&path, text).unwrap();
                let _ = reloader.reload("test").await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };

    let mut jobs = Vec::new();
    for i in 0..400 {
        let runtime = s.reloader.runtime().clone();
        let events = s.bench.events.clone();
        let mut msg = s.bench.message(&format!("message {i}"));
        jobs.push(tokio::spawn(async move {
            let snapshot = runtime.snapshot();
            let outcome = snapshot.pipeline(None).run(&mut msg, &events, snapshot.number).await;
            (msg.job.id.to_string(), outcome)
        }));
        if i % 40 == 0 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    let mut done = Vec::new();
    for job in jobs {
        done.push(job.await.unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    let writes = reloads.await.unwrap();

    assert!(writes >= 3, "the test must actually reload while jobs run");
    assert_eq!(done.len(), 400);
    assert_eq!(s.bench.sender.sent().len(), 400, "every message is answered exactly once");
    for (job, outcome) in &done {
        assert_eq!(*outcome, Outcome::Completed);
        let labels = labels_of(job);
        assert_eq!(labels.len(), 2, "job {job} ran {labels:?}");
        let version = |l: &str| l.split('-').next().unwrap().to_owned();
        assert_eq!(version(&labels[0]), version(&labels[1]), "job {job} ran stages of two generations: {labels:?}");
    }
    assert!(s.bench.events.count(names::PIPELINE_RELOAD_FAILED) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saving_the_file_reloads_it() {
    let s = setup(&pipeline("a1", "b1"));
    let _watch = s.reloader.watch(Duration::from_millis(100)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(&s.path, pipeline("a1", "b-saved")).unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while s.reloader.runtime().generation() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the saved file was not picked up within 2 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = s.bench.events.named(names::PIPELINE_RELOADED).pop().unwrap();
    assert_eq!(last.field("trigger").unwrap(), "file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_by_rename_is_reloaded_too() {
    let s = setup(&pipeline("a1", "b1"));
    let _watch = s.reloader.watch(Duration::from_millis(100)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let tmp = s.path.with_extension("toml.tmp");
    std::fs::write(&tmp, pipeline("a1", "b-renamed")).unwrap();
    std::fs::rename(&tmp, &s.path).unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while s.reloader.runtime().generation() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the renamed file was not picked up within 2 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
