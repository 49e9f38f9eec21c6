//! A fake provider for the clients' tests: a real HTTP server on loopback (port 0) that records every
//! request it receives and answers each with a canned reply (the same one, or the next of a list).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use poem::{
    Body, Request, Response, Server,
    http::StatusCode,
    listener::{Acceptor, Listener, TcpListener},
};
use serde_json::Value;
use tokio::task::JoinHandle;
use url::Url;

/// What the fake server answers.
#[derive(Debug, Clone)]
pub enum FakeReply {
    Json(u16, Value),
    Text(u16, String),
    /// Never answers: for client timeouts.
    Hang,
}

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The body as JSON, `Null` when it is not JSON.
    pub body: Value,
    /// The body as text (form-encoded bodies, for instance).
    pub raw: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

pub struct FakeServer {
    /// `http://127.0.0.1:<port>`, no trailing path.
    pub url: Url,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl FakeServer {
    pub async fn start(reply: FakeReply) -> Self {
        Self::start_sequence(vec![reply]).await
    }

    /// Answers the n-th request with `replies[n]`, and every request after the last with the last.
    pub async fn start_sequence(replies: Vec<FakeReply>) -> Self {
        assert!(!replies.is_empty(), "at least one reply");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let replies = Arc::new(replies);
        let endpoint = poem::endpoint::make(move |req: Request| {
            let seen = seen.clone();
            let replies = replies.clone();
            async move {
                let method = req.method().to_string();
                let path = req.uri().path().to_owned();
                let headers = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
                    .collect();
                let bytes = req.into_body().into_bytes().await.unwrap_or_default();
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let raw = String::from_utf8_lossy(&bytes).into_owned();
                let reply = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(Recorded { method, path, headers, body, raw });
                    replies[(seen.len() - 1).min(replies.len() - 1)].clone()
                };
                match reply {
                    FakeReply::Json(status, json) => Response::builder()
                        .status(StatusCode::from_u16(status).unwrap())
                        .content_type("application/json")
                        .body(Body::from_json(json).unwrap()),
                    FakeReply::Text(status, text) => Response::builder()
                        .status(StatusCode::from_u16(status).unwrap())
                        .content_type("text/html")
                        .body(text),
                    FakeReply::Hang => std::future::pending().await,
                }
            }
        });
        let acceptor = TcpListener::bind("127.0.0.1:0").into_acceptor().await.expect("bind loopback");
        let addr = *acceptor.local_addr()[0].as_socket_addr().expect("a TCP address");
        let task = tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor).run(endpoint).await;
        });
        let url = Url::parse(&format!("http://{addr}")).expect("loopback URL");
        Self { url, requests, task }
    }

    /// The server's URL with `path` appended, as a provider's base URL (`/v21.0`, `/v1`).
    pub fn base(&self, path: &str) -> Url {
        self.url.join(path).expect("base URL")
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// The one request received; fails the test if there were none or several.
    pub fn only_request(&self) -> Recorded {
        let all = self.requests();
        assert_eq!(all.len(), 1, "expected exactly one request, got {all:?}");
        all.into_iter().next().unwrap()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback URL where nothing listens: connecting is refused at once, before any request is
/// sent. The port was free a moment ago (bound then released).
pub fn refusing_url() -> Url {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    drop(listener);
    Url::parse(&format!("http://{addr}")).expect("loopback URL")
}
