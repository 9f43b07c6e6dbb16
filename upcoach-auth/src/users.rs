//! Users and their linked provider identities (being built).
