//! Serial numbers behind an allocator that can fail.

use aws_lc_rs::rand::{SecureRandom, SystemRandom};

use crate::protocol::Serial;

#[derive(Debug, thiserror::Error)]
#[error("no serial number can be allocated: {0}")]
pub struct SerialError(pub String);

/// Hands out serial numbers that are never reused.
pub trait SerialAllocator: Send + Sync + 'static {
    fn next(&self) -> Result<Serial, SerialError>;
}

/// 20-octet positive serials from the system CSPRNG: 159 random bits, so that two serials
/// collide with probability about n²/2¹⁶⁰ — unique without any state. (The archive replaces
/// these with structured, durable ones.)
pub struct RandomSerials {
    rng: SystemRandom,
}

impl RandomSerials {
    pub fn new() -> Self {
        Self {
            rng: SystemRandom::new(),
        }
    }
}

impl Default for RandomSerials {
    fn default() -> Self {
        Self::new()
    }
}

impl SerialAllocator for RandomSerials {
    fn next(&self) -> Result<Serial, SerialError> {
        let mut bytes = [0u8; 20];
        self.rng
            .fill(&mut bytes)
            .map_err(|_| SerialError("the system random generator failed".into()))?;
        // Positive and exactly 20 octets: high bit clear, first octet non-zero.
        bytes[0] = (bytes[0] & 0x7f).max(1);
        Serial::from_unsigned(&bytes).ok_or_else(|| SerialError("invalid serial".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_twenty_octets_and_distinct() {
        let alloc = RandomSerials::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let s = alloc.next().unwrap();
            assert_eq!(s.as_bytes().len(), 20);
            assert!(s.as_bytes()[0] & 0x80 == 0 && s.as_bytes()[0] != 0);
            assert!(seen.insert(s));
        }
    }
}
