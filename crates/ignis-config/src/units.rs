//! Human-friendly sizes (`64MiB`) and durations (`250ms`) with their position in the file.

use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

#[derive(Deserialize)]
#[serde(untagged)]
enum Repr {
    Int(i64),
    Str(String),
}

/// A byte count written as an integer or as `512KiB`, `64MiB`, `1GiB`, `10MB`, `100B`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteSize {
    /// The value in bytes.
    pub bytes: u64,
    /// Where it was written in the manifest.
    pub span: Range<usize>,
}

/// A duration written as `250ms`, `5s`, `2m`, `100us`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HumanDuration {
    /// The value.
    pub duration: Duration,
    /// Where it was written in the manifest.
    pub span: Range<usize>,
}

fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let n = s[..end].parse().ok()?;
    Some((n, s[end..].trim()))
}

/// Parses `64MiB`-style sizes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("`{s}` is not a size like 512KiB, 64MiB or 1GiB");
    let (n, unit) = split_number(s).ok_or_else(err)?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(err()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses `250ms`-style durations.
///
/// At most [`MAX_DURATION`]: every duration in the manifest is added to the
/// current time somewhere (deadlines, timeouts), and a sum past the clock's
/// range would panic at the first request instead of failing at load.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("`{s}` is not a duration like 100us, 250ms, 5s or 2m");
    let (n, unit) = split_number(s).ok_or_else(err)?;
    let d = match unit {
        "us" | "µs" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
        _ => return Err(err()),
    };
    if d > MAX_DURATION {
        return Err(format!(
            "`{s}` is longer than 24h, the longest duration Ignis accepts"
        ));
    }
    Ok(d)
}

/// The longest duration the manifest accepts (24 hours).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Spanned::<Repr>::deserialize(d)?;
        let span = v.span();
        let bytes = match v.into_inner() {
            Repr::Int(n) => {
                u64::try_from(n).map_err(|_| de::Error::custom("a size cannot be negative"))?
            }
            Repr::Str(s) => parse_size(&s).map_err(de::Error::custom)?,
        };
        Ok(ByteSize { bytes, span })
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Spanned::<Repr>::deserialize(d)?;
        let span = v.span();
        let duration = match v.into_inner() {
            Repr::Int(_) => {
                return Err(de::Error::custom(
                    "write durations with a unit, like \"250ms\" or \"5s\"",
                ));
            }
            Repr::Str(s) => parse_duration(&s).map_err(de::Error::custom)?,
        };
        Ok(HumanDuration { duration, span })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("ms").is_err());
        assert_eq!(parse_duration("1440m"), Ok(MAX_DURATION));
        // Would overflow `Instant::now() + d` at the first request.
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("86401s").is_err());
    }
}
