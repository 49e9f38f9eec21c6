//! Outbound pacing: [`PacedSender`] wraps any WhatsApp sender and holds each message back until
//! Meta would accept it — a token bucket per business number (`WHATSAPP_SEND_RATE`) and a slower
//! one per recipient — so that bursts are delayed here instead of refused there (130429, 131056).
//!
//! Pacing delays, never drops: a send that finds its bucket empty sleeps until a token is due.
//! Waiting sends are served in arrival order (first in, first out): only the oldest waiter of a
//! bucket watches it, the others queue behind it on a fair lock, so that under a backlog every send
//! waits about `backlog / rate` and none starves while later ones overtake it. With the default
//! 64 jobs in flight per worker and 80 messages per second, the longest wait is under a second —
//! far inside the `send` stage's timeout (keep `WORKER_CONCURRENCY / WHATSAPP_SEND_RATE` below it).
//!
//! The buckets live in the process. Messages of one conversation go through one worker at a time
//! (shard leases), so the per-recipient bucket holds across replicas; the per-number rate is per
//! worker process, so with several worker replicas `WHATSAPP_SEND_RATE` is the number's throughput
//! divided by the number of replicas.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use engine::{
    async_trait,
    ids::ProviderMessageId,
    message::ChannelInfo,
    ports::{OutboundSender, OutboundText, PortError},
};
use governor::{
    Quota, RateLimiter,
    clock::{Clock, FakeRelativeClock},
    middleware::NoOpMiddleware,
    nanos::Nanos,
    state::keyed::DashMapStateStore,
};

/// Meta's default throughput of a business number: 80 messages per second.
pub const DEFAULT_SEND_RATE: NonZeroU32 = NonZeroU32::new(80).unwrap();

/// Forget recipients idle long enough to be back to a full bucket once every this many sends, so
/// that the per-recipient state does not grow with every user ever answered.
const PRUNE_EVERY: u64 = 4096;

/// How fast one business number may write to one user.
///
/// Meta's "pair rate limit" (error 131056) allows one message every 6 seconds to the same user on
/// average, with bursts of up to 45 that borrow from the following minutes. The default mirrors
/// that shape with half the burst ([`RecipientPacing::META_PAIR_LIMIT`]): a normal conversation
/// never waits — the `ratelimit` stage already keeps a conversation to a few replies per 30 s —
/// while a user who keeps the assistant busy for minutes gets the answers spaced out instead of
/// refused. A fixed minimum gap (say one second, burst 1) would delay every quick second reply
/// and still not keep a long exchange under Meta's 6-second average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecipientPacing {
    /// The average spacing of messages to one user.
    interval: Duration,
    /// How many messages may go out back to back before the spacing applies.
    burst: NonZeroU32,
}

impl RecipientPacing {
    /// One message per 6 s on average, 20 back to back (Meta allows 45).
    pub const META_PAIR_LIMIT: Self = Self { interval: Duration::from_secs(6), burst: NonZeroU32::new(20).unwrap() };

    pub fn new(interval: Duration, burst: NonZeroU32) -> Result<Self, PacingError> {
        if interval.is_zero() {
            return Err(PacingError::ZeroInterval);
        }
        Ok(Self { interval, burst })
    }

    fn quota(self) -> Quota {
        // `with_period` only refuses a zero interval, which `new` rules out; per second is the
        // harmless fallback.
        Quota::with_period(self.interval).unwrap_or_else(|| Quota::per_second(self.burst)).allow_burst(self.burst)
    }
}

impl Default for RecipientPacing {
    fn default() -> Self {
        Self::META_PAIR_LIMIT
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacingError {
    #[error("the interval between two messages to one recipient must be positive")]
    ZeroInterval,
}

/// The time source of the buckets and how a send waits for its token. Tokio's clock in service;
/// tests use a clock that moves only when told to.
pub trait PacingClock: Clock<Instant = Nanos> + Clone + Send + Sync + 'static {
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send;
}

/// Tokio's monotonic clock, measured from the sender's creation.
#[derive(Debug, Clone)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        Self { start: tokio::time::Instant::now() }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.start.elapsed())
    }
}

impl PacingClock for TokioClock {
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(duration)
    }
}

/// A test clock: sleeping moves it forward at once, so a single task's sends land at exact,
/// reproducible instants.
impl PacingClock for FakeRelativeClock {
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send {
        self.advance(duration);
        std::future::ready(())
    }
}

type Bucket<K, C> = RateLimiter<K, DashMapStateStore<K>, C, NoOpMiddleware<Nanos>>;

/// Which bucket held a send back, for the metrics.
#[derive(Debug, Clone, Copy)]
enum Scope {
    BusinessNumber,
    Recipient,
}

impl Scope {
    fn label(self) -> &'static str {
        match self {
            Self::BusinessNumber => "business_number",
            Self::Recipient => "recipient",
        }
    }
}

/// One fair (FIFO) lock per bucket key: the sends waiting for a key's token line up on it.
struct Gates<K> {
    gates: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K: Hash + Eq + Clone> Gates<K> {
    fn new() -> Self {
        Self { gates: Mutex::new(HashMap::new()) }
    }

    fn of(&self, key: &K) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.gates.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        gates.entry(key.clone()).or_insert_with(|| Arc::new(tokio::sync::Mutex::new(()))).clone()
    }

    /// Forgets the gates nobody holds or waits for.
    fn prune(&self) {
        let mut gates = self.gates.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        gates.retain(|_, gate| Arc::strong_count(gate) > 1);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.gates.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }
}

/// A sender that paces `inner`'s messages per business number and per recipient.
///
/// Read receipts ([`OutboundSender::mark_read`]) pass through unpaced: they are not messages to
/// the user, and holding back the typing indicator would defeat it.
pub struct PacedSender<S: ?Sized, C: PacingClock = TokioClock> {
    inner: Arc<S>,
    clock: C,
    /// Keyed by the channel's `phone_number_id`.
    per_number: Bucket<String, C>,
    /// Keyed by (`phone_number_id`, recipient digits); `None` when recipients are not paced.
    per_recipient: Option<Bucket<(String, String), C>>,
    number_gates: Gates<String>,
    recipient_gates: Gates<(String, String)>,
    sends: AtomicU64,
}

impl<S: OutboundSender + ?Sized> PacedSender<S> {
    /// Paces `inner` to `per_second` messages per second per business number (`WHATSAPP_SEND_RATE`;
    /// a burst of as many may go at once) and, unless `per_recipient` is `None`, per recipient.
    pub fn new(inner: Arc<S>, per_second: NonZeroU32, per_recipient: Option<RecipientPacing>) -> Self {
        Self::with_clock(inner, per_second, per_recipient, TokioClock::new())
    }
}

impl<S: OutboundSender + ?Sized, C: PacingClock> PacedSender<S, C> {
    pub fn with_clock(inner: Arc<S>, per_second: NonZeroU32, per_recipient: Option<RecipientPacing>, clock: C) -> Self {
        Self {
            per_number: RateLimiter::dashmap_with_clock(Quota::per_second(per_second), clock.clone()),
            per_recipient: per_recipient.map(|p| RateLimiter::dashmap_with_clock(p.quota(), clock.clone())),
            clock,
            inner,
            number_gates: Gates::new(),
            recipient_gates: Gates::new(),
            sends: AtomicU64::new(0),
        }
    }

    /// Waits its turn among the sends for `key`, then until `bucket` has a token for `key`, takes
    /// it, and returns how long it waited.
    ///
    /// Checking and sleeping (rather than governor's `until_key_ready`) keeps the wait on this
    /// clock, so that it follows Tokio's time and tests can drive it.
    async fn take<K>(&self, bucket: &Bucket<K, C>, gates: &Gates<K>, key: &K, scope: Scope) -> Duration
    where
        K: Hash + Eq + Clone,
    {
        // Fast path: a token is there and nobody is queued for one.
        let gate = gates.of(key);
        let start = self.clock.now();
        let _turn = match gate.try_lock() {
            Ok(turn) => {
                if bucket.check_key(key).is_ok() {
                    return Duration::ZERO;
                }
                turn
            }
            Err(_) => gate.lock().await,
        };
        while let Err(not_until) = bucket.check_key(key) {
            // At least a millisecond: a token due "now" by the bucket's reckoning must not spin.
            let wait = not_until.wait_time_from(self.clock.now()).max(Duration::from_millis(1));
            self.clock.sleep(wait).await;
        }
        let waited: Duration = self.clock.now().saturating_sub(start).into();
        if !waited.is_zero() {
            metrics::counter!("parley_send_paced_total", "scope" => scope.label()).increment(1);
            metrics::histogram!("parley_send_pacing_wait_seconds", "scope" => scope.label())
                .record(waited.as_secs_f64());
        }
        waited
    }

    fn prune_now_and_then(&self) {
        if self.sends.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            if let Some(bucket) = &self.per_recipient {
                bucket.retain_recent();
            }
            self.per_number.retain_recent();
            self.recipient_gates.prune();
            self.number_gates.prune();
        }
    }
}

#[async_trait]
impl<S: OutboundSender + ?Sized, C: PacingClock> OutboundSender for PacedSender<S, C> {
    async fn send_text(&self, message: &OutboundText) -> Result<ProviderMessageId, PortError> {
        let number = message.channel.phone_number_id.clone();
        // The recipient first: its wait is the longer one, and a number token taken before it
        // would sit unused while other recipients could have had it.
        if let Some(bucket) = &self.per_recipient {
            let key = (number.clone(), message.to.expose().to_owned());
            self.take(bucket, &self.recipient_gates, &key, Scope::Recipient).await;
        }
        self.take(&self.per_number, &self.number_gates, &number, Scope::BusinessNumber).await;
        self.prune_now_and_then();
        self.inner.send_text(message).await
    }

    async fn mark_read(
        &self,
        channel: &ChannelInfo,
        message_id: &ProviderMessageId,
        typing: bool,
    ) -> Result<(), PortError> {
        self.inner.mark_read(channel, message_id, typing).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use engine::{
        ids::{ChannelId, PhoneNumber},
        memory::MemorySender,
    };

    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn text(number: &str, to: &str, text: &str) -> OutboundText {
        OutboundText {
            channel: ChannelInfo {
                id: ChannelId::new(format!("channel-{number}")),
                provider: "meta".into(),
                phone_number_id: number.into(),
            },
            to: PhoneNumber::new(to),
            text: text.into(),
            reply_to: None,
        }
    }

    /// The provider as the test clock sees it: what arrived, and when.
    struct Recorder {
        clock: FakeRelativeClock,
        received: Mutex<Vec<(String, Duration)>>,
    }

    impl Recorder {
        fn new(clock: &FakeRelativeClock) -> Arc<Self> {
            Arc::new(Self { clock: clock.clone(), received: Mutex::new(Vec::new()) })
        }
        fn received(&self) -> Vec<(String, Duration)> {
            self.received.lock().unwrap().clone()
        }
        fn at(&self, text: &str) -> Duration {
            self.received().into_iter().find(|(t, _)| t == text).map(|(_, at)| at).unwrap()
        }
    }

    #[async_trait]
    impl OutboundSender for Recorder {
        async fn send_text(&self, message: &OutboundText) -> Result<ProviderMessageId, PortError> {
            let at: Duration = self.clock.now().into();
            self.received.lock().unwrap().push((message.text.clone(), at));
            Ok(ProviderMessageId::new(format!("wamid.{}", message.text)))
        }
    }

    fn paced(
        recorder: &Arc<Recorder>,
        per_second: u32,
        per_recipient: Option<RecipientPacing>,
    ) -> PacedSender<Recorder, FakeRelativeClock> {
        PacedSender::with_clock(recorder.clone(), nz(per_second), per_recipient, recorder.clock.clone())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test]
    async fn burst_to_one_business_number_is_spread_at_its_rate_and_nothing_is_dropped() {
        let clock = FakeRelativeClock::default();
        let provider = Recorder::new(&clock);
        let sender = paced(&provider, 5, None);

        for i in 1..=15 {
            sender.send_text(&text("PNID-A", &format!("3361111{i:04}"), &format!("m{i}"))).await.unwrap();
        }

        let received = provider.received();
        let order: Vec<String> = received.iter().map(|(t, _)| t.clone()).collect();
        let expected: Vec<String> = (1..=15).map(|i| format!("m{i}")).collect();
        assert_eq!(order, expected, "all sent, in order");
        // A full bucket of 5 goes at once, then one every 200 ms: the 15th leaves at 2 s.
        for (text, at) in &received[..5] {
            assert_eq!(*at, Duration::ZERO, "{text} is within the burst");
        }
        for pair in received[5..].windows(2) {
            assert!(pair[1].1 - pair[0].1 >= ms(199), "{pair:?}: closer than the rate allows");
        }
        let last = received[14].1;
        assert!(last >= ms(1999) && last <= ms(2010), "the 15th left at {last:?}");
    }

    #[tokio::test]
    async fn another_business_number_does_not_wait_for_a_busy_one() {
        let clock = FakeRelativeClock::default();
        let provider = Recorder::new(&clock);
        let sender = paced(&provider, 5, None);
        for i in 1..=5 {
            sender.send_text(&text("PNID-A", &format!("3361111{i:04}"), &format!("a{i}"))).await.unwrap();
        }

        sender.send_text(&text("PNID-B", "33622220001", "b1")).await.unwrap();
        sender.send_text(&text("PNID-A", "33611110006", "a6")).await.unwrap();

        assert_eq!(provider.at("b1"), Duration::ZERO, "B's bucket is full: no wait");
        assert!(provider.at("a6") >= ms(199), "A's bucket is empty: a6 waits its turn");
    }

    #[tokio::test]
    async fn messages_to_one_recipient_are_spaced_while_others_go_at_once() {
        let clock = FakeRelativeClock::default();
        let provider = Recorder::new(&clock);
        let one_per_second = RecipientPacing::new(Duration::from_secs(1), nz(1)).unwrap();
        let sender = paced(&provider, 80, Some(one_per_second));

        sender.send_text(&text("PNID-A", "33611110001", "first")).await.unwrap();
        sender.send_text(&text("PNID-B", "33611110001", "same user, other number")).await.unwrap();
        sender.send_text(&text("PNID-A", "33622220002", "other user")).await.unwrap();
        sender.send_text(&text("PNID-A", "33611110001", "second")).await.unwrap();
        sender.send_text(&text("PNID-A", "33611110001", "third")).await.unwrap();

        assert_eq!(provider.at("first"), Duration::ZERO);
        assert_eq!(provider.at("same user, other number"), Duration::ZERO, "the pair is (number, user)");
        assert_eq!(provider.at("other user"), Duration::ZERO);
        assert!(provider.at("second") >= ms(999), "second at {:?}", provider.at("second"));
        assert!(provider.at("third") - provider.at("second") >= ms(999));
    }

    #[tokio::test]
    async fn default_recipient_pacing_lets_a_conversation_burst_then_spaces_it_like_meta() {
        let clock = FakeRelativeClock::default();
        let provider = Recorder::new(&clock);
        let sender = paced(&provider, 80, Some(RecipientPacing::default()));

        for i in 1..=22 {
            sender.send_text(&text("PNID-A", "33611110001", &format!("r{i}"))).await.unwrap();
        }

        assert_eq!(provider.at("r20"), Duration::ZERO, "20 back to back are within Meta's burst");
        assert!(provider.at("r21") >= Duration::from_millis(5999), "then one per 6 s");
        assert!(provider.at("r22") - provider.at("r21") >= Duration::from_millis(5999));
        assert_eq!(provider.received().len(), 22);
    }

    #[tokio::test]
    async fn concurrent_sends_over_the_rate_all_go_out_with_tokios_clock() {
        let provider = Arc::new(MemorySender::new());
        let sender = Arc::new(PacedSender::new(provider.clone(), nz(20), Some(RecipientPacing::default())));
        let start = tokio::time::Instant::now();

        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let sender = sender.clone();
                tokio::spawn(async move { sender.send_text(&text("PNID-A", &format!("3361111{i:04}"), "x")).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }

        assert_eq!(provider.sent().len(), 30, "a full bucket delays, never drops");
        // 20 at once, 10 more at 20 per second: at least half a second (a lower bound only).
        assert!(start.elapsed() >= ms(450), "{:?}", start.elapsed());
    }

    /// A provider on Tokio's clock: the order and the instant each message arrived.
    struct TimedRecorder {
        start: tokio::time::Instant,
        received: Mutex<Vec<(String, Duration)>>,
    }

    #[async_trait]
    impl OutboundSender for TimedRecorder {
        async fn send_text(&self, message: &OutboundText) -> Result<ProviderMessageId, PortError> {
            self.received.lock().unwrap().push((message.text.clone(), self.start.elapsed()));
            Ok(ProviderMessageId::new(format!("wamid.{}", message.text)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_served_first_come_first_served_and_no_send_waits_longer_than_the_backlog() {
        let provider = Arc::new(TimedRecorder { start: tokio::time::Instant::now(), received: Mutex::new(Vec::new()) });
        let sender = Arc::new(PacedSender::new(provider.clone(), nz(10), None));

        // 60 sends to one business number, each queued before the next starts: 10 go at once, the
        // 50 others wait for the 10-per-second bucket.
        let mut tasks = Vec::new();
        for i in 0..60 {
            let sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                sender.send_text(&text("PNID-A", &format!("3361111{i:04}"), &format!("m{i:02}"))).await
            }));
            tokio::task::yield_now().await;
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }

        let received = provider.received.lock().unwrap().clone();
        let order: Vec<&str> = received.iter().map(|(t, _)| t.as_str()).collect();
        let expected: Vec<String> = (0..60).map(|i| format!("m{i:02}")).collect();
        assert_eq!(order, expected, "the sends leave in the order they arrived");
        // The n-th send over the burst leaves at about n / rate: the last of 50 after ~5 s, never
        // later (an unfair wake-up would let some wait much longer while later ones overtake).
        let last = received[59].1;
        assert!(last >= ms(4_900) && last <= ms(5_200), "the last send left at {last:?}");
        for (i, (_, at)) in received.iter().enumerate().skip(10) {
            let due = ms(100 * (i as u64 - 9));
            assert!(*at <= due + ms(150), "m{i:02} left at {at:?}, due about {due:?}");
        }
    }

    #[tokio::test]
    async fn idle_gates_are_forgotten() {
        let provider = Arc::new(MemorySender::new());
        let sender = PacedSender::new(provider.clone(), nz(10_000), Some(RecipientPacing::default()));
        for i in 0..PRUNE_EVERY {
            sender.send_text(&text("PNID-A", &format!("336{i:08}"), "x")).await.unwrap();
        }
        assert_eq!(sender.recipient_gates.len(), 0, "pruned after {PRUNE_EVERY} sends");
        assert_eq!(sender.number_gates.len(), 0);
    }

    #[tokio::test]
    async fn read_receipts_pass_through_unpaced() {
        let clock = FakeRelativeClock::default();
        let provider = Arc::new(MemorySender::new());
        let one_per_minute = RecipientPacing::new(Duration::from_secs(60), nz(1)).unwrap();
        let sender = PacedSender::with_clock(provider.clone(), nz(1), Some(one_per_minute), clock.clone());
        let message = text("PNID-A", "33611110001", "x");
        sender.send_text(&message).await.unwrap();

        for _ in 0..3 {
            sender.mark_read(&message.channel, &ProviderMessageId::new("wamid.in"), true).await.unwrap();
        }

        assert_eq!(provider.read_marks().len(), 3);
        assert_eq!(Duration::from(clock.now()), Duration::ZERO, "no read receipt waited for a token");
    }

    #[tokio::test]
    async fn provider_errors_are_returned_as_they_are() {
        let provider = Arc::new(MemorySender::new());
        provider.fail_with(Some(engine::memory::SendFailure::Permanent { code: "131026".into() }));
        // Wrapped the way start-up wraps the configured provider: behind the port's trait object.
        let inner: Arc<dyn OutboundSender> = provider;
        let sender: Arc<dyn OutboundSender> = Arc::new(PacedSender::new(inner, DEFAULT_SEND_RATE, None));

        let error = sender.send_text(&text("PNID-A", "33611110001", "x")).await.unwrap_err();

        assert_eq!(error.code.as_deref(), Some("131026"));
        assert!(!error.is_retryable());
    }

    #[test]
    fn a_zero_recipient_interval_is_refused() {
        assert_eq!(RecipientPacing::new(Duration::ZERO, nz(1)), Err(PacingError::ZeroInterval));
    }
}
