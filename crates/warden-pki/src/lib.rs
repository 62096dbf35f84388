//! # warden-pki — warden's certificate authority
//!
//! What `warden pki` does, as a library: a self-signed ECDSA P-384 CA, server and client
//! certificates signed by it with ecdsa-with-SHA384, a record of what was issued, a CRL, and the
//! one function every consumer of a client certificate must agree on, [`client_identity`].
//!
//! It is a crate of its own, not a module of `wardend`, because it is offline tooling with no
//! need of the daemon: the CLI uses all of it, while the gateway and the policy use only
//! [`client_identity`] and read the files it writes. Keeping certificate *writing* apart keeps the
//! daemon's dependency tree and its tests lean, and lets the PKI be built and tested on its own.
//!
//! Certificates are built and signed by `rcgen` (on `ring`) and read back with `x509-parser`;
//! what is written here by hand is only what those do not do: the directory layout, the issued
//! index, serial allocation, name checks and durable file writes.
//!
//! What it deliberately does not do: intermediate CAs (seed `003_…` rules them out), RSA or any
//! curve but P-384, OCSP, or encrypted key files (the keys are protected by file mode, 0600, and
//! by the directory they live in).

#![forbid(unsafe_code)]

mod fsutil;
mod identity;
mod names;
mod store;

pub use identity::{client_identity, client_identity_pem, identity_from_parts, Identity};
pub use names::{validate_name, validate_san, NameError};
pub use store::{
    CaInfo, CertInfo, Index, IssueOptions, Kind, Pki, PkiError, CA_CERT, CA_DAYS, CA_KEY,
    CLIENT_DAYS, CRL, CRL_DAYS, DEFAULT_DIR, INDEX, ISSUED_DIR, SERVER_DAYS,
};
