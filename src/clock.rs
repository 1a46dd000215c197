//! Wall-clock time as the relay and PostgreSQL count it.

use std::time::{SystemTime, UNIX_EPOCH};

/// PostgreSQL's epoch (2000-01-01) in Unix microseconds: commit times in the replication
/// stream count from it.
pub const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Now, in Unix microseconds (0 if the clock is before 1970).
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A PostgreSQL timestamp (microseconds since 2000-01-01) in Unix microseconds.
pub fn from_postgres(micros: i64) -> i64 {
    micros + POSTGRES_EPOCH_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_time_zero_is_the_year_2000() {
        assert_eq!(from_postgres(0), 946_684_800 * 1_000_000);
        assert!(now_micros() > from_postgres(0));
    }
}
