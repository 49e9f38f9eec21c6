//! The per-IP rate limit of the admin API (RATE_LIMIT_MAX requests per RATE_LIMIT_WINDOW): an
//! in-process fixed window, keyed by the peer address. Never applied to the webhook, which must
//! always accept what the provider sends (the checklist: 200 even over the limits).
//!
//! Keyed by the TCP peer, not by `X-Forwarded-For`, which any client can forge; behind a proxy all
//! requests share the proxy's budget, so size RATE_LIMIT_MAX for it (or limit at the proxy). IPv6
//! peers are keyed by their /64, the block a single client usually holds. Each replica counts on
//! its own: the limit is per process.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use poem::{Addr, Endpoint, IntoResponse, Middleware, Request, Response, Result, http::StatusCode};

use super::json_error;

/// Admits at most `max` requests per key per window.
pub struct FixedWindowLimiter {
    max: u32,
    window: Duration,
    state: Mutex<WindowState>,
}

struct WindowState {
    /// The start of the current window; the first request starts the first one.
    started: Option<Instant>,
    /// Cleared when the window rolls over, so it holds only the peers of the current window.
    counts: HashMap<Option<IpAddr>, u32>,
}

/// What the limiter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Over the limit until the window ends, in this long.
    Refused {
        retry_after: Duration,
    },
}

impl FixedWindowLimiter {
    pub fn new(max: u32, window: Duration) -> Self {
        Self { max, window, state: Mutex::new(WindowState { started: None, counts: HashMap::new() }) }
    }

    pub fn admit(&self, peer: Option<IpAddr>, now: Instant) -> Admission {
        // A poisoned lock only means another request panicked while counting; the counts are
        // still usable.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut started = *state.started.get_or_insert(now);
        let elapsed = now.saturating_duration_since(started);
        if elapsed >= self.window {
            state.counts.clear();
            // Windows stay aligned to the first one, so their boundaries do not drift.
            let windows = elapsed.as_nanos() / self.window.as_nanos().max(1);
            let advance = self.window.saturating_mul(u32::try_from(windows).unwrap_or(u32::MAX));
            started = started.checked_add(advance).unwrap_or(now);
            state.started = Some(started);
        }
        let window_end = started.checked_add(self.window).unwrap_or(now);
        let count = state.counts.entry(peer.map(client_key)).or_insert(0);
        if *count >= self.max {
            return Admission::Refused { retry_after: window_end.saturating_duration_since(now) };
        }
        *count += 1;
        Admission::Allowed
    }
}

fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

/// The middleware: 429 `{"error": "too many requests"}` with `Retry-After` over the limit.
#[derive(Clone)]
pub struct PerIpRateLimit {
    limiter: Arc<FixedWindowLimiter>,
}

impl PerIpRateLimit {
    pub fn new(max: u32, window: Duration) -> Self {
        Self { limiter: Arc::new(FixedWindowLimiter::new(max, window)) }
    }
}

impl<E: Endpoint> Middleware<E> for PerIpRateLimit {
    type Output = PerIpRateLimitEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        PerIpRateLimitEndpoint { inner, limiter: Arc::clone(&self.limiter) }
    }
}

pub struct PerIpRateLimitEndpoint<E> {
    inner: E,
    limiter: Arc<FixedWindowLimiter>,
}

impl<E: Endpoint> Endpoint for PerIpRateLimitEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> Result<Response> {
        let peer = match &req.remote_addr().0 {
            Addr::SocketAddr(addr) => Some(addr.ip()),
            _ => None,
        };
        match self.limiter.admit(peer, Instant::now()) {
            Admission::Allowed => self.inner.call(req).await.map(IntoResponse::into_response),
            Admission::Refused { retry_after } => {
                tracing::info!(peer = ?peer, "admin API rate limit reached");
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                let mut resp = json_error(StatusCode::TOO_MANY_REQUESTS, "too many requests");
                if let Ok(value) = seconds.max(1).to_string().parse() {
                    resp.headers_mut().insert(poem::http::header::RETRY_AFTER, value);
                }
                Ok(resp)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    #[test]
    fn each_peer_gets_max_requests_per_window_then_waits_for_the_next() {
        let limiter = FixedWindowLimiter::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        let a = IpAddr::from([192, 0, 2, 1]);
        let b = IpAddr::from([192, 0, 2, 2]);
        assert_eq!(limiter.admit(Some(a), t0), Admission::Allowed);
        assert_eq!(limiter.admit(Some(a), t0), Admission::Allowed);
        assert_eq!(
            limiter.admit(Some(a), t0 + Duration::from_secs(10)),
            Admission::Refused { retry_after: Duration::from_secs(50) }
        );
        assert_eq!(limiter.admit(Some(b), t0), Admission::Allowed, "another peer has its own budget");
        assert_eq!(limiter.admit(Some(a), t0 + Duration::from_secs(61)), Admission::Allowed, "a new window");
    }

    #[test]
    fn an_ipv6_client_cannot_escape_the_limit_by_changing_its_interface_id() {
        let limiter = FixedWindowLimiter::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        let one = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, 1));
        let two = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0xdead, 0xbeef, 0, 2));
        assert_eq!(limiter.admit(Some(one), t0), Admission::Allowed);
        assert!(matches!(limiter.admit(Some(two), t0), Admission::Refused { .. }));
    }
}
