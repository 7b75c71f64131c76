//! Timestamps as claudemesh writes them.
//!
//! Every time in a response is an ISO-8601 string with millisecond precision, as
//! JavaScript's `Date.prototype.toISOString()` renders it (`2026-04-07T22:00:00.123Z`).
//! Internally meshd keeps milliseconds since the Unix epoch (`i64`), so this module
//! only formats; nothing here reads a clock.

/// Formats `ms` (milliseconds since the Unix epoch, UTC) like `Date.toISOString()`.
///
/// Years outside 0..=9999 are rendered with a sign and six digits, as JavaScript does.
pub fn iso8601_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss, milli) = (
        rem / 3_600_000,
        (rem / 60_000) % 60,
        (rem / 1000) % 60,
        rem % 1000,
    );
    if !(0..=9999).contains(&y) {
        let year = if y < 0 {
            format!("-{:06}", -y)
        } else {
            format!("+{y:06}")
        };
        return format!("{year}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{milli:03}Z");
    }
    // The common case, on every push: fixed width, no formatting machinery.
    let mut out = [0u8; 24];
    let mut put = |at: usize, v: i64, width: usize| {
        let mut v = v;
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, y, 4);
    put(5, i64::from(m), 2);
    put(8, i64::from(d), 2);
    put(11, hh, 2);
    put(14, mm, 2);
    put(17, ss, 2);
    put(20, milli, 3);
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ] {
        out[i] = c;
    }
    out.iter().map(|&b| b as char).collect()
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
/// Howard Hinnant's `civil_from_days`, exact for the whole `i64` day range we use.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::iso8601_ms;

    #[test]
    fn matches_javascript_to_iso_string() {
        // Values checked against `new Date(x).toISOString()` in node.
        assert_eq!(iso8601_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601_ms(1_775_599_200_123), "2026-04-07T22:00:00.123Z");
        assert_eq!(iso8601_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(iso8601_ms(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(
            iso8601_ms(253_402_300_800_000),
            "+010000-01-01T00:00:00.000Z"
        );
    }
}
