//! The fake providers of the end-to-end runs, real HTTP servers on loopback inside the benchmark
//! process: a Meta Cloud API that notes when each reply arrives (keyed by the user message it
//! quotes), and an OpenAI-compatible LLM that answers every completion after a fixed delay.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use poem::{
    Body, Request, Response, Server,
    http::StatusCode,
    listener::{Acceptor, Listener, TcpListener},
};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
#[error("cannot start the fake {what} server: {source}")]
pub struct FakeServerError {
    what: &'static str,
    source: std::io::Error,
}

/// What the fake LLM answers, and so the text of every reply that is an answer (anything else
/// the fake Meta API receives is a notice: rate limit, quota).
pub const LLM_ANSWER: &str =
    "Bonjour ! Nous sommes ouverts du lundi au samedi, de 9 h à 19 h. Puis-je vous aider pour autre chose ?";

/// Sends that are not what a clean run sends.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetaAnomalies {
    /// Replies quoting a message already answered.
    pub duplicates: usize,
    /// Sends quoting nothing (every reply quotes its message).
    pub unquoted: usize,
    /// Sends whose text is not the LLM's answer: notices.
    pub notices: usize,
}

/// What the fake Meta API has seen.
#[derive(Default)]
struct MetaLog {
    /// When the reply quoting each user message (`context.message_id`) arrived, first one only.
    replies: HashMap<String, Instant>,
    anomalies: MetaAnomalies,
}

pub struct FakeMeta {
    pub addr: SocketAddr,
    log: Arc<Mutex<MetaLog>>,
    task: JoinHandle<()>,
}

impl FakeMeta {
    pub async fn start() -> Result<Self, FakeServerError> {
        let log = Arc::new(Mutex::new(MetaLog::default()));
        let seen = log.clone();
        let sent = Arc::new(AtomicUsize::new(0));
        let endpoint = poem::endpoint::make(move |req: Request| {
            let (seen, sent) = (seen.clone(), sent.clone());
            async move {
                let arrived = Instant::now();
                let bytes = req.into_body().into_bytes().await.unwrap_or_default();
                let body = serde_json::from_slice::<Value>(&bytes).unwrap_or_default();
                let quoted = body.pointer("/context/message_id").and_then(Value::as_str).map(str::to_owned);
                let answer = body.pointer("/text/body").and_then(Value::as_str) == Some(LLM_ANSWER);
                {
                    let mut log = seen.lock().unwrap_or_else(|p| p.into_inner());
                    if !answer {
                        log.anomalies.notices += 1;
                    }
                    match quoted {
                        Some(wamid) if log.replies.contains_key(&wamid) => log.anomalies.duplicates += 1,
                        Some(wamid) => {
                            log.replies.insert(wamid, arrived);
                        }
                        None => log.anomalies.unquoted += 1,
                    }
                }
                let n = sent.fetch_add(1, Ordering::Relaxed);
                json_response(json!({
                    "messaging_product": "whatsapp",
                    "contacts": [{ "input": "bench", "wa_id": "bench" }],
                    "messages": [{ "id": format!("wamid.bench-out-{n}") }]
                }))
            }
        });
        let (addr, task) = serve("Meta", endpoint).await?;
        Ok(Self { addr, log, task })
    }

    /// The base URL Parley is given (`WHATSAPP_API_URL`).
    pub fn api_url(&self) -> String {
        format!("http://{}/v21.0", self.addr)
    }

    /// When the reply to each of `wamids` arrived (`None`: not yet).
    pub fn reply_times(&self, wamids: &[String]) -> Vec<Option<Instant>> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        wamids.iter().map(|w| log.replies.get(w).copied()).collect()
    }

    pub fn anomalies(&self) -> MetaAnomalies {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).anomalies
    }

    /// Waits until every one of `wamids` has its reply, or `timeout`; returns how many have.
    pub async fn wait_for(&self, wamids: &[String], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let answered = self.reply_times(wamids).iter().filter(|t| t.is_some()).count();
            if answered == wamids.len() || Instant::now() >= deadline {
                return answered;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for FakeMeta {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct FakeLlm {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl FakeLlm {
    /// Answers every `POST …/chat/completions` after `delay`, many at once.
    pub async fn start(delay: Duration) -> Result<Self, FakeServerError> {
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let endpoint = poem::endpoint::make(move |req: Request| {
            let counter = counter.clone();
            async move {
                // The prompt is read in full, as a real server would, then ignored.
                let _ = req.into_body().into_bytes().await;
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                json_response(json!({
                    "id": "chatcmpl-bench",
                    "object": "chat.completion",
                    "model": "bench-model",
                    "choices": [{
                        "index": 0,
                        "message": { "role": "assistant", "content": LLM_ANSWER },
                        "finish_reason": "stop"
                    }],
                    "usage": { "prompt_tokens": 250, "completion_tokens": 30, "total_tokens": 280 }
                }))
            }
        });
        let (addr, task) = serve("LLM", endpoint).await?;
        Ok(Self { addr, requests, task })
    }

    /// The base URL Parley is given (`LLM_BASE_URL`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json_response(value: Value) -> Response {
    Response::builder().status(StatusCode::OK).content_type("application/json").body(Body::from(value.to_string()))
}

async fn serve<E>(what: &'static str, endpoint: E) -> Result<(SocketAddr, JoinHandle<()>), FakeServerError>
where
    E: poem::Endpoint + 'static,
{
    let acceptor =
        TcpListener::bind("127.0.0.1:0").into_acceptor().await.map_err(|source| FakeServerError { what, source })?;
    let addr = acceptor
        .local_addr()
        .first()
        .and_then(|a| a.as_socket_addr().copied())
        .ok_or_else(|| FakeServerError { what, source: std::io::Error::other("the listener has no TCP address") })?;
    let task = tokio::spawn(async move {
        let _ = Server::new_with_acceptor(acceptor).run(endpoint).await;
    });
    Ok((addr, task))
}
