//! A client's identity: SHA-256 over the certificate's issuer and serial number.
//!
//! Exactly: `SHA-256(issuer ‖ serial)` where
//! - `issuer` is the certificate's `tbsCertificate.issuer` field, the whole DER encoding of the
//!   `Name` (tag `0x30`, length and contents) byte for byte as it appears in the certificate;
//! - `serial` is the contents octets of `tbsCertificate.serialNumber`, the DER `INTEGER` without
//!   its tag and length: big-endian two's complement, so a serial whose first byte is ≥ 0x80
//!   keeps the leading `0x00` the encoding requires.
//!
//! The concatenation needs no separator: a DER `Name` carries its own length, so no two
//! different (issuer, serial) pairs give the same bytes. Including the issuer keeps identities
//! distinct when another CA happens to reuse a serial (seed `003_…`, which used SHA-1 for the
//! same purpose; SHA-256 keeps the property and drops the weak hash).

use sha2::{Digest, Sha256};
use std::fmt;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A client identity: 32 bytes, shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity(pub [u8; 32]);

impl Identity {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.to_hex())
    }
}

/// The identity from its two parts, as defined in this module's documentation.
pub fn identity_from_parts(issuer_der: &[u8], serial_content: &[u8]) -> Identity {
    let mut h = Sha256::new();
    h.update(issuer_der);
    h.update(serial_content);
    Identity(h.finalize().into())
}

/// The identity of a DER certificate. Fails only when the bytes are not an X.509 certificate.
/// It does not verify the certificate: the caller (the TLS layer) has done that.
pub fn client_identity(cert_der: &[u8]) -> Result<Identity, x509_parser::error::X509Error> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| match e {
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
        x509_parser::nom::Err::Incomplete(_) => x509_parser::error::X509Error::InvalidCertificate,
    })?;
    Ok(identity_from_parts(
        cert.tbs_certificate.issuer.as_raw(),
        cert.tbs_certificate.raw_serial(),
    ))
}

/// The identity of the first certificate in a PEM text.
pub fn client_identity_pem(pem: &[u8]) -> Result<Identity, x509_parser::error::X509Error> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|_| x509_parser::error::X509Error::InvalidCertificate)?;
    client_identity(&p.contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_sha256_of_issuer_then_serial() {
        // SHA-256("abc") is a published test vector; the split point must not matter.
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(identity_from_parts(b"ab", b"c").to_hex(), want);
        assert_eq!(identity_from_parts(b"a", b"bc").to_hex(), want);
    }

    #[test]
    fn identity_of_a_certificate_uses_its_issuer_der_and_raw_serial() {
        use rcgen::{CertificateParams, DnType, KeyPair, SerialNumber, PKCS_ECDSA_P384_SHA384};
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "id test");
        // First byte ≥ 0x80: the DER INTEGER must carry a leading zero, and so must the hash.
        params.serial_number = Some(SerialNumber::from_slice(&[0x00, 0x90, 0x01]));
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der().to_vec();
        let (_, parsed) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(parsed.tbs_certificate.raw_serial(), &[0x00, 0x90, 0x01]);
        let issuer = parsed.tbs_certificate.issuer.as_raw();
        assert_eq!(
            issuer[0], 0x30,
            "the issuer is hashed as a whole DER SEQUENCE"
        );
        let mut expect = issuer.to_vec();
        expect.extend_from_slice(&[0x00, 0x90, 0x01]);
        let want = Identity(Sha256::digest(&expect).into());
        assert_eq!(client_identity(&der).unwrap(), want);
        assert_eq!(client_identity_pem(cert.pem().as_bytes()).unwrap(), want);
    }

    #[test]
    fn identity_rejects_what_is_not_a_certificate() {
        assert!(client_identity(b"not a certificate").is_err());
        assert!(client_identity_pem(b"-----BEGIN NOTHING-----").is_err());
    }
}
