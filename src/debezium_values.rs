//! Column values as Debezium writes them into Kafka headers, for `--preset debezium`.
//!
//! Debezium's PostgreSQL connector turns each column into a Connect value with its default
//! converters (`time.precision.mode=adaptive`, `decimal.handling.mode=precise`,
//! `binary.handling.mode=bytes`), and Kafka Connect's default header converter
//! (`SimpleHeaderConverter`) writes that value as text. The relay receives PostgreSQL's
//! text form from pgoutput; this module rewrites it into those bytes, so that a consumer
//! reading an extra column placed as a header sees the same bytes from either. Checked type
//! by type against Debezium 3.6 with `scripts/debezium-compare` (docs/debezium.md lists
//! what is left different on purpose). A value this module cannot read (a DateStyle other
//! than ISO, infinity, BC dates, multi-dimensional arrays) keeps PostgreSQL's text.

use std::fmt::Write as _;

use base64::Engine as _;

/// How one column's values are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rendering {
    /// PostgreSQL's text form (text, varchar, uuid, integers, json, jsonb, ...).
    Text,
    Boolean,
    /// Days since 1970-01-01 (`io.debezium.time.Date`).
    Date,
    /// Since midnight, in milliseconds for `time(0..3)` (`Time`), else microseconds (`MicroTime`).
    Time {
        micros: bool,
    },
    /// ISO 8601 in UTC, as `ZonedTime` (`14:00:00.5Z`).
    TimeTz,
    /// Since the epoch, in milliseconds for `timestamp(0..3)`, else microseconds.
    Timestamp {
        micros: bool,
    },
    /// ISO 8601 in UTC with the column's fraction digits, as `ZonedTimestamp`.
    TimestampTz {
        digits: u8,
    },
    /// Base64 of the bytes.
    Bytea,
    /// `numeric` without a scale: `VariableScaleDecimal`, a struct of scale and unscaled
    /// two's-complement bytes.
    VariableDecimal,
    /// Java's `Float.toString` / `Double.toString`.
    Float,
    /// A one-dimensional array, as Connect's list rendering: `[1,2]`, `["a",null]`.
    Array(Element),
}

/// How array elements are rendered inside `[...]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// Quoted, with `\` and `"` escaped.
    Quoted,
    /// As they are (integers).
    Plain,
    Boolean,
    Float,
}

/// The rendering of a column of type `type_oid` with modifier `type_modifier`.
pub fn rendering(type_oid: u32, type_modifier: i32) -> Rendering {
    // Precision of time types, -1 when the column has none (default 6).
    let precision = type_modifier;
    let micros = !(0..=3).contains(&precision);
    match type_oid {
        16 => Rendering::Boolean,
        17 => Rendering::Bytea,
        700 | 701 => Rendering::Float,
        1082 => Rendering::Date,
        1083 => Rendering::Time { micros },
        1266 => Rendering::TimeTz,
        1114 => Rendering::Timestamp { micros },
        1184 => Rendering::TimestampTz {
            digits: if precision < 0 { 6 } else { precision.min(6) as u8 },
        },
        1700 if type_modifier < 0 => Rendering::VariableDecimal,
        // text, varchar, bpchar, name, uuid, json, jsonb, char
        1009 | 1015 | 1014 | 1003 | 2951 | 199 | 3807 | 1002 => Rendering::Array(Element::Quoted),
        // int2, int4, int8
        1005 | 1007 | 1016 => Rendering::Array(Element::Plain),
        1000 => Rendering::Array(Element::Boolean),
        1021 | 1022 => Rendering::Array(Element::Float),
        _ => Rendering::Text,
    }
}

/// `text` (PostgreSQL's text form) rendered as Debezium writes it; `None` when it cannot
/// be read, and the caller keeps PostgreSQL's text.
pub fn render(rendering: Rendering, text: &str) -> Option<String> {
    match rendering {
        Rendering::Text => Some(text.to_owned()),
        Rendering::Boolean => boolean(text).map(|b| b.to_string()),
        Rendering::Date => date_days(text).map(|days| days.to_string()),
        Rendering::Time { micros } => {
            let value = time_micros(text)?;
            Some(if micros { value } else { value / 1000 }.to_string())
        }
        Rendering::TimeTz => time_tz(text),
        Rendering::Timestamp { micros } => {
            let value = timestamp_micros(text)?;
            Some(if micros { value } else { value.div_euclid(1000) }.to_string())
        }
        Rendering::TimestampTz { digits } => timestamp_tz(text, digits),
        Rendering::Bytea => {
            let bytes = bytea(text)?;
            Some(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        Rendering::VariableDecimal => variable_decimal(text),
        Rendering::Float => java_float(text),
        Rendering::Array(element) => array(text, element),
    }
}

fn boolean(text: &str) -> Option<bool> {
    match text {
        "t" => Some(true),
        "f" => Some(false),
        _ => None,
    }
}

/// Days from 1970-01-01 to the civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The civil date of a day count from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYY-MM-DD` (ISO DateStyle, AD) as days since 1970-01-01.
fn date_days(text: &str) -> Option<i64> {
    let mut parts = text.splitn(3, '-');
    // Narrow types: text that is not a date cannot overflow the arithmetic.
    let year: i32 = parts.next()?.parse().ok()?;
    let month: u8 = parts.next()?.parse().ok()?;
    let day: u8 = parts.next()?.parse().ok()?;
    ((1..=12).contains(&month) && (1..=31).contains(&day))
        .then(|| days_from_civil(i64::from(year), i64::from(month), i64::from(day)))
}

/// `HH:MM:SS[.ffffff]` as microseconds since midnight.
fn time_micros(text: &str) -> Option<i64> {
    let (clock, fraction) = text.split_once('.').unwrap_or((text, ""));
    let mut parts = clock.splitn(3, ':');
    let hours = i64::from(parts.next()?.parse::<u8>().ok()?);
    let minutes = i64::from(parts.next()?.parse::<u8>().ok()?);
    let seconds = i64::from(parts.next()?.parse::<u8>().ok()?);
    if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = format!("{fraction:0<6}").parse().ok()?;
    Some(((hours * 60 + minutes) * 60 + seconds) * 1_000_000 + micros)
}

/// Splits a trailing `+HH[:MM[:SS]]` / `-HH...` zone offset off, in seconds east of UTC.
fn split_offset(text: &str) -> Option<(&str, i64)> {
    let at = text.rfind(['+', '-'])?;
    let (value, zone) = text.split_at(at);
    let sign = if zone.starts_with('-') { -1 } else { 1 };
    let mut seconds = 0;
    for (n, part) in zone[1..].split(':').enumerate() {
        let unit = [3600, 60, 1].get(n)?;
        seconds += i64::from(part.parse::<u8>().ok()?) * unit;
    }
    Some((value, sign * seconds))
}

/// `HH:MM:SS[.f]+ZZ` as Java's `ISO_OFFSET_TIME` in UTC: `14:00:00.5Z`.
fn time_tz(text: &str) -> Option<String> {
    let (clock, offset) = split_offset(text)?;
    let day = 86_400 * 1_000_000;
    let micros = (time_micros(clock)? - offset * 1_000_000).rem_euclid(day);
    let seconds = micros / 1_000_000;
    let mut out = format!("{:02}:{:02}:{:02}", seconds / 3600, seconds / 60 % 60, seconds % 60);
    let fraction = micros % 1_000_000;
    if fraction != 0 {
        let digits = format!("{fraction:06}");
        let _ = write!(out, ".{}", digits.trim_end_matches('0'));
    }
    out.push('Z');
    Some(out)
}

/// `YYYY-MM-DD HH:MM:SS[.f]` as microseconds since the epoch.
fn timestamp_micros(text: &str) -> Option<i64> {
    let (date, time) = text.split_once(' ')?;
    date_days(date)?
        .checked_mul(86_400_000_000)?
        .checked_add(time_micros(time)?)
}

/// `YYYY-MM-DD HH:MM:SS[.f]+ZZ` as `ZonedTimestamp`: ISO 8601 in UTC with `digits` digits
/// of fraction (the column's precision, 6 by default).
fn timestamp_tz(text: &str, digits: u8) -> Option<String> {
    let (local, offset) = split_offset(text)?;
    let micros = timestamp_micros(local)?.checked_sub(offset * 1_000_000)?;
    let days = micros.div_euclid(86_400_000_000);
    let in_day = micros.rem_euclid(86_400_000_000);
    let (year, month, day) = civil_from_days(days);
    let seconds = in_day / 1_000_000;
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    );
    if digits > 0 {
        let fraction = format!("{:06}", in_day % 1_000_000);
        let _ = write!(out, ".{}", &fraction[..usize::from(digits)]);
    }
    out.push('Z');
    Some(out)
}

/// bytea's hex output (`\x00ff`) as bytes.
fn bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `numeric` without a scale as Connect renders `VariableScaleDecimal`:
/// `{"scale":N,"value":"<base64 of the unscaled value, two's complement, big-endian>"}`.
fn variable_decimal(text: &str) -> Option<String> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all: Vec<u8> = whole.bytes().chain(fraction.bytes()).collect();
    if all.is_empty() || !all.iter().all(u8::is_ascii_digit) {
        return None; // NaN, Infinity
    }
    let bytes = twos_complement(&all, negative);
    Some(format!(
        "{{\"scale\":{},\"value\":\"{}\"}}",
        fraction.len(),
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// The decimal digits `digits` (ASCII), negated if `negative`, as Java's
/// `BigInteger.toByteArray`: minimal two's-complement bytes, big-endian.
fn twos_complement(digits: &[u8], negative: bool) -> Vec<u8> {
    // Magnitude, little-endian base 256, by repeated division of the decimal digits.
    let mut decimal: Vec<u32> = digits.iter().map(|d| u32::from(d - b'0')).collect();
    let mut little = Vec::new();
    while decimal.iter().any(|&d| d != 0) {
        let mut remainder = 0;
        for digit in decimal.iter_mut() {
            let current = remainder * 10 + *digit;
            *digit = current / 256;
            remainder = current % 256;
        }
        little.push(remainder as u8);
    }
    little.push(0); // room for the sign bit
    let mut bytes: Vec<u8> = little.into_iter().rev().collect();
    if negative {
        for byte in bytes.iter_mut() {
            *byte = !*byte;
        }
        for byte in bytes.iter_mut().rev() {
            let (sum, carry) = byte.overflowing_add(1);
            *byte = sum;
            if !carry {
                break;
            }
        }
    }
    // Drop leading bytes that only repeat the sign.
    let sign = if negative { 0xff } else { 0x00 };
    while bytes.len() > 1 && bytes[0] == sign && (bytes[1] & 0x80 == sign & 0x80) {
        bytes.remove(0);
    }
    bytes
}

/// PostgreSQL's `real`/`double precision` text as Java's `Double.toString`: plain for
/// 1e-3 <= |x| < 1e7 (`1.0`, `0.5`), else `1.0E10`; `NaN`, `Infinity`.
fn java_float(text: &str) -> Option<String> {
    let value: f64 = match text {
        "NaN" => return Some("NaN".into()),
        "Infinity" => return Some("Infinity".into()),
        "-Infinity" => return Some("-Infinity".into()),
        _ => text.parse().ok()?,
    };
    if value == 0.0 {
        return Some(if value.is_sign_negative() { "-0.0" } else { "0.0" }.into());
    }
    // The shortest digits that read back as the value, as PostgreSQL prints them.
    let scientific = format!("{:e}", value.abs());
    let (mantissa, exponent) = scientific.split_once('e')?;
    let exponent: i32 = exponent.parse().ok()?;
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if value < 0.0 { "-" } else { "" };
    if (-3..7).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        let (whole, fraction) = if point <= 0 {
            ("0".to_owned(), format!("{}{digits}", "0".repeat((-point) as usize)))
        } else if point as usize >= digits.len() {
            (
                format!("{digits}{}", "0".repeat(point as usize - digits.len())),
                String::new(),
            )
        } else {
            (digits[..point as usize].to_owned(), digits[point as usize..].to_owned())
        };
        let fraction = if fraction.is_empty() { "0".to_owned() } else { fraction };
        Some(format!("{sign}{whole}.{fraction}"))
    } else {
        let (first, rest) = digits.split_at(1);
        let rest = if rest.is_empty() { "0" } else { rest };
        Some(format!("{sign}{first}.{rest}E{exponent}"))
    }
}

/// A one-dimensional array's text (`{a,"b c",NULL}`) as Connect renders a list.
fn array(text: &str, element: Element) -> Option<String> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    let mut out = String::from("[");
    let mut chars = inner.chars().peekable();
    let mut first = true;
    while chars.peek().is_some() || (first && !inner.is_empty()) {
        let (value, quoted) = if chars.peek() == Some(&'"') {
            chars.next();
            let mut value = String::new();
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '"' => break,
                    c => value.push(c),
                }
            }
            (value, true)
        } else {
            let mut value = String::new();
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' {
                    return None; // multi-dimensional
                }
                value.push(c);
                chars.next();
            }
            (value, false)
        };
        match chars.next() {
            None | Some(',') => {}
            Some(_) => return None,
        }
        if !first {
            out.push(',');
        }
        first = false;
        if !quoted && value == "NULL" {
            out.push_str("null");
            continue;
        }
        match element {
            Element::Quoted => {
                out.push('"');
                out.push_str(&value.replace('\\', "\\\\").replace('"', "\\\""));
                out.push('"');
            }
            Element::Plain => out.push_str(&value),
            Element::Boolean => out.push_str(&boolean(&value)?.to_string()),
            Element::Float => out.push_str(&java_float(&value)?),
        }
    }
    out.push(']');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values and what Debezium 3.6 wrote for them (scripts/debezium-compare, 2026-11-29).
    #[test]
    fn values_render_as_debezium_wrote_them() {
        let cases: [(Rendering, &str, &str); 22] = [
            (
                Rendering::TimestampTz { digits: 6 },
                "2026-11-29 16:00:00.123456+00",
                "2026-11-29T16:00:00.123456Z",
            ),
            (
                Rendering::TimestampTz { digits: 6 },
                "1969-07-20 20:17:40+00",
                "1969-07-20T20:17:40.000000Z",
            ),
            (
                Rendering::TimestampTz { digits: 6 },
                "2026-11-30 01:30:00+05:30",
                "2026-11-29T20:00:00.000000Z",
            ),
            (
                Rendering::Timestamp { micros: true },
                "2026-11-29 16:00:00.123456",
                "1795968000123456",
            ),
            (
                Rendering::Timestamp { micros: true },
                "1969-07-20 20:17:40",
                "-14182940000000",
            ),
            (Rendering::Date, "2026-11-29", "20786"),
            (Rendering::Date, "1969-07-20", "-165"),
            (Rendering::Time { micros: true }, "16:00:00.123456", "57600123456"),
            (Rendering::Time { micros: true }, "00:00:00", "0"),
            (Rendering::TimeTz, "16:00:00.5+02", "14:00:00.5Z"),
            (Rendering::TimeTz, "23:59:59-05", "04:59:59Z"),
            (Rendering::Boolean, "t", "true"),
            (Rendering::Boolean, "f", "false"),
            (Rendering::Bytea, "\\x00ff10", "AP8Q"),
            (Rendering::Bytea, "\\x", ""),
            (
                Rendering::VariableDecimal,
                "3.14159265358979323846",
                "{\"scale\":20,\"value\":\"EQfV61tbpNfG\"}",
            ),
            (
                Rendering::VariableDecimal,
                "0.0000000001",
                "{\"scale\":10,\"value\":\"AQ==\"}",
            ),
            (
                Rendering::Array(Element::Quoted),
                "{a,\"b c\",\"q\\\"uote\",NULL}",
                "[\"a\",\"b c\",\"q\\\"uote\",null]",
            ),
            (Rendering::Array(Element::Plain), "{1,2,3}", "[1,2,3]"),
            (Rendering::Array(Element::Plain), "{}", "[]"),
            (Rendering::Text, "1234567890.12", "1234567890.12"),
            (
                Rendering::Text,
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            ),
        ];
        for (rendering, text, expected) in cases {
            assert_eq!(
                render(rendering, text).as_deref(),
                Some(expected),
                "{rendering:?} {text}"
            );
        }
    }

    #[test]
    fn negative_unscaled_values_are_twos_complement() {
        // BigInteger.valueOf(-1).toByteArray() = [0xff]; 128 = [0x00, 0x80]; -128 = [0x80].
        assert_eq!(twos_complement(b"1", true), vec![0xff]);
        assert_eq!(twos_complement(b"128", false), vec![0x00, 0x80]);
        assert_eq!(twos_complement(b"128", true), vec![0x80]);
        assert_eq!(twos_complement(b"129", true), vec![0xff, 0x7f]);
        assert_eq!(twos_complement(b"0", false), vec![0x00]);
    }

    #[test]
    fn floats_print_as_java_does() {
        for (text, java) in [
            ("1", "1.0"),
            ("0.5", "0.5"),
            ("1234567", "1234567.0"),
            ("1e+07", "1.0E7"),
            ("0.001", "0.001"),
            ("0.0001", "1.0E-4"),
            ("-3.25e-05", "-3.25E-5"),
            ("NaN", "NaN"),
            ("-Infinity", "-Infinity"),
            ("0", "0.0"),
        ] {
            assert_eq!(java_float(text).as_deref(), Some(java), "{text}");
        }
    }

    #[test]
    fn dates_round_trip_through_day_counts() {
        for days in [-719_468, -165, 0, 20_786, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn unreadable_values_are_left_to_the_caller() {
        assert_eq!(render(Rendering::TimestampTz { digits: 6 }, "infinity"), None);
        assert_eq!(render(Rendering::Date, "2026-11-29 BC"), None);
        assert_eq!(render(Rendering::Array(Element::Plain), "{{1,2},{3,4}}"), None);
        assert_eq!(render(Rendering::VariableDecimal, "NaN"), None);
        // Text that is not what the type prints never overflows or panics.
        assert_eq!(
            render(Rendering::Timestamp { micros: true }, "9999999999-01-01 00:00:00"),
            None
        );
        assert_eq!(render(Rendering::Time { micros: true }, "99999999999:00:00"), None);
        assert_eq!(render(Rendering::TimeTz, "10:00:00+99999999999"), None);
        assert_eq!(
            render(Rendering::TimestampTz { digits: 6 }, "2026-13-01 00:00:00+00"),
            None
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5_000))]

        /// Whatever text arrives for a column, rendering answers or declines; it never panics.
        #[test]
        fn arbitrary_text_never_panics(text in r#"[0-9:.+ {},"\\NULLTfx-]{0,40}|.{0,40}"#, kind in 0usize..12) {
            let renderings = [
                Rendering::Boolean,
                Rendering::Date,
                Rendering::Time { micros: true },
                Rendering::TimeTz,
                Rendering::Timestamp { micros: false },
                Rendering::TimestampTz { digits: 3 },
                Rendering::Bytea,
                Rendering::VariableDecimal,
                Rendering::Float,
                Rendering::Array(Element::Quoted),
                Rendering::Array(Element::Float),
                Rendering::Array(Element::Boolean),
            ];
            let _ = render(renderings[kind], &text);
        }
    }

    #[test]
    fn column_types_choose_their_rendering() {
        assert_eq!(rendering(1184, -1), Rendering::TimestampTz { digits: 6 });
        assert_eq!(rendering(1184, 3), Rendering::TimestampTz { digits: 3 });
        assert_eq!(rendering(1114, 3), Rendering::Timestamp { micros: false });
        assert_eq!(rendering(1700, -1), Rendering::VariableDecimal);
        assert_eq!(rendering(1700, (12 << 16 | 2) + 4), Rendering::Text);
        assert_eq!(rendering(25, -1), Rendering::Text);
    }
}
