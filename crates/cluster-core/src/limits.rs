//! Request limits, checked before any work is done, by the front ends and again by the
//! core on everything that arrives from a peer.

use crate::error::CoreError;

/// The node's limits on what one request may carry. Over a limit is [`CoreError::TooLarge`] (gRPC
/// `OUT_OF_RANGE`) with a message naming the limit, never a truncation or a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest key, in bytes (default 64 KiB).
    pub max_key_bytes: usize,
    /// Largest value, in bytes (default 8 MiB).
    pub max_value_bytes: usize,
    /// Most keys in one `MultiGet` or entries in one `MultiSet` (default 1024).
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_key_bytes: 64 << 10,
            max_value_bytes: 8 << 20,
            max_batch: 1024,
        }
    }
}

impl Limits {
    /// Largest encoded request the node decodes: one maximal key and value plus 64 KiB of
    /// framing. A batch must fit in it too, so a `MultiSet` carries at most about one maximal
    /// value. Larger messages are refused by the transport with `OUT_OF_RANGE`.
    pub fn max_request_bytes(&self) -> usize {
        self.max_key_bytes + self.max_value_bytes + (64 << 10)
    }

    /// Largest encoded response: a `MultiGet` whose values add up to more is refused with
    /// `OUT_OF_RANGE` (split the batch). Four maximal values' worth, at least 64 MiB.
    pub fn max_response_bytes(&self) -> usize {
        (4 * self.max_request_bytes()).max(64 << 20)
    }

    /// Checks one key.
    pub fn check_key(&self, key: &[u8]) -> Result<(), CoreError> {
        if key.is_empty() {
            return Err(CoreError::Invalid("key must not be empty".into()));
        }
        if key.len() > self.max_key_bytes {
            return Err(CoreError::TooLarge(format!(
                "key of {} bytes is over the limit of {} bytes",
                key.len(),
                self.max_key_bytes
            )));
        }
        Ok(())
    }

    /// Checks one value.
    pub fn check_value(&self, value: &[u8]) -> Result<(), CoreError> {
        if value.len() > self.max_value_bytes {
            return Err(CoreError::TooLarge(format!(
                "value of {} bytes is over the limit of {} bytes",
                value.len(),
                self.max_value_bytes
            )));
        }
        Ok(())
    }

    /// Checks a batch size.
    pub fn check_batch(&self, len: usize) -> Result<(), CoreError> {
        if len == 0 {
            return Err(CoreError::Invalid("batch must not be empty".into()));
        }
        if len > self.max_batch {
            return Err(CoreError::TooLarge(format!(
                "batch of {len} items is over the limit of {}",
                self.max_batch
            )));
        }
        Ok(())
    }
}
