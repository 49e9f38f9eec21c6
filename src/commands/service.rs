//! `parley serve`, `api` and `worker`: the long-running roles.

use std::{net::SocketAddr, process::ExitCode};

use parley::{
    app::{self, App, Role},
    settings::Settings,
    telemetry,
};

pub fn run(role: Role) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // TOKIO_WORKER_THREADS, read by tokio, wins over Parley's choice.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(app::runtime_threads(&settings, role));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let events = telemetry::init(&settings);
        let bind = SocketAddr::new(settings.host, settings.port);
        let app = match App::build(settings, events).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("parley: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let worker_id = format!("{}-{}", hostname(), std::process::id());
        let running = match app::start(app, role, bind, worker_id).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("parley: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(addr) = running.addr {
            eprintln!("parley: listening on http://{addr} (webhook: POST /api/v1/whatsapp/webhook)");
        }
        app::termination().await;
        eprintln!("parley: stopping (finishing jobs in flight)");
        running.stop().await;
        ExitCode::SUCCESS
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "parley".into())
}
