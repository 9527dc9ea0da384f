//! GeneralizedTime with fractional seconds, as RFC 3161 writes genTime.
//!
//! `der`'s own GeneralizedTime accepts whole seconds only. DER (X.690 11.7) fixes the form:
//! `YYYYMMDDHHMMSS[.f+]Z`, the fraction without trailing zeros and omitted when zero.

use chrono::{DateTime, Datelike, NaiveDate, Timelike};
use der::{DecodeValue, EncodeValue, ErrorKind, FixedTag, Header, Length, Reader, Tag, Writer};

/// How many fractional digits genTime carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Seconds,
    Millis,
    #[default]
    Micros,
    Nanos,
}

impl Precision {
    /// Nanoseconds in one unit of this precision.
    pub fn unit_ns(self) -> u64 {
        match self {
            Self::Seconds => 1_000_000_000,
            Self::Millis => 1_000_000,
            Self::Micros => 1_000,
            Self::Nanos => 1,
        }
    }
}

/// A genTime: nanoseconds since the Unix epoch, always in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GenTime {
    unix_ns: u64,
}

const MAX_LEN: usize = "YYYYMMDDHHMMSS.nnnnnnnnnZ".len();

impl GenTime {
    /// The latest value at `precision` that is not after `unix_ns`: truncation, so that the
    /// encoded time is never ahead of the clock reading it came from.
    pub fn truncated(unix_ns: u64, precision: Precision) -> Self {
        let unit = precision.unit_ns();
        Self {
            unix_ns: unix_ns - unix_ns % unit,
        }
    }

    pub fn from_unix_ns(unix_ns: u64) -> Self {
        Self { unix_ns }
    }

    pub fn unix_ns(self) -> u64 {
        self.unix_ns
    }

    pub fn to_datetime(self) -> DateTime<chrono::Utc> {
        DateTime::from_timestamp_nanos(self.unix_ns as i64)
    }

    /// The DER text, written into a fixed buffer (no allocation on the issuing path).
    fn write(self, buf: &mut [u8; MAX_LEN]) -> usize {
        let dt = self.to_datetime();
        let fields = [
            (dt.year() as u32 / 100, 2),
            (dt.year() as u32 % 100, 2),
            (dt.month(), 2),
            (dt.day(), 2),
            (dt.hour(), 2),
            (dt.minute(), 2),
            (dt.second(), 2),
        ];
        let mut n = 0;
        for (value, width) in fields {
            write_digits(&mut buf[n..n + width], value);
            n += width;
        }
        if let Some((fraction, digits)) = self.fraction() {
            buf[n] = b'.';
            write_digits(&mut buf[n + 1..n + 1 + digits], fraction);
            n += 1 + digits;
        }
        buf[n] = b'Z';
        n + 1
    }

    /// The fractional seconds without trailing zeros, and how many digits they take; `None`
    /// for a whole second (DER writes neither the point nor trailing zeros).
    fn fraction(self) -> Option<(u32, usize)> {
        let mut nanos = (self.unix_ns % 1_000_000_000) as u32;
        if nanos == 0 {
            return None;
        }
        let mut digits = 9;
        while nanos % 10 == 0 {
            nanos /= 10;
            digits -= 1;
        }
        Some((nanos, digits))
    }

    /// The length of the DER text, without writing it: `YYYYMMDDhhmmss`, the fraction, `Z`.
    fn text_len(self) -> usize {
        14 + self.fraction().map_or(0, |(_, digits)| 1 + digits) + 1
    }

    fn parse(text: &[u8]) -> Option<Self> {
        let (body, rest) = text.split_at_checked(14)?;
        if !body.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let num = |range: std::ops::Range<usize>| -> u32 {
            body[range]
                .iter()
                .fold(0, |acc, d| acc * 10 + u32::from(d - b'0'))
        };
        let mut nanos = 0u32;
        let rest = match rest.split_first()? {
            (b'.', fraction_and_z) => {
                let (z, fraction) = fraction_and_z.split_last()?;
                let valid = *z == b'Z'
                    && (1..=9).contains(&fraction.len())
                    && fraction.iter().all(u8::is_ascii_digit)
                    && fraction.last() != Some(&b'0');
                if !valid {
                    return None;
                }
                for (i, d) in fraction.iter().enumerate() {
                    nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
                }
                &[][..]
            }
            (b'Z', rest) => rest,
            _ => return None,
        };
        if !rest.is_empty() {
            return None;
        }
        let date = NaiveDate::from_ymd_opt(num(0..4) as i32, num(4..6), num(6..8))?;
        let time = date.and_hms_nano_opt(num(8..10), num(10..12), num(12..14), nanos)?;
        let unix_ns = time.and_utc().timestamp_nanos_opt()?;
        Some(Self {
            unix_ns: u64::try_from(unix_ns).ok()?,
        })
    }
}

fn write_digits(out: &mut [u8], mut value: u32) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

impl std::fmt::Display for GenTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = [0; MAX_LEN];
        let n = self.write(&mut buf);
        f.write_str(std::str::from_utf8(&buf[..n]).expect("ASCII"))
    }
}

impl FixedTag for GenTime {
    const TAG: Tag = Tag::GeneralizedTime;
}

impl EncodeValue for GenTime {
    fn value_len(&self) -> der::Result<Length> {
        Length::try_from(self.text_len())
    }

    fn encode_value(&self, writer: &mut impl Writer) -> der::Result<()> {
        let mut buf = [0; MAX_LEN];
        let n = self.write(&mut buf);
        writer.write(&buf[..n])
    }
}

impl<'a> DecodeValue<'a> for GenTime {
    type Error = der::Error;

    fn decode_value<R: Reader<'a>>(reader: &mut R, header: Header) -> der::Result<Self> {
        let len = usize::try_from(header.length())?;
        if len > MAX_LEN {
            return Err(ErrorKind::DateTime.into());
        }
        let mut buf = [0; MAX_LEN];
        let text = reader.read_into(&mut buf[..len])?;
        Self::parse(text).ok_or_else(|| ErrorKind::DateTime.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::{Decode, Encode};

    fn text(t: GenTime) -> String {
        t.to_string()
    }

    #[test]
    fn encodes_der_form_without_trailing_zeros() {
        let base = 1_700_000_000u64 * 1_000_000_000;
        assert_eq!(text(GenTime::from_unix_ns(base)), "20231114221320Z");
        assert_eq!(
            text(GenTime::from_unix_ns(base + 120_000_000)),
            "20231114221320.12Z"
        );
        assert_eq!(
            text(GenTime::from_unix_ns(base + 1)),
            "20231114221320.000000001Z"
        );
        assert_eq!(
            text(GenTime::truncated(base + 123_456_789, Precision::Millis)),
            "20231114221320.123Z"
        );
        assert_eq!(
            text(GenTime::truncated(base + 999_999_999, Precision::Seconds)),
            "20231114221320Z"
        );
    }

    #[test]
    fn the_length_is_the_written_length() {
        let mut buf = [0; MAX_LEN];
        for ns in [
            0u64,
            1,
            10,
            120_000_000,
            999_999_999,
            1_700_000_000_123_456_789,
            u64::MAX,
        ] {
            let t = GenTime::from_unix_ns(ns);
            assert_eq!(t.text_len(), t.write(&mut buf), "{ns}");
        }
    }

    #[test]
    fn truncation_never_runs_ahead() {
        for ns in [
            0u64,
            1,
            999,
            1_000,
            1_999_999_999,
            1_700_000_000_123_456_789,
        ] {
            for p in [
                Precision::Seconds,
                Precision::Millis,
                Precision::Micros,
                Precision::Nanos,
            ] {
                let t = GenTime::truncated(ns, p);
                assert!(t.unix_ns() <= ns);
                assert!(ns - t.unix_ns() < p.unit_ns());
            }
        }
    }

    #[test]
    fn der_round_trip() {
        let t = GenTime::from_unix_ns(1_782_000_000_250_000_000);
        let der = t.to_der().unwrap();
        assert_eq!(der[0], 0x18);
        assert_eq!(GenTime::from_der(&der).unwrap(), t);
    }

    #[test]
    fn rejects_non_der_forms() {
        for bad in [
            "20231114221320.0Z",
            "20231114221320.10Z",
            "20231114221320.Z",
            "20231114221320",
            "20231114221320+0100",
            "2023111422132Z",
            "20231314221320Z",
            "20231114221320.1234567891Z",
            "20231114221320,1Z",
        ] {
            let mut der = vec![0x18, bad.len() as u8];
            der.extend_from_slice(bad.as_bytes());
            assert!(GenTime::from_der(&der).is_err(), "{bad} accepted");
        }
    }
}
