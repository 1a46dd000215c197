//! PostgreSQL log sequence numbers.
//!
//! An LSN is a byte position in the write-ahead log. PostgreSQL prints it as two
//! hexadecimal halves, `16/B374D848`; this type parses and prints that form so that
//! log lines, headers and SQL all use the notation operators already know.

use std::fmt;
use std::str::FromStr;

/// A position in PostgreSQL's write-ahead log. Ordered, so "later" means "greater".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid position `0/0`, which PostgreSQL reads as "no position".
    pub const ZERO: Lsn = Lsn(0);
    pub const MAX: Lsn = Lsn(u64::MAX);

    /// Distance in bytes from `earlier` to `self`, zero if `earlier` is not earlier.
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text could not be read as `HIGH/LOW` hexadecimal halves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an LSN (expected the form 16/B374D848): {0:?}")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParseLsnError(text.to_owned());
        let (high, low) = text.split_once('/').ok_or_else(error)?;
        let high = u32::from_str_radix(high, 16).map_err(|_| error())?;
        let low = u32::from_str_radix(low, 16).map_err(|_| error())?;
        Ok(Lsn((u64::from(high) << 32) | u64::from(low)))
    }
}

impl From<pgwire_replication::Lsn> for Lsn {
    fn from(lsn: pgwire_replication::Lsn) -> Self {
        Lsn(lsn.as_u64())
    }
}

impl From<Lsn> for pgwire_replication::Lsn {
    fn from(lsn: Lsn) -> Self {
        pgwire_replication::Lsn::from_u64(lsn.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses_postgres_notation() {
        let lsn = Lsn((0x16 << 32) | 0xB374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("16/B374D848".parse::<Lsn>(), Ok(lsn));
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn::ZERO));
    }

    #[test]
    fn rejects_text_that_is_not_an_lsn() {
        for bad in ["", "16", "16/", "/1", "g/1", "1/2/3", "100000000/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn distance_saturates_at_zero() {
        assert_eq!(Lsn(10).bytes_since(Lsn(4)), 6);
        assert_eq!(Lsn(4).bytes_since(Lsn(10)), 0);
    }
}
