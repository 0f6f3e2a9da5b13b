//! Times and durations as people write them: RFC 3339 instants (`2026-11-27T08:30:00Z`,
//! `2026-11-27T09:30:00.250+01:00`, or a date alone, midnight UTC) and durations
//! (`90d`, `12h`, `30m`, `45s`, `3y` with a year of 365 days). Held as milliseconds
//! since the Unix epoch (UTC).

use crate::error::{Error, Result};
use std::time::{SystemTime, UNIX_EPOCH};

const MS_PER_DAY: i64 = 86_400_000;

/// Now, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) of a day since 1970-01-01 (Howard Hinnant's algorithm).
pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Parse an RFC 3339 instant (or a date alone: midnight UTC). `field` names the input
/// in the error.
pub fn parse_time(text: &str, field: &str) -> Result<i64> {
    let bad = |why: &str| {
        Error::invalid(format!(
            "{field}: {text:?} is not a time ({why}; write e.g. 2026-11-27T08:30:00Z)"
        ))
    };
    let s = text.trim();
    let num = |part: &str, what: &str| -> Result<i64> {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(&format!("the {what} is not a number")));
        }
        part.parse::<i64>()
            .map_err(|_| bad(&format!("the {what} is out of range")))
    };
    if s.len() < 10 || s.as_bytes()[4] != b'-' || s.as_bytes()[7] != b'-' {
        return Err(bad("no YYYY-MM-DD date"));
    }
    let (y, m, d) = (num(&s[0..4], "year")?, num(&s[5..7], "month")?, num(&s[8..10], "day")?);
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return Err(bad("no such date"));
    }
    let mut ms = days_from_civil(y, m, d) * MS_PER_DAY;
    let rest = &s[10..];
    if rest.is_empty() {
        return Ok(ms);
    }
    let rest = rest
        .strip_prefix('T')
        .or_else(|| rest.strip_prefix('t'))
        .or_else(|| rest.strip_prefix(' '))
        .ok_or_else(|| bad("the date is not followed by T and a time"))?;
    if rest.len() < 8 || rest.as_bytes()[2] != b':' || rest.as_bytes()[5] != b':' {
        return Err(bad("no HH:MM:SS time"));
    }
    let (hh, mm, ss) = (
        num(&rest[0..2], "hour")?,
        num(&rest[3..5], "minute")?,
        num(&rest[6..8], "second")?,
    );
    if hh > 23 || mm > 59 || ss > 59 {
        return Err(bad("the time of day is out of range"));
    }
    ms += ((hh * 60 + mm) * 60 + ss) * 1000;
    let mut rest = &rest[8..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("a '.' with no fraction of a second"));
        }
        let millis: String = frac[..digits].chars().chain("000".chars()).take(3).collect();
        ms += num(&millis, "fraction")?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) && rest.as_bytes()[3] == b':' => {
            let (oh, om) = (num(&rest[1..3], "offset hour")?, num(&rest[4..6], "offset minute")?);
            if oh > 23 || om > 59 {
                return Err(bad("the offset is out of range"));
            }
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (oh * 60 + om)
        }
        "" => return Err(bad("no time zone (end with Z for UTC, or +HH:MM)")),
        _ => return Err(bad("the time zone is not Z or +HH:MM")),
    };
    Ok(ms - offset_min * 60_000)
}

/// An instant as RFC 3339 in UTC (`2026-11-27T08:30:00Z`, milliseconds when not zero).
pub fn format_time(ms: i64) -> String {
    let days = ms.div_euclid(MS_PER_DAY);
    let in_day = ms.rem_euclid(MS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let (s, milli) = (in_day / 1000, in_day % 1000);
    let mut out = format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
    if milli != 0 {
        out.push_str(&format!(".{milli:03}"));
    }
    out.push('Z');
    out
}

/// The UTC date of an instant (`2026-11-27`).
pub fn format_day(ms: i64) -> String {
    format_time(ms.div_euclid(MS_PER_DAY) * MS_PER_DAY)[..10].to_owned()
}

/// Parse a duration: a whole number and a unit, s, m, h, d or y (365 days).
pub fn parse_duration(text: &str, field: &str) -> Result<i64> {
    let bad = || {
        Error::invalid(format!(
            "{field}: {text:?} is not a duration (a whole number and s, m, h, d or y, e.g. 90d)"
        ))
    };
    let s = text.trim();
    let unit = s.chars().last().ok_or_else(bad)?;
    let n: i64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let per = match unit {
        's' => 1000,
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => MS_PER_DAY,
        'y' => 365 * MS_PER_DAY,
        _ => return Err(bad()),
    };
    if n <= 0 {
        return Err(Error::invalid(format!("{field}: {text:?} must be longer than zero")));
    }
    n.checked_mul(per).ok_or_else(bad)
}

/// A duration as the shortest of `parse_duration`'s forms that is exact.
pub fn format_duration(ms: i64) -> String {
    for (unit, per) in [
        ('y', 365 * MS_PER_DAY),
        ('d', MS_PER_DAY),
        ('h', 3_600_000),
        ('m', 60_000),
        ('s', 1000),
    ] {
        if ms % per == 0 && ms != 0 {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{}s", ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_and_offsets_apply() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z", "t").unwrap(), 0);
        assert_eq!(parse_time("1970-01-01", "t").unwrap(), 0);
        let t = parse_time("2026-11-27T08:30:05.25Z", "t").unwrap();
        assert_eq!(format_time(t), "2026-11-27T08:30:05.250Z");
        assert_eq!(parse_time("2026-11-27T09:30:05.250+01:00", "t").unwrap(), t);
        assert_eq!(
            parse_time("2024-02-29T23:59:59Z", "t").map(format_time).unwrap(),
            "2024-02-29T23:59:59Z"
        );
        assert_eq!(format_time(-1000), "1969-12-31T23:59:59Z");
        assert_eq!(format_day(t), "2026-11-27");
        for day in [-800_000i64, -1, 0, 59, 365, 11_000, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn bad_times_are_named() {
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2025-02-29",
            "2026-11-27T25:00:00Z",
            "2026-11-27T08:30:00",
            "2026-11-27T08:30:00+5",
        ] {
            let e = parse_time(bad, "capture_time").unwrap_err().to_string();
            assert!(e.contains("capture_time") && e.contains("is not a time"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d", "d").unwrap(), 90 * MS_PER_DAY);
        assert_eq!(parse_duration("3y", "d").unwrap(), 3 * 365 * MS_PER_DAY);
        assert_eq!(parse_duration("45s", "d").unwrap(), 45_000);
        assert_eq!(format_duration(90 * MS_PER_DAY), "90d");
        assert_eq!(format_duration(36 * 3_600_000), "36h");
        for bad in ["", "d", "90", "90w", "-3d", "0d", "1.5d"] {
            assert!(
                parse_duration(bad, "max_stay")
                    .unwrap_err()
                    .to_string()
                    .contains("max_stay"),
                "{bad}"
            );
        }
    }
}
