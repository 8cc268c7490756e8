//! Kubernetes resource quantities (`100m`, `128Mi`, `1.5`, `2e3`), parsed only far
//! enough to reject what the API server would reject and to compare a request with
//! its limit. The original text is what goes into the pod.

use std::cmp::Ordering;
use std::fmt;

/// Longest quantity text accepted; the API server's own limit is far below this
/// once the value must fit in an int64 of milli-units.
const MAX_LEN: usize = 64;

/// Nano-units per unit: the finest resolution kept when comparing quantities.
const NANO: u128 = 1_000_000_000;

/// A validated, non-negative resource quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Quantity {
    text: String,
    /// The value in nano-units, rounded up.
    nanos: u128,
}

/// Why a quantity was refused; the message is shown to the user in a denial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QuantityError(&'static str);

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Quantity {
    /// Parses `text` with the grammar of `k8s.io/apimachinery/pkg/api/resource`:
    /// a decimal number followed by a binary-SI suffix (`Ki` … `Ei`), a decimal-SI
    /// suffix (`n u m k M G T P E`) or a decimal exponent (`e3`, `E-2`).
    pub(crate) fn parse(text: &str) -> Result<Self, QuantityError> {
        if text.is_empty() {
            return Err(QuantityError("is empty"));
        }
        if text.len() > MAX_LEN {
            return Err(QuantityError("is too long"));
        }
        let body = match text.as_bytes()[0] {
            b'-' => return Err(QuantityError("is negative")),
            b'+' => &text[1..],
            _ => text,
        };
        let digits_end = body
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(body.len());
        let (number, suffix) = body.split_at(digits_end);
        let (int_part, frac_part) = match number.split_once('.') {
            Some((i, f)) => (i, f),
            None => (number, ""),
        };
        if frac_part.contains('.') {
            return Err(QuantityError("has more than one decimal point"));
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(QuantityError("does not start with a number"));
        }
        let scale = Scale::parse(suffix)?;

        // mantissa = int_part.frac_part as an integer with `frac_len` implied decimals.
        let mut mantissa: u128 = 0;
        for c in int_part.bytes().chain(frac_part.bytes()) {
            mantissa = mantissa
                .checked_mul(10)
                .and_then(|m| m.checked_add(u128::from(c - b'0')))
                .ok_or(QuantityError("is too large"))?;
        }
        let frac_len = i32::try_from(frac_part.len()).map_err(|_| QuantityError("is too long"))?;
        let nanos = scale
            .apply(mantissa, frac_len)
            .ok_or(QuantityError("is too large"))?;
        Ok(Quantity {
            text: text.to_owned(),
            nanos,
        })
    }

    /// The text as the user wrote it.
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }
}

impl Quantity {
    /// Compares the values only (`1Gi` equals `1073741824`).
    pub(crate) fn value_cmp(&self, other: &Self) -> Ordering {
        self.nanos.cmp(&other.nanos)
    }
}

/// The multiplier a suffix stands for.
enum Scale {
    /// A power of two (binary SI).
    Binary(u32),
    /// A power of ten (decimal SI or exponent).
    Decimal(i32),
}

impl Scale {
    fn parse(suffix: &str) -> Result<Self, QuantityError> {
        Ok(match suffix {
            "" => Scale::Decimal(0),
            "Ki" => Scale::Binary(10),
            "Mi" => Scale::Binary(20),
            "Gi" => Scale::Binary(30),
            "Ti" => Scale::Binary(40),
            "Pi" => Scale::Binary(50),
            "Ei" => Scale::Binary(60),
            "n" => Scale::Decimal(-9),
            "u" => Scale::Decimal(-6),
            "m" => Scale::Decimal(-3),
            "k" => Scale::Decimal(3),
            "M" => Scale::Decimal(6),
            "G" => Scale::Decimal(9),
            "T" => Scale::Decimal(12),
            "P" => Scale::Decimal(15),
            "E" => Scale::Decimal(18),
            s if s.starts_with(['e', 'E']) => {
                let exp = &s[1..];
                let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(QuantityError("has a malformed exponent"));
                }
                let value: i32 = exp
                    .parse()
                    .map_err(|_| QuantityError("has a malformed exponent"))?;
                if !(-30..=30).contains(&value) {
                    return Err(QuantityError("has an exponent out of range"));
                }
                Scale::Decimal(value)
            }
            _ => {
                return Err(QuantityError(
                    "has an unknown suffix (use e.g. 100m, 0.5, 128Mi, 1Gi)",
                ))
            }
        })
    }

    /// `mantissa × 10^-frac_len × scale`, in nano-units, rounded up.
    fn apply(&self, mantissa: u128, frac_len: i32) -> Option<u128> {
        match *self {
            Scale::Binary(bits) => {
                let scaled = mantissa.checked_mul(1u128 << bits)?.checked_mul(NANO)?;
                div_pow10_ceil(scaled, frac_len)
            }
            Scale::Decimal(exp) => {
                // nanos = mantissa × 10^(exp + 9 - frac_len)
                let shift = exp.checked_add(9)?.checked_sub(frac_len)?;
                if shift >= 0 {
                    mantissa.checked_mul(10u128.checked_pow(u32::try_from(shift).ok()?)?)
                } else {
                    div_pow10_ceil(mantissa, -shift)
                }
            }
        }
    }
}

/// `value / 10^places`, rounded up; `None` only when `places` is absurd.
fn div_pow10_ceil(value: u128, places: i32) -> Option<u128> {
    let places = u32::try_from(places).ok()?;
    if places > 38 {
        return Some(u128::from(value != 0));
    }
    let div = 10u128.pow(places);
    Some(value.div_ceil(div))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nanos(s: &str) -> u128 {
        match Quantity::parse(s) {
            Ok(q) => q.nanos,
            Err(e) => panic!("{s:?} was refused: {e}"),
        }
    }

    #[test]
    fn accepts_the_usual_forms() {
        assert_eq!(nanos("100m"), 100_000_000);
        assert_eq!(nanos("0.1"), 100_000_000);
        assert_eq!(nanos("1"), NANO);
        assert_eq!(nanos("+2"), 2 * NANO);
        assert_eq!(nanos("128Mi"), 128 * (1 << 20) * NANO);
        assert_eq!(nanos("1Gi"), nanos("1073741824"));
        assert_eq!(nanos("1.5Gi"), nanos("1536Mi"));
        assert_eq!(nanos("1k"), nanos("1e3"));
        assert_eq!(nanos("1E3"), nanos("1000"));
        assert_eq!(nanos("2e-3"), nanos("2m"));
        assert_eq!(nanos(".5"), nanos("500m"));
        assert_eq!(nanos("5."), nanos("5"));
        assert_eq!(nanos("1n"), 1);
        assert_eq!(nanos("1.5n"), 2, "below a nano rounds up");
        assert_eq!(nanos("0"), 0);
    }

    #[test]
    fn refuses_what_the_api_server_refuses() {
        for bad in [
            "",
            "-1",
            "abc",
            "1x",
            "1KiB",
            "1 Gi",
            "1..2",
            "1.2.3",
            "Mi",
            ".",
            "1e",
            "1e+",
            "1e3.5",
            "1ee3",
            "1e99",
            "99999999999999999999999999999999999999999Ei",
        ] {
            assert!(Quantity::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    fn q(s: &str) -> Quantity {
        match Quantity::parse(s) {
            Ok(q) => q,
            Err(e) => panic!("{s:?} was refused: {e}"),
        }
    }

    #[test]
    fn compares_values_not_text() {
        assert_eq!(q("1Gi").value_cmp(&q("1024Mi")), Ordering::Equal);
        assert_eq!(q("1G").value_cmp(&q("1Gi")), Ordering::Less);
        assert_eq!(q("1500m").value_cmp(&q("1")), Ordering::Greater);
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            if let Ok(q) = Quantity::parse(&s) {
                prop_assert_eq!(q.as_str(), s.as_str());
            }
        }

        #[test]
        fn milli_and_units_agree(n in 0u64..1_000_000) {
            prop_assert_eq!(nanos(&format!("{n}")), nanos(&format!("{}m", u128::from(n) * 1000)));
        }
    }
}
