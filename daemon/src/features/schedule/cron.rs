//! 5-field cron expressions (`minute hour day-of-month month day-of-week`) with the
//! standard (Vixie cron) semantics, read in a configured time zone.
//!
//! Unlike the reference, which ANDed the two day fields, a day matches when *either*
//! day-of-month or day-of-week matches if both are restricted (neither starts with
//! `*`), as in every cron since Vixie's: `0 9 1 * 1` fires on the 1st and on Mondays.

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan as _};

/// How far ahead the next match is looked for: eight years covers a 29 February that
/// skips a non-leap century year.
const HORIZON_DAYS: u32 = 366 * 8;

/// Longest expression accepted.
const MAX_LEN: usize = 256;

/// A parsed expression: one bit per allowed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Day-of-month field starts with `*` (unrestricted for the OR rule).
    days_star: bool,
    /// Day-of-week field starts with `*`.
    weekdays_star: bool,
}

/// Why an expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CronError {
    /// Not five fields.
    #[error("a cron expression has 5 fields (minute hour day-of-month month day-of-week), got {0}")]
    FieldCount(usize),
    /// One field is malformed or out of range.
    #[error("cron {field} field {text:?}: {reason}")]
    Field {
        /// Which field.
        field: &'static str,
        /// Its text.
        text: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Parses, but no date ever matches (e.g. `0 0 30 2 *`).
    #[error("the cron expression never matches a date")]
    Never,
    /// Too long.
    #[error("a cron expression is at most {MAX_LEN} characters")]
    TooLong,
}

struct Spec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Spec = Spec {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: Spec = Spec {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DAY: Spec = Spec {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
};
const MONTH: Spec = Spec {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
};
/// 7 is accepted as Sunday and folded into 0.
const WEEKDAY: Spec = Spec {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

impl Cron {
    /// Parses an expression, or one of the macros `@yearly`, `@annually`, `@monthly`,
    /// `@weekly`, `@daily`, `@midnight`, `@hourly`.
    pub(crate) fn parse(text: &str) -> Result<Self, CronError> {
        let text = text.trim();
        if text.len() > MAX_LEN {
            return Err(CronError::TooLong);
        }
        let expanded = match text.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            _ => text,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(CronError::FieldCount(fields.len()));
        };
        let mut weekdays = field(weekday, &WEEKDAY)?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays & !(1 << 7)) | 1;
        }
        let cron = Self {
            minutes: field(minute, &MINUTE)?,
            hours: u32::try_from(field(hour, &HOUR)?).unwrap_or(0),
            days: u32::try_from(field(day, &DAY)?).unwrap_or(0),
            months: u16::try_from(field(month, &MONTH)?).unwrap_or(0),
            weekdays: u8::try_from(weekdays).unwrap_or(0),
            days_star: day.starts_with('*'),
            weekdays_star: weekday.starts_with('*'),
        };
        Ok(cron)
    }

    fn day_matches(&self, d: Date) -> bool {
        if self.months & (1 << d.month()) == 0 {
            return false;
        }
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << d.weekday().to_sunday_zero_offset()) != 0;
        if self.days_star || self.weekdays_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first matching minute strictly after `after`, in `tz`. Local times skipped by
    /// a daylight-saving jump fire just after it (as cron does); times repeated by a
    /// fall-back fire once, at their first occurrence.
    pub(crate) fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        let local = tz.to_datetime(after);
        let start = DateTime::from_parts(
            local.date(),
            jiff::civil::time(local.hour(), local.minute(), 0, 0),
        )
        .checked_add(1.minute())
        .ok()?;
        let mut date = start.date();
        for _ in 0..=HORIZON_DAYS {
            if self.day_matches(date) {
                for h in 0..24i8 {
                    if self.hours & (1 << h) == 0 || (date == start.date() && h < start.hour()) {
                        continue;
                    }
                    for m in 0..60i8 {
                        if self.minutes & (1 << m) == 0
                            || (date == start.date() && h == start.hour() && m < start.minute())
                        {
                            continue;
                        }
                        let at = tz.to_timestamp(date.at(h, m, 0, 0)).ok()?;
                        if at > after {
                            return Some(at);
                        }
                    }
                }
            }
            date = date.tomorrow().ok()?;
        }
        None
    }
}

/// One field: a comma-separated list of `*`, `N`, `N-M`, each optionally `/STEP`
/// (`N/STEP` runs from N to the field's maximum). Names (`jan`, `mon`) where allowed.
fn field(text: &str, spec: &Spec) -> Result<u64, CronError> {
    let bad = |reason| CronError::Field {
        field: spec.name,
        text: text.to_owned(),
        reason,
    };
    let value = |s: &str| -> Result<u32, CronError> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = spec.names.iter().position(|n| *n == lower) {
            return Ok(u32::try_from(i).unwrap_or(0) + spec.min);
        }
        let v: u32 = s.parse().map_err(|_| bad("not a number or name"))?;
        if v < spec.min || v > spec.max {
            return Err(bad("value out of range"));
        }
        Ok(v)
    };
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| bad("step is not a number"))?;
                if step == 0 || step > spec.max {
                    return Err(bad("step out of range"));
                }
                (r, Some(step))
            }
            None => (item, None),
        };
        let (lo, hi) = if range == "*" {
            (spec.min, spec.max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(bad("range runs backwards"));
            }
            (a, b)
        } else if range.is_empty() {
            return Err(bad("empty item"));
        } else {
            let v = value(range)?;
            (v, if step.is_some() { spec.max } else { v })
        };
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step.unwrap_or(1);
        }
    }
    Ok(bits)
}

/// Parses an expression and finds its first fire time after `now` (ms).
pub(crate) fn first_fire(text: &str, now_ms: i64, tz: &TimeZone) -> Result<i64, CronError> {
    let cron = Cron::parse(text)?;
    let now = Timestamp::from_millisecond(now_ms).map_err(|_| CronError::Never)?;
    cron.next_after(now, tz)
        .map(|t| t.as_millisecond())
        .ok_or(CronError::Never)
}

/// The fire time after `after_ms` of an expression already accepted once.
pub(crate) fn next_fire(text: &str, after_ms: i64, tz: &TimeZone) -> Option<i64> {
    first_fire(text, after_ms, tz).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str, tz: &TimeZone) -> Timestamp {
        tz.to_timestamp(s.parse::<DateTime>().unwrap()).unwrap()
    }

    fn next(expr: &str, from: &str, tz: &TimeZone) -> String {
        let t = Cron::parse(expr)
            .unwrap()
            .next_after(at(from, tz), tz)
            .unwrap();
        tz.to_datetime(t).to_string()
    }

    #[test]
    fn fields_and_steps() {
        let utc = TimeZone::UTC;
        assert_eq!(
            next("*/15 * * * *", "2026-01-01T10:07", &utc),
            "2026-01-01T10:15:00"
        );
        assert_eq!(
            next("5/20 * * * *", "2026-01-01T10:46", &utc),
            "2026-01-01T11:05:00"
        );
        assert_eq!(
            next("0 9-17/4 * * *", "2026-01-01T13:00", &utc),
            "2026-01-01T17:00:00"
        );
        assert_eq!(
            next("30 8 * jan,Jul *", "2026-02-01T00:00", &utc),
            "2026-07-01T08:30:00"
        );
        assert_eq!(
            next("0 0 29 2 *", "2097-03-01T00:00", &utc),
            "2104-02-29T00:00:00"
        );
        assert_eq!(
            next("@hourly", "2026-01-01T10:00", &utc),
            "2026-01-01T11:00:00"
        );
    }

    #[test]
    fn strictly_after_now() {
        let utc = TimeZone::UTC;
        assert_eq!(
            next("0 10 * * *", "2026-01-01T10:00", &utc),
            "2026-01-02T10:00:00"
        );
    }

    #[test]
    fn day_fields_or_when_both_restricted() {
        let utc = TimeZone::UTC;
        // 2026-06-01 is a Monday; the 15th (a Monday) and every Friday match too.
        assert_eq!(
            next("0 9 15 * 5", "2026-06-01T10:00", &utc),
            "2026-06-05T09:00:00"
        );
        assert_eq!(
            next("0 9 2 * 5", "2026-06-01T10:00", &utc),
            "2026-06-02T09:00:00"
        );
        // One side `*`: only the other restricts.
        assert_eq!(
            next("0 9 * * 5", "2026-06-01T10:00", &utc),
            "2026-06-05T09:00:00"
        );
        assert_eq!(
            next("0 9 */10 * *", "2026-06-01T10:00", &utc),
            "2026-06-11T09:00:00"
        );
        // Sunday as 7.
        assert_eq!(
            next("0 0 * * 7", "2026-06-01T10:00", &utc),
            "2026-06-07T00:00:00"
        );
    }

    #[test]
    fn time_zone_and_daylight_saving() {
        let ny = TimeZone::get("America/New_York").unwrap();
        // 2026-03-08 02:30 does not exist in New York: it fires just after the jump.
        assert_eq!(
            next("30 2 * * *", "2026-03-08T00:00", &ny),
            "2026-03-08T03:30:00"
        );
        // 9:00 local is 13:00 UTC in summer, 14:00 in winter.
        let t = Cron::parse("0 9 * * *")
            .unwrap()
            .next_after(at("2026-07-01T10:00", &ny), &ny)
            .unwrap();
        assert_eq!(t.to_string(), "2026-07-02T13:00:00Z");
        // 01:30 happens twice on 2026-11-01: it fires once.
        let first = Cron::parse("30 1 * * *")
            .unwrap()
            .next_after(at("2026-11-01T00:00", &ny), &ny)
            .unwrap();
        let second = Cron::parse("30 1 * * *")
            .unwrap()
            .next_after(first, &ny)
            .unwrap();
        assert_eq!(ny.to_datetime(second).to_string(), "2026-11-02T01:30:00");
    }

    #[test]
    fn bad_expressions_are_named() {
        for (expr, needle) in [
            ("* * * *", "5 fields"),
            ("60 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day-of-month"),
            ("* * * 13 *", "month"),
            ("* * * * 8", "day-of-week"),
            ("*/0 * * * *", "step"),
            ("5-1 * * * *", "backwards"),
            ("a * * * *", "minute"),
            ("1,,2 * * * *", "empty"),
        ] {
            let err = Cron::parse(expr).unwrap_err().to_string();
            assert!(err.contains(needle), "{expr}: {err}");
        }
        assert_eq!(
            first_fire("0 0 30 2 *", 0, &TimeZone::UTC),
            Err(CronError::Never)
        );
    }
}
