//! What every SHA-256 newtype of this crate shares ([`TokenHash`](crate::refresh::TokenHash),
//! [`SubjectHash`](crate::deletion::SubjectHash)).

/// Gives the 32-byte newtype `$name` `from_bytes`, `as_bytes`, constant-time equality
/// (through `subtle`), a `Hash` that agrees with it, and a `Debug` showing the first 4
/// bytes only.
macro_rules! sha256_newtype {
    ($name:ident) => {
        impl $name {
            /// Wraps 32 stored bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The 32 bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                use subtle::ConstantTimeEq;
                self.0.ct_eq(&other.0).into()
            }
        }

        impl Eq for $name {}

        /// Equal hashes (the same bytes) hash alike, as `Eq` requires.
        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                self.0.hash(state);
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "("))?;
                for b in &self.0[..4] {
                    write!(f, "{b:02x}")?;
                }
                write!(f, "…)")
            }
        }
    };
}

pub(crate) use sha256_newtype;
