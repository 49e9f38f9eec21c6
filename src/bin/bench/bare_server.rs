//! The reference the webhook is measured against: a poem server that reads each request's body and
//! answers 200 with Parley's body, nothing else. The benchmark starts it as a process of its own
//! (`parley-bench bare-server`), on poem's default multi-threaded runtime; it prints its address on
//! its first line of output. `--current-thread` serves on a single-threaded runtime instead (the
//! cheapest layout, for the `floor` scenario).

use std::{io::Write, process::ExitCode};

use poem::{
    Request, Response, Server,
    listener::{Acceptor, Listener, TcpListener},
};

pub fn run(current_thread: bool) -> ExitCode {
    let mut builder = if current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bare-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let acceptor = match TcpListener::bind("127.0.0.1:0").into_acceptor().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("bare-server: cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        };
        let Some(addr) = acceptor.local_addr().first().and_then(|a| a.as_socket_addr().copied()) else {
            eprintln!("bare-server: the listener has no TCP address");
            return ExitCode::FAILURE;
        };
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening {addr}");
        let _ = out.flush();
        let endpoint = poem::endpoint::make(|req: Request| async move {
            let _ = req.into_body().into_bytes().await;
            Response::builder().content_type("application/json").body(r#"{"status":"ok"}"#)
        });
        match Server::new_with_acceptor(acceptor).run(endpoint).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bare-server: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
