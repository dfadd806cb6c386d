//! Positions given on the command line: `--from`, `--to` and `--since` take `earliest`,
//! `latest`, an offset, an RFC 3339 time with any offset, or a time ago (`-15m`).

use crate::proto::v1 as pb;

use super::error::CliError;

/// A time as milliseconds since the epoch: RFC 3339 with any offset
/// (`2026-11-28T10:00:00+01:00`, `…Z`; a space for the `T` and no offset, meaning UTC, are
/// accepted too), or a time ago (`-15m`, `-2h`, `-1d`, `-90s`).
pub fn parse_time_ms(s: &str) -> Result<i64, String> {
    let since_epoch = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    if let Some(ago) = s.strip_prefix('-') {
        let d = humantime::parse_duration(ago).map_err(|e| e.to_string())?;
        return Ok(since_epoch(std::time::SystemTime::now()) - d.as_millis() as i64);
    }
    use time::format_description::well_known::Rfc3339;
    match time::OffsetDateTime::parse(s, &Rfc3339) {
        Ok(t) => Ok((t.unix_timestamp_nanos() / 1_000_000) as i64),
        Err(strict) => humantime::parse_rfc3339_weak(s)
            .map(since_epoch)
            .map_err(|_| strict.to_string()),
    }
}

/// `--from`: earliest, latest, an offset, an RFC 3339 time or a time ago.
pub fn parse_start(from: &str) -> Result<pb::StartPosition, CliError> {
    use pb::start_position::Kind;
    let kind = match from {
        "earliest" => Kind::Earliest(true),
        "latest" => Kind::Latest(true),
        s if s.bytes().all(|b| b.is_ascii_digit()) => Kind::Offset(
            s.parse()
                .map_err(|e| CliError::Usage(format!("bad offset {s:?}: {e}")))?,
        ),
        s => Kind::TimestampMs(parse_time_ms(s).map_err(|e| {
            CliError::Usage(format!(
                "--from {s:?} is not earliest, latest, an offset, an RFC 3339 time or a time \
                 ago like -15m: {e}"
            ))
        })?),
    };
    Ok(pb::StartPosition { kind: Some(kind) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_take_any_rfc3339_offset_and_relative_forms() {
        let at = |s: &str| parse_time_ms(s).unwrap();
        // 2026-11-28T09:00:00Z
        let nine_utc = 1_795_856_400_000;
        let cases = [
            ("2026-11-28T09:00:00Z", nine_utc),
            ("2026-11-28T10:00:00+01:00", nine_utc),
            ("2026-11-28T04:30:00-04:30", nine_utc),
            ("2026-11-28T09:00:00.250Z", nine_utc + 250),
            ("2026-11-28 09:00:00", nine_utc),
        ];
        for (s, want) in cases {
            assert_eq!(at(s), want, "{s}");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for (s, ago) in [("-15m", 900_000), ("-2h", 7_200_000), ("-1d", 86_400_000)] {
            let t = at(s);
            assert!(
                (now - ago - 5_000..=now - ago + 5_000).contains(&t),
                "{s}: {t}"
            );
        }
        for bad in ["yesterday", "-", "-5 parsecs", "2026-13-01T00:00:00Z"] {
            assert!(parse_time_ms(bad).is_err(), "{bad}");
            assert!(parse_start(bad).is_err(), "{bad}");
        }
    }
}
