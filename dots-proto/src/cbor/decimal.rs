//! decimal64 with two fraction digits (RFC 9132 `ack-timeout`,
//! `ack-random-factor`), carried as a CBOR decimal fraction (tag 4).

use std::fmt;
use std::str::FromStr;

/// A decimal number counted in hundredths: `Decimal::from_hundredths(150)` is 1.50.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decimal(i64);

/// A text that is not a decimal with at most two fraction digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" is not a decimal number with at most 2 fraction digits")]
pub struct ParseDecimalError(pub String);

impl Decimal {
    pub const fn from_hundredths(hundredths: i64) -> Self {
        Self(hundredths)
    }

    pub const fn hundredths(self) -> i64 {
        self.0
    }

    /// The value `mantissa * 10^exponent` of a CBOR decimal fraction, when it
    /// is exact in hundredths and fits; peers may send `4([-1, 15])` for 1.5.
    pub fn from_fraction(mantissa: i128, exponent: i64) -> Option<Self> {
        let shift = exponent.checked_add(2)?;
        let scale = 10i128.checked_pow(u32::try_from(shift.unsigned_abs()).ok()?)?;
        let hundredths = if shift >= 0 {
            mantissa.checked_mul(scale)?
        } else if mantissa % scale == 0 {
            mantissa / scale
        } else {
            return None;
        };
        i64::try_from(hundredths).ok().map(Self)
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl FromStr for Decimal {
    type Err = ParseDecimalError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDecimalError(s.to_owned());
        let (negative, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() || frac.len() > 2 || !all_digits(int) || !all_digits(frac) {
            return Err(err());
        }
        if digits.ends_with('.') {
            return Err(err());
        }
        // i128 so that i64::MIN, whose magnitude exceeds i64::MAX, parses.
        let int: i128 = int.parse().map_err(|_| err())?;
        let frac: i128 = format!("{frac:0<2}").parse().map_err(|_| err())?;
        let abs = int
            .checked_mul(100)
            .and_then(|v| v.checked_add(frac))
            .ok_or_else(err)?;
        i64::try_from(if negative { -abs } else { abs })
            .map(Self)
            .map_err(|_| err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse() {
        for (text, h) in [("2.00", 200), ("1.50", 150), ("0.05", 5), ("-1.25", -125)] {
            assert_eq!(Decimal::from_hundredths(h).to_string(), text);
            assert_eq!(text.parse::<Decimal>(), Ok(Decimal::from_hundredths(h)));
        }
        assert_eq!("2".parse::<Decimal>(), Ok(Decimal::from_hundredths(200)));
        assert_eq!("1.5".parse::<Decimal>(), Ok(Decimal::from_hundredths(150)));
        for extreme in [i64::MIN, i64::MAX] {
            let d = Decimal::from_hundredths(extreme);
            assert_eq!(d.to_string().parse::<Decimal>(), Ok(d));
        }
        assert!(
            "92233720368547758.08".parse::<Decimal>().is_err(),
            "overflow"
        );
        for bad in ["", "1.505", "1.", ".5", "a", "1e2", "--1", "1.-5"] {
            assert!(bad.parse::<Decimal>().is_err(), "{bad}");
        }
    }

    #[test]
    fn fractions_normalise_to_hundredths() {
        assert_eq!(
            Decimal::from_fraction(200, -2),
            Some(Decimal::from_hundredths(200))
        );
        assert_eq!(
            Decimal::from_fraction(15, -1),
            Some(Decimal::from_hundredths(150))
        );
        assert_eq!(
            Decimal::from_fraction(3, 0),
            Some(Decimal::from_hundredths(300))
        );
        assert_eq!(
            Decimal::from_fraction(1500, -3),
            Some(Decimal::from_hundredths(150))
        );
        assert_eq!(Decimal::from_fraction(1505, -3), None, "not exact");
        assert_eq!(Decimal::from_fraction(1, 40), None, "overflow");
        assert_eq!(Decimal::from_fraction(1, i64::MIN), None);
    }
}
