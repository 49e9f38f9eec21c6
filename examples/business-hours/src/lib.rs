//! An example of a stage written outside Parley's own crates: `business-hours` answers the messages
//! that arrive while the business is closed with a notice, instead of running the assistant.
//! `docs/writing-a-stage.md` walks through this file.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Datelike, FixedOffset, Timelike};
use engine::{
    BuildError, ConfigDuration, ConfigProblem, Decision, OnError, Stage, StageConfig, StageContext, StageError,
    events::Event,
    message::Message,
    ports::{Claim, Clock, KeyValueStore, Resources},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Logged (info) for every message that arrives while the business is closed. Built-in stages take
/// their event names from `engine::events::names`; a third-party stage owns its own names.
pub const OUTSIDE_BUSINESS_HOURS: &str = "outside_business_hours";

/// The default notice. It describes the default hours, so `check` warns when the hours change and
/// the notice does not.
pub const DEFAULT_NOTICE: &str = "Nous sommes fermés pour le moment. Nos horaires : du lundi au vendredi, de 9 h à 18 h. \
     Merci de nous écrire à nouveau pendant ces horaires.";

/// A customer who writes again the next day of a long closure (a weekend) hears the notice again
/// rather than nothing.
const RENOTIFY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Configuration of the `business-hours` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BusinessHoursConfig {
    /// The business's offset from UTC: `"+01:00"`, `"-05:00"`. It is fixed (there is no time-zone
    /// database): a business on summer time changes it twice a year (`"+02:00"` for Paris in summer).
    pub timezone_offset: String,
    /// Opening hours per day (`mon` … `sun`), local time: `"09:00-18:00"`, several ranges separated by
    /// commas (`"09:00-12:30, 14:00-18:00"`), or `"closed"`. A day left out is closed. Without this
    /// table: Monday to Friday, 09:00-18:00.
    pub hours: WeeklyHours,
    /// The answer to a message that arrives while closed, in `reply` mode.
    pub notice: String,
    /// What to do with a message that arrives while closed: `"reply"` answers the first message of
    /// each closed period with `notice` and drops the following ones of the conversation (the
    /// customer has been told), repeating the notice at most once a day; `"drop"` never answers.
    pub mode: ClosedMode,
}

impl Default for BusinessHoursConfig {
    fn default() -> Self {
        let weekday = Some("09:00-18:00".to_owned());
        Self {
            timezone_offset: "+01:00".into(),
            hours: WeeklyHours {
                mon: weekday.clone(),
                tue: weekday.clone(),
                wed: weekday.clone(),
                thu: weekday.clone(),
                fri: weekday,
                sat: None,
                sun: None,
            },
            notice: DEFAULT_NOTICE.into(),
            mode: ClosedMode::Reply,
        }
    }
}

/// Opening hours of each day of the week; a day left out is closed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WeeklyHours {
    /// Monday.
    pub mon: Option<String>,
    /// Tuesday.
    pub tue: Option<String>,
    /// Wednesday.
    pub wed: Option<String>,
    /// Thursday.
    pub thu: Option<String>,
    /// Friday.
    pub fri: Option<String>,
    /// Saturday.
    pub sat: Option<String>,
    /// Sunday.
    pub sun: Option<String>,
}

impl WeeklyHours {
    /// In the order of [`DAYS`].
    fn days(&self) -> [Option<&str>; 7] {
        [&self.mon, &self.tue, &self.wed, &self.thu, &self.fri, &self.sat, &self.sun].map(|d| d.as_deref())
    }
}

/// What the stage does with a message that arrives while closed.
//
// The variants are explained on `BusinessHoursConfig::mode` rather than here: documented variants
// become a `oneOf` in the schema, whose error ("not valid under any of the schemas") is worse than
// a plain enum's ("not one of \"reply\", \"drop\"").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClosedMode {
    #[default]
    Reply,
    Drop,
}

impl StageConfig for BusinessHoursConfig {
    const KIND: &'static str = "business-hours";
    const DESCRIPTION: &'static str = "Answers messages that arrive outside opening hours with a notice";
    // A Redis outage should not silence the assistant: the message is then answered as if open.
    const DEFAULT_ON_ERROR: OnError = OnError::Open;
    const DEFAULT_TIMEOUT: ConfigDuration = ConfigDuration::from_millis(500);
    const EXAMPLE: &'static str = r#"kind = "business-hours"
timezone_offset = "+01:00"
mode = "reply"
notice = "Nous sommes fermés pour le moment. Nos horaires : du lundi au vendredi de 9 h à 12 h 30 et de 14 h à 18 h, le samedi de 10 h à 13 h."
hours.mon = "09:00-12:30, 14:00-18:00"
hours.tue = "09:00-12:30, 14:00-18:00"
hours.wed = "09:00-12:30, 14:00-18:00"
hours.thu = "09:00-12:30, 14:00-18:00"
hours.fri = "09:00-12:30, 14:00-18:00"
hours.sat = "10:00-13:00"
hours.sun = "closed"
"#;

    fn check(&self) -> Vec<ConfigProblem> {
        let mut problems = match self.schedule() {
            Ok(schedule) if schedule.week.iter().all(Vec::is_empty) => {
                // Legitimate for a holiday, but also what a tier gets when it sets one day of a base
                // entry that leaves `hours` to its default: tier tables merge into what the file
                // says, so the tier's `hours` holds that day alone.
                vec![ConfigProblem::warning("hours", "no day has opening hours: every message is handled as closed")]
            }
            Ok(_) => Vec::new(),
            Err(problems) => problems,
        };
        let defaults = Self::default();
        if self.mode == ClosedMode::Reply && self.notice == defaults.notice && self.hours != defaults.hours {
            problems.push(ConfigProblem::warning(
                "notice",
                "the default notice announces Monday to Friday, 9 h to 18 h: write one that gives these hours",
            ));
        }
        problems
    }

    fn build(&self, resources: &Resources) -> Result<Arc<dyn Stage>, BuildError> {
        // `check` has refused these already when the file went through the loader.
        let schedule = self.schedule().map_err(|problems| {
            BuildError(problems.iter().map(|p| format!("{}: {}", p.key, p.message)).collect::<Vec<_>>().join("; "))
        })?;
        Ok(Arc::new(BusinessHours {
            schedule,
            notice: self.notice.clone(),
            mode: self.mode,
            clock: resources.clock.clone(),
            kv: resources.kv.clone(),
        }))
    }
}

engine::register_stage!(BusinessHoursConfig);

/// Call once from the binary that runs Parley. The stage registers itself when this crate is
/// linked, and a crate that no code refers to is left out of the link.
pub fn link() {}

impl BusinessHoursConfig {
    /// The hours as the stage runs them, or every problem, each with its key. `check` and `build`
    /// share it, so what passes validation is exactly what runs.
    fn schedule(&self) -> Result<Schedule, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let offset = match parse_offset(&self.timezone_offset) {
            Ok(offset) => Some(offset),
            Err(message) => {
                problems.push(ConfigProblem::error("timezone_offset", message));
                None
            }
        };
        let mut week: [Vec<(u32, u32)>; 7] = Default::default();
        for ((ranges, day), text) in week.iter_mut().zip(DAYS).zip(self.hours.days()) {
            match text.map(parse_day).transpose() {
                Ok(parsed) => *ranges = parsed.unwrap_or_default(),
                Err(message) => problems.push(ConfigProblem::error(format!("hours.{day}"), message)),
            }
        }
        match offset {
            Some(offset) if problems.is_empty() => Ok(Schedule { offset, week }),
            _ => Err(problems),
        }
    }
}

/// Opening ranges per day from Monday, in minutes from local midnight, `[start, end)`, sorted.
#[derive(Debug, Clone, PartialEq)]
struct Schedule {
    offset: FixedOffset,
    week: [Vec<(u32, u32)>; 7],
}

impl Schedule {
    fn is_open(&self, local: &DateTime<FixedOffset>) -> bool {
        let minute = local.hour() * 60 + local.minute();
        self.week[day_index(local)].iter().any(|&(start, end)| start <= minute && minute < end)
    }

    /// How long until the next opening; `None` when the business never opens.
    fn until_opening(&self, local: &DateTime<FixedOffset>) -> Option<Duration> {
        let today = day_index(local);
        let now = u64::from(local.num_seconds_from_midnight());
        (0..=7u64).find_map(|ahead| {
            let day = &self.week[(today + ahead as usize) % 7];
            let opening =
                day.iter().map(|&(start, _)| (ahead * 24 * 60 + u64::from(start)) * 60).find(|&at| at > now)?;
            Some(Duration::from_secs(opening - now))
        })
    }
}

fn day_index(local: &DateTime<FixedOffset>) -> usize {
    local.weekday().num_days_from_monday() as usize
}

/// `"HH:MM"` in minutes; `24:00` is accepted as the end of the day.
fn parse_clock(text: &str) -> Option<u32> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

fn parse_offset(text: &str) -> Result<FixedOffset, String> {
    let invalid = || format!("`{text}` is not a UTC offset: write \"+01:00\" or \"-05:00\"");
    let sign = match text.chars().next() {
        Some('+') => 1,
        Some('-') => -1,
        _ => return Err(invalid()),
    };
    let minutes = parse_clock(&text[1..]).filter(|&m| m <= 14 * 60).ok_or_else(invalid)?;
    FixedOffset::east_opt(sign * minutes as i32 * 60).ok_or_else(invalid)
}

fn parse_day(text: &str) -> Result<Vec<(u32, u32)>, String> {
    if text.trim() == "closed" {
        return Ok(Vec::new());
    }
    let mut ranges = Vec::new();
    for part in text.split(',').map(str::trim) {
        let range = part.split_once('-').and_then(|(s, e)| Some((parse_clock(s.trim())?, parse_clock(e.trim())?)));
        match range {
            Some((start, end)) if start < end => ranges.push((start, end)),
            Some(_) => {
                return Err(format!(
                    "`{part}` does not end after it starts; a range cannot cross midnight: end it at \"24:00\" and go on \
                     from \"00:00\" the next day"
                ));
            }
            None => {
                return Err(format!(
                    "`{part}` is not a time range: write \"HH:MM-HH:MM\" such as \"09:00-18:00\", several separated by \
                     commas, or \"closed\""
                ));
            }
        }
    }
    ranges.sort_unstable();
    Ok(ranges)
}

/// The running stage: the parsed hours and the ports it reads.
struct BusinessHours {
    schedule: Schedule,
    notice: String,
    mode: ClosedMode,
    clock: Arc<dyn Clock>,
    kv: Arc<dyn KeyValueStore>,
}

#[engine::async_trait]
impl Stage for BusinessHours {
    async fn process(&self, msg: &mut Message, cx: &StageContext<'_>) -> Result<Decision, StageError> {
        let local = self.clock.now().with_timezone(&self.schedule.offset);
        if self.schedule.is_open(&local) {
            return Ok(Decision::Continue);
        }
        let replied = match self.mode {
            ClosedMode::Reply => self.first_of_closed_period(msg, &local).await?,
            ClosedMode::Drop => false,
        };
        cx.emit(
            Event::info(OUTSIDE_BUSINESS_HOURS)
                .with("weekday", DAYS[day_index(&local)])
                .with("localTime", local.format("%H:%M").to_string())
                .with("mode", self.mode)
                .with("replied", replied),
        );
        Ok(if replied { Decision::Reply(self.notice.clone()) } else { Decision::Drop("outside business hours".into()) })
    }
}

impl BusinessHours {
    /// Claims the conversation's notice until the next opening (at most a day). A retry of the job
    /// that claimed it gets it again: that job's answer may not have been sent yet, and the `send`
    /// stage never sends one inbound message two answers.
    async fn first_of_closed_period(&self, msg: &Message, local: &DateTime<FixedOffset>) -> Result<bool, StageError> {
        let ttl = self.schedule.until_opening(local).map_or(RENOTIFY_AFTER, |d| d.min(RENOTIFY_AFTER));
        let key = format!("business-hours:notified:{}", msg.conversation.id);
        Ok(match self.kv.claim(&key, msg.job.id.as_str(), ttl).await? {
            Claim::Acquired => true,
            Claim::HeldBy(job) => job == msg.job.id.as_str(),
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use engine::{config::load_stage, events::names, runtime::Outcome, testing::TestBench};

    use super::*;

    const NOTICE: &str = "Fermé ! Du lundi au vendredi, 9 h - 18 h.";

    /// Monday to Friday 09:00-18:00 at UTC+1; Saturday left out, Sunday written closed.
    fn weekdays() -> String {
        let mut entry = format!("kind = \"business-hours\"\ntimezone_offset = \"+01:00\"\nnotice = \"{NOTICE}\"\n");
        for day in ["mon", "tue", "wed", "thu", "fri"] {
            entry.push_str(&format!("hours.{day} = \"09:00-18:00\"\n"));
        }
        entry.push_str("hours.sun = \"closed\"\n");
        entry
    }

    /// Sets the bench clock to a local time written with its offset (November 2026: the 16th is a
    /// Monday).
    fn at(bench: &TestBench, local: &str) {
        let instant = DateTime::parse_from_rfc3339(local).unwrap_or_else(|e| panic!("{local}: {e}"));
        bench.clock.set(instant.with_timezone(&Utc));
    }

    fn replied_by_the_stage() -> Outcome {
        Outcome::Replied { stage: "business-hours".into() }
    }

    #[tokio::test]
    async fn inside_opening_hours_the_message_goes_on() {
        let bench = TestBench::new();
        let pipeline = bench.stage(&weekdays());
        for time in ["2026-11-16T09:00:00+01:00", "2026-11-18T12:00:00+01:00", "2026-11-20T17:59:59+01:00"] {
            at(&bench, time);
            let mut msg = bench.message("Bonjour, vous avez des chaussures en 42 ?");
            assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed, "at {time}");
            assert_eq!(msg.reply, None);
        }
        assert!(bench.events.names().is_empty(), "{:?}", bench.events.names());
        assert!(bench.kv.keys().is_empty());
    }

    #[tokio::test]
    async fn after_closing_time_the_notice_answers() {
        let bench = TestBench::new();
        let pipeline = bench.stage(&weekdays());
        at(&bench, "2026-11-16T18:00:00+01:00");
        let mut msg = bench.message("Vous êtes ouverts ?");

        assert_eq!(bench.run(&pipeline, &mut msg).await, replied_by_the_stage());
        assert_eq!(msg.reply.map(|r| r.text).as_deref(), Some(NOTICE));
        let events = bench.events.named(OUTSIDE_BUSINESS_HOURS);
        assert_eq!(events.len(), 1);
        let field = |key: &str| events[0].field(key).cloned().unwrap_or_default();
        assert_eq!(field("weekday"), "mon");
        assert_eq!(field("localTime"), "18:00");
        assert_eq!(field("mode"), "reply");
        assert_eq!(field("replied"), true);
        assert_eq!(field("tenantId"), "tenant-1");
    }

    #[tokio::test]
    async fn a_day_left_out_or_written_closed_is_closed() {
        let bench = TestBench::new();
        let pipeline = bench.stage(&weekdays());
        for (time, conversation) in [("2026-11-21T11:00:00+01:00", "saturday"), ("2026-11-22T11:00:00+01:00", "sunday")]
        {
            at(&bench, time);
            let mut msg = bench.message("Bonjour");
            msg.conversation.id = conversation.into();
            assert_eq!(bench.run(&pipeline, &mut msg).await, replied_by_the_stage(), "at {time}");
        }
        let weekdays: Vec<_> =
            bench.events.named(OUTSIDE_BUSINESS_HOURS).iter().map(|e| e.fields["weekday"].clone()).collect();
        assert_eq!(weekdays, ["sat", "sun"]);
    }

    #[tokio::test]
    async fn the_offset_decides_the_local_time() {
        let bench = TestBench::new();
        // 08:30 UTC on a Monday: 09:30 in Paris (open), 08:30 in London (closed).
        at(&bench, "2026-11-16T08:30:00Z");
        let paris = bench.stage(&weekdays());
        let london = bench.stage(&weekdays().replace("+01:00", "+00:00"));

        assert_eq!(bench.run(&paris, &mut bench.message("Bonjour")).await, Outcome::Completed);
        assert_eq!(bench.run(&london, &mut bench.message("Bonjour")).await, replied_by_the_stage());
    }

    #[tokio::test]
    async fn the_lunch_break_is_closed() {
        let bench = TestBench::new();
        let pipeline = bench.stage(&weekdays().replace("\"09:00-18:00\"", "\"09:00-12:30, 14:00-18:00\""));
        at(&bench, "2026-11-17T13:00:00+01:00");
        assert_eq!(bench.run(&pipeline, &mut bench.message("Bonjour")).await, replied_by_the_stage());
        at(&bench, "2026-11-17T14:00:00+01:00");
        assert_eq!(bench.run(&pipeline, &mut bench.message("Bonjour")).await, Outcome::Completed);
    }

    #[tokio::test]
    async fn one_notice_per_closed_period_and_conversation() {
        let bench = TestBench::new();
        let pipeline = bench.stage(&weekdays());
        at(&bench, "2026-11-16T19:00:00+01:00");
        assert_eq!(bench.run(&pipeline, &mut bench.message("Bonsoir")).await, replied_by_the_stage());
        // The claim lasts until Tuesday's opening, 14 hours later.
        let key = "business-hours:notified:conv-1";
        assert_eq!(bench.kv.ttl(key), Some(Duration::from_secs(14 * 3600)));

        at(&bench, "2026-11-16T23:00:00+01:00");
        let mut again = bench.message("Il y a quelqu'un ?");
        let outcome = bench.run(&pipeline, &mut again).await;
        assert!(matches!(outcome, Outcome::Dropped { .. }), "{outcome:?}");
        assert_eq!(again.reply, None);
        let replied: Vec<_> =
            bench.events.named(OUTSIDE_BUSINESS_HOURS).iter().map(|e| e.fields["replied"].clone()).collect();
        assert_eq!(replied, [true, false]);

        // Open on Tuesday morning, closed again on Tuesday evening: a new notice.
        at(&bench, "2026-11-17T09:30:00+01:00");
        assert_eq!(bench.run(&pipeline, &mut bench.message("Bonjour")).await, Outcome::Completed);
        at(&bench, "2026-11-17T18:30:00+01:00");
        assert_eq!(bench.run(&pipeline, &mut bench.message("Bonsoir")).await, replied_by_the_stage());
    }

    #[tokio::test]
    async fn over_a_long_closure_the_notice_comes_back_once_a_day() {
        let bench = TestBench::new();
        let pipeline = bench.stage(&weekdays());
        at(&bench, "2026-11-20T19:00:00+01:00");
        assert_eq!(bench.run(&pipeline, &mut bench.message("Vendredi soir")).await, replied_by_the_stage());
        assert_eq!(bench.kv.ttl("business-hours:notified:conv-1"), Some(RENOTIFY_AFTER));

        at(&bench, "2026-11-21T10:00:00+01:00");
        assert!(matches!(bench.run(&pipeline, &mut bench.message("Samedi")).await, Outcome::Dropped { .. }));
        at(&bench, "2026-11-21T19:00:00+01:00");
        assert_eq!(bench.run(&pipeline, &mut bench.message("Samedi soir")).await, replied_by_the_stage());
    }

    #[tokio::test]
    async fn a_retried_job_answers_with_the_notice_again() {
        let bench = TestBench::new();
        let pipeline = bench.stage(&weekdays());
        at(&bench, "2026-11-16T20:00:00+01:00");
        let mut first = bench.message("Bonsoir");
        assert_eq!(bench.run(&pipeline, &mut first).await, replied_by_the_stage());

        let mut retry = bench.retry(&first);
        assert_eq!(bench.run(&pipeline, &mut retry).await, replied_by_the_stage());
        assert_eq!(retry.reply.map(|r| r.text).as_deref(), Some(NOTICE));
    }

    #[tokio::test]
    async fn drop_mode_never_answers() {
        let bench = TestBench::new();
        let pipeline = bench.stage(&format!("{}mode = \"drop\"\n", weekdays()));
        at(&bench, "2026-11-16T20:00:00+01:00");
        let mut msg = bench.message("Bonsoir");

        let outcome = bench.run(&pipeline, &mut msg).await;
        assert!(matches!(outcome, Outcome::Dropped { ref stage, .. } if stage == "business-hours"), "{outcome:?}");
        assert_eq!(msg.reply, None);
        assert!(bench.kv.keys().is_empty(), "drop mode needs no claim");
        let event = &bench.events.named(OUTSIDE_BUSINESS_HOURS)[0];
        assert_eq!(event.fields["mode"], "drop");
        assert_eq!(event.fields["replied"], false);
    }

    #[tokio::test]
    async fn with_redis_down_and_on_error_open_the_assistant_answers() {
        let bench = TestBench::new();
        let pipeline = bench.stage(&weekdays());
        bench.kv.set_failing(true);
        at(&bench, "2026-11-16T20:00:00+01:00");
        let mut msg = bench.message("Bonsoir");

        assert_eq!(bench.run(&pipeline, &mut msg).await, Outcome::Completed);
        assert_eq!(msg.reply, None);
        assert!(msg.is_degraded());
        assert_eq!(bench.events.names(), [names::STAGE_FAILED_OPEN]);
    }

    #[tokio::test]
    async fn with_redis_down_and_on_error_closed_the_job_fails() {
        let bench = TestBench::new();
        let pipeline = bench.stage(&format!("{}on_error = \"closed\"\n", weekdays()));
        bench.kv.set_failing(true);
        at(&bench, "2026-11-16T20:00:00+01:00");

        let outcome = bench.run(&pipeline, &mut bench.message("Bonsoir")).await;
        assert!(
            matches!(outcome, Outcome::Failed { retryable: true, ref stage, .. } if stage == "business-hours"),
            "{outcome:?}"
        );
        assert!(bench.events.named(OUTSIDE_BUSINESS_HOURS).is_empty());
    }

    #[tokio::test]
    async fn opening_hours_do_not_need_redis() {
        let bench = TestBench::new();
        let pipeline = bench.stage(&format!("{}on_error = \"closed\"\n", weekdays()));
        bench.kv.set_failing(true);
        at(&bench, "2026-11-16T10:00:00+01:00");
        assert_eq!(bench.run(&pipeline, &mut bench.message("Bonjour")).await, Outcome::Completed);
    }

    /// The stage before the built-in `llm` and `send`, as a pipeline file would have it.
    fn pipeline_file(entry: &str) -> String {
        // The built-in stages register only if this test binary links their crate.
        stages::link();
        format!("[[stages]]\n{entry}\n[[stages]]\nkind = \"llm\"\n\n[[stages]]\nkind = \"send\"\n")
    }

    #[tokio::test]
    async fn at_night_the_user_receives_the_notice_and_the_assistant_is_not_asked() {
        let bench = TestBench::new();
        let pipeline = bench.pipeline(&pipeline_file(&weekdays()));
        at(&bench, "2026-11-16T21:00:00+01:00");
        let mut msg = bench.message("Bonsoir");

        assert_eq!(bench.run(&pipeline, &mut msg).await, replied_by_the_stage());
        assert_eq!(bench.sender.sent_texts(), [NOTICE]);
        assert!(bench.llm.requests().is_empty());

        // A retry of that job claims the notice again, and `send` finds the answer already sent.
        let mut retry = bench.retry(&msg);
        assert_eq!(bench.run(&pipeline, &mut retry).await, replied_by_the_stage());
        assert_eq!(bench.sender.sent_texts(), [NOTICE]);
    }

    #[tokio::test]
    async fn by_day_the_assistant_answers() {
        let bench = TestBench::new();
        let pipeline = bench.pipeline(&pipeline_file(&weekdays()));
        at(&bench, "2026-11-16T11:00:00+01:00");
        bench.llm.answer_with("Oui, nous avons du 42.");

        assert_eq!(bench.run(&pipeline, &mut bench.message("Du 42 ?")).await, Outcome::Completed);
        assert_eq!(bench.sender.sent_texts(), ["Oui, nous avons du 42."]);
    }

    #[test]
    fn a_malformed_range_in_a_pipeline_file_names_its_key_and_line() {
        let file = pipeline_file("kind = \"business-hours\"\nhours.mon = \"9h-18h\"\n");
        let error = engine::config::load_str(&file, "whatsapp.toml").expect_err("9h-18h is not a range");
        assert_eq!(error.errors.len(), 1, "{error}");
        let problem = &error.errors[0];
        assert_eq!((problem.path.as_str(), problem.line), ("stages[0].hours.mon", Some(3)));
        assert!(
            error.to_string().starts_with("whatsapp.toml:3: error: stages[0].hours.mon: `9h-18h` is not"),
            "{error}"
        );
    }

    #[test]
    fn a_malformed_range_is_reported_at_its_key_and_line() {
        let entry = "kind = \"business-hours\"\nhours.tue = \"09:00-18:00\"\nhours.mon = \"9h-18h\"\n";
        let error = load_stage(entry, "hours.toml").expect_err("9h-18h is not a range");
        assert_eq!(error.errors.len(), 1, "{error}");
        let problem = &error.errors[0];
        assert_eq!((problem.path.as_str(), problem.line), ("hours.mon", Some(3)));
        assert!(problem.message.contains("HH:MM-HH:MM"), "{}", problem.message);
    }

    #[test]
    fn ranges_across_midnight_and_bad_offsets_are_refused() {
        let entry = "kind = \"business-hours\"\ntimezone_offset = \"CET\"\nhours.fri = \"22:00-02:00\"\n";
        let error = load_stage(entry, "hours.toml").expect_err("two problems");
        let found: Vec<_> = error.errors.iter().map(|d| (d.path.as_str(), d.line)).collect();
        assert_eq!(found, [("timezone_offset", Some(2)), ("hours.fri", Some(3))]);
        assert!(error.errors[1].message.contains("cannot cross midnight"), "{error}");
    }

    #[test]
    fn the_next_opening_may_be_a_week_away() {
        let config = BusinessHoursConfig {
            hours: WeeklyHours { mon: Some("09:00-18:00".into()), ..WeeklyHours::default() },
            ..BusinessHoursConfig::default()
        };
        let schedule = config.schedule().unwrap_or_else(|p| panic!("{p:?}"));
        let monday_evening = DateTime::parse_from_rfc3339("2026-11-16T19:00:00+01:00").unwrap();
        let six_days_14_hours = Duration::from_secs((6 * 24 + 14) * 3600);
        assert_eq!(schedule.until_opening(&monday_evening), Some(six_days_14_hours));
        let never = BusinessHoursConfig { hours: WeeklyHours::default(), ..config }.schedule().unwrap();
        assert_eq!(never.until_opening(&monday_evening), None);
    }

    #[test]
    fn an_unknown_day_is_refused() {
        let error = load_stage("kind = \"business-hours\"\nhours.monday = \"09:00-18:00\"\n", "hours.toml")
            .expect_err("monday is not a key");
        assert_eq!(error.errors[0].path, "hours.monday", "{error}");
    }

    #[test]
    fn the_default_notice_with_other_hours_is_a_warning() {
        let config = BusinessHoursConfig {
            hours: WeeklyHours { sat: Some("10:00-13:00".into()), ..BusinessHoursConfig::default().hours },
            ..BusinessHoursConfig::default()
        };
        let problems = config.check();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].warning && problems[0].key == "notice");
        let dropping = BusinessHoursConfig { mode: ClosedMode::Drop, ..config };
        assert!(dropping.check().is_empty(), "drop mode never shows the notice");
        // A warning does not refuse the stage.
        let entry = "kind = \"business-hours\"\nhours.sat = \"10:00-13:00\"\n";
        assert!(load_stage(entry, "hours.toml").is_ok());
    }

    #[test]
    fn a_week_without_opening_hours_is_a_warning() {
        let config = BusinessHoursConfig {
            hours: WeeklyHours { sat: Some("closed".into()), ..WeeklyHours::default() },
            mode: ClosedMode::Drop,
            ..BusinessHoursConfig::default()
        };
        let problems = config.check();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].warning && problems[0].key == "hours", "{problems:?}");
    }

    #[test]
    fn the_example_and_the_defaults_are_valid() {
        let spec = load_stage(BusinessHoursConfig::EXAMPLE, "example.toml").unwrap_or_else(|e| panic!("{e}"));
        assert!(spec.config.check().is_empty(), "{:?}", spec.config.check());
        assert!(spec.config.build(&TestBench::new().resources()).is_ok());
        assert!(BusinessHoursConfig::default().check().is_empty());
        assert_eq!(spec.on_error, OnError::Open);
    }

    #[tokio::test]
    async fn the_example_opens_on_saturday_morning_only() {
        let bench = TestBench::new();
        let pipeline = bench.stage(BusinessHoursConfig::EXAMPLE);
        at(&bench, "2026-11-21T12:59:00+01:00");
        assert_eq!(bench.run(&pipeline, &mut bench.message("Bonjour")).await, Outcome::Completed);
        at(&bench, "2026-11-21T13:00:00+01:00");
        assert_eq!(bench.run(&pipeline, &mut bench.message("Bonjour")).await, replied_by_the_stage());
    }

    #[test]
    fn a_tier_opening_on_saturday_keeps_the_default_weekdays() {
        stages::link();
        let text = "[[stages]]\nkind = \"business-hours\"\n\n[[stages]]\nkind = \"send\"\n\n\
                    [tiers.retail]\nstages.business-hours.hours.sat = \"10:00-13:00\"\n";
        let cfg = engine::config::load_str(text, "tier.toml").unwrap_or_else(|e| panic!("{e}"));
        let hours = &cfg.for_tier(Some("retail")).stages[0].entry["hours"];
        assert_eq!(hours["sat"], "10:00-13:00");
        assert_eq!(hours["mon"], "09:00-18:00", "the tier must keep the default weekdays: {hours}");
    }

    #[test]
    fn registered_by_being_linked() {
        let kind = engine::registry::find("business-hours").expect("the stage registers itself");
        assert_eq!(kind.description, BusinessHoursConfig::DESCRIPTION);
    }
}
