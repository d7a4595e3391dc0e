//! `Lsn`: a WAL position as PostgreSQL prints it (`16/B374D848`).

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Bytes from `self` forward to `ahead`, zero when `ahead` is not ahead.
    pub fn bytes_until(self, ahead: Lsn) -> u64 {
        ahead.0.saturating_sub(self.0)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid LSN {s:?}"))?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| format!("invalid LSN {s:?}"))?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| format!("invalid LSN {s:?}"))?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        assert!("zz".parse::<Lsn>().is_err());
    }

    #[test]
    fn distance_saturates() {
        assert_eq!(Lsn(10).bytes_until(Lsn(30)), 20);
        assert_eq!(Lsn(30).bytes_until(Lsn(10)), 0);
    }
}
