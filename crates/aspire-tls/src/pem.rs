//! Reading PEM text into what rustls takes, with messages that say what was expected.
//! Shared by the server's SSL config file and the router's client flags.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// The one crypto provider Aspire uses (aws-lc-rs), passed explicitly everywhere so
/// nothing depends on rustls's process-wide default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in `pem`, in order; at least one.
pub(crate) fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM ({e}); expected -----BEGIN CERTIFICATE----- blocks"))?;
    if certs.is_empty() {
        return Err(
            "holds no certificate; expected one or more -----BEGIN CERTIFICATE----- blocks".into(),
        );
    }
    Ok(certs)
}

/// The private key in `pem` (PKCS#8, PKCS#1 or SEC1).
pub(crate) fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        format!(
            "holds no usable private key ({e}); expected a -----BEGIN PRIVATE KEY----- \
             (or RSA / EC PRIVATE KEY) block"
        )
    })
}

/// A trust store of the CA certificates in `pem`.
pub(crate) fn root_store(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in certificates(pem)?.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("certificate {} is not a usable CA certificate: {e}", i + 1))?;
    }
    Ok(roots)
}

/// Checks that `key` belongs to the first certificate of `chain`; the error says which
/// of the two is at fault when it can tell.
pub(crate) fn check_pair(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<(), String> {
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("the private key cannot be used: {e}"))?;
    let certified = CertifiedKey::new(chain.to_vec(), signing);
    match certified.keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(
            "the private key does not match the certificate (the first certificate must be \
             the one the key was made for)"
                .into(),
        ),
        // The provider cannot derive a public key from this key type: nothing to compare.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(e) => Err(format!("the certificate cannot be read: {e}")),
    }
}
