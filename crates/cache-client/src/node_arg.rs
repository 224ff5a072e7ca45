//! [`ToBytes`]: what the SDK accepts as a key or a value.

use bytes::Bytes;

/// A key or value the client can send: owned bytes are moved without copying (`Bytes`,
/// `Vec<u8>`, `String`, `Box<[u8]>`), and anything borrowed that views bytes (`&str`,
/// `&[u8]`, `&String`, `&Vec<u8>`, `&Bytes`, `&[u8; N]`, …) is copied once. So
/// `client.get(&key)` works whatever `key` is, as with the `redis` crate.
///
/// ```
/// use cache_client::ToBytes;
/// let owned = String::from("user:42");
/// assert_eq!(ToBytes::to_bytes(&owned), "user:42");
/// assert_eq!(ToBytes::to_bytes(b"raw".as_slice()), "raw");
/// assert_eq!(owned.to_bytes(), "user:42");
/// ```
pub trait ToBytes {
    /// The bytes to send.
    fn to_bytes(self) -> Bytes;
}

impl ToBytes for Bytes {
    fn to_bytes(self) -> Bytes {
        self
    }
}

impl ToBytes for Vec<u8> {
    fn to_bytes(self) -> Bytes {
        Bytes::from(self)
    }
}

impl ToBytes for String {
    fn to_bytes(self) -> Bytes {
        Bytes::from(self)
    }
}

impl ToBytes for Box<[u8]> {
    fn to_bytes(self) -> Bytes {
        Bytes::from(self)
    }
}

impl<const N: usize> ToBytes for [u8; N] {
    fn to_bytes(self) -> Bytes {
        Bytes::copy_from_slice(&self)
    }
}

impl<T: AsRef<[u8]> + ?Sized> ToBytes for &T {
    fn to_bytes(self) -> Bytes {
        Bytes::copy_from_slice(self.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::ToBytes;
    use bytes::Bytes;

    fn takes(x: impl ToBytes) -> Bytes {
        x.to_bytes()
    }

    #[test]
    fn every_common_form_of_bytes_is_accepted() {
        let s = String::from("k");
        let v = vec![b'k'];
        let b = Bytes::from_static(b"k");
        for got in [
            takes("k"),
            takes(&s),
            takes(s.as_str()),
            takes(s.clone()),
            takes(&v),
            takes(v.as_slice()),
            takes(v.clone()),
            takes(&b),
            takes(b.clone()),
            takes(b"k"),
            takes(*b"k"),
            takes(v.clone().into_boxed_slice()),
        ] {
            assert_eq!(got, "k");
        }
    }
}
