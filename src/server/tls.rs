//! The HTTPS listener: rustls on the aws-lc-rs provider (the signer's crypto library), TLS 1.2
//! and 1.3 with rustls's safe defaults, HTTP/1.1 inside. With `server.tls.client_ca` the server
//! asks for a client certificate and verifies it (webpki: chain to one of those CAs, validity,
//! the clientAuth key usage when the certificate names any); a certificate that fails is
//! refused in the handshake, and `require_client_certificate` refuses a handshake without one.
//! With `client_crl`, a certificate of the verified chain (the client's, and any intermediate
//! CA's) that one of those CRLs revokes is refused too, and so is one whose status none of
//! them gives (fail closed: a CA left out of the CRLs would otherwise go unchecked). The CRLs
//! are read again with the rest of the TLS files on reload (SIGHUP).
//! The verified certificate's identity goes with every request of the connection to
//! [`super::auth`], which maps it to a configured client. Its issuer's name counts there only
//! where one of those CAs issued it directly, its signature checked with that CA's own key
//! ([`Issuers`]): webpki links a chain by names, and keeps of a CA it trusts only its name and
//! key (not its path length limit), so any trusted CA could issue an intermediate that bears
//! another trusted CA's name and have it vouch for that CA's subjects. A connection opened before a reload
//! keeps its certificate only while the reloaded configuration accepts it too
//! ([`Tls::still_accepts`], asked once per connection and reload while it is accepted, at each
//! request once it is not): a certificate that the new CRLs revoke, or whose CA was dropped,
//! is refused at the connection's next request, and so is a connection without one where the
//! reloaded configuration requires one. Once a CA certificate the client presented has
//! expired, or a client CRL is past its `nextUpdate`, a kept connection's chain is verified
//! again at each request, reload or not, and refused where a handshake would refuse it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::auth::PeerCertificate;
use crate::config::TlsConfig;
use crate::pem;

/// The HTTPS listener's configuration as one reload replaces it: the acceptor and the client
/// certificate verifier inside it.
pub struct Tls {
    pub acceptor: TlsAcceptor,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    issuers: Arc<Issuers>,
    /// The earliest `nextUpdate` of the client CRLs (Unix seconds): from then a kept
    /// connection's chain is verified again at each request, as a handshake would.
    crls_until_s: Option<u64>,
    /// `require_client_certificate`: a handshake without one is refused.
    requires_certificate: bool,
    /// The server certificate's `notAfter`, Unix seconds (`None`: unreadable).
    not_after_s: Option<u64>,
}

impl Tls {
    /// The server certificate's `notAfter` (Unix seconds): past it every handshake fails.
    pub fn not_after_s(&self) -> Option<u64> {
        self.not_after_s
    }

    /// The earliest `nextUpdate` of the client CRLs (Unix seconds): past it, clients with
    /// certificates are refused until fresh CRLs are reloaded.
    pub fn crls_until_s(&self) -> Option<u64> {
        self.crls_until_s
    }

    /// Whether this configuration refuses a connection without a client certificate.
    pub fn requires_certificate(&self) -> bool {
        self.requires_certificate
    }

    /// Whether a client CRL of this configuration is past its `nextUpdate` at `now_s`: it
    /// says nothing of later revocations, and the handshake refuses the certificates it
    /// covers until a reload brings a fresh one; a kept connection's chain is then verified
    /// again at each request.
    pub fn crls_outdated(&self, now_s: u64) -> bool {
        self.crls_until_s.is_some_and(|until| now_s >= until)
    }

    /// Whether one of this configuration's client CAs issued `leaf` itself
    /// ([`Issuers::issued`]).
    pub fn issued(&self, leaf: &CertificateDer<'_>) -> bool {
        self.issuers.issued(leaf)
    }

    /// Whether this configuration accepts the client certificate `chain` (the client's first,
    /// as its handshake presented it) now, as its handshake would.
    pub fn still_accepts(&self, chain: &[CertificateDer<'static>]) -> bool {
        let (Some(verifier), Some((leaf, intermediates))) = (&self.verifier, chain.split_first())
        else {
            return false;
        };
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .is_ok()
    }
}

/// The rustls server configuration of `[server.tls]`: refuses to start on a missing or
/// unreadable certificate, key or client CA.
pub fn acceptor(config: &TlsConfig) -> anyhow::Result<Tls> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let (Some(cert_path), Some(key_path)) = (&config.certificate, &config.key) else {
        bail!("server.https_listen needs server.tls.certificate and server.tls.key");
    };
    let chain = pem::certificates(cert_path).context("server.tls.certificate")?;
    let not_after_s = chain.first().and_then(|cert| {
        use der::Decode;
        let cert = x509_cert::Certificate::from_der(cert).ok()?;
        Some(
            cert.tbs_certificate()
                .validity()
                .not_after
                .to_unix_duration()
                .as_secs(),
        )
    });
    let key = pem::service_private_key(key_path).context("server.tls.key")?;

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let mut client_verifier = None;
    let mut issuers = Issuers::default();
    let mut crls_until_s = None;
    let builder = if config.client_ca.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for path in &config.client_ca {
            for cert in pem::certificates(path).context("server.tls.client_ca")? {
                issuers.add(&cert, &provider).with_context(|| {
                    format!(
                        "server.tls.client_ca: {} is not a usable CA",
                        path.display()
                    )
                })?;
                roots.add(cert).with_context(|| {
                    format!(
                        "server.tls.client_ca: {} is not a usable CA",
                        path.display()
                    )
                })?;
            }
        }
        let mut crls = Vec::new();
        for path in &config.client_crl {
            crls.extend(pem::crls(path).context("server.tls.client_crl")?);
        }
        // Kept connections are verified again once the earliest passes: a CRL whose
        // nextUpdate cannot be read here would never have them verified again.
        crls_until_s = crls
            .iter()
            .map(next_update_s)
            .collect::<anyhow::Result<Vec<_>>>()
            .context("server.tls.client_crl")?
            .into_iter()
            .flatten()
            .min();
        // A CRL past its nextUpdate says nothing about later revocations: refused, as one
        // missing is (reload with a fresh one).
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .with_crls(crls)
            .enforce_revocation_expiration();
        let verifier = match config.require_client_certificate {
            true => verifier,
            false => verifier.allow_unauthenticated(),
        };
        let verifier = verifier
            .build()
            .context("server.tls.client_ca: cannot build the client verifier")?;
        client_verifier = Some(verifier.clone());
        builder.with_client_cert_verifier(verifier)
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .context("server.tls: the certificate does not fit the key")?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        requires_certificate: client_verifier.is_some() && config.require_client_certificate,
        verifier: client_verifier,
        issuers: Arc::new(issuers),
        crls_until_s,
        not_after_s,
    })
}

/// A CRL's `nextUpdate`, Unix seconds (`None` without one); an error where the CRL cannot be
/// read as RFC 5280 has it.
fn next_update_s(
    crl: &rustls::pki_types::CertificateRevocationListDer<'_>,
) -> anyhow::Result<Option<u64>> {
    crate::pem::crl_next_update_s(crl)
}

/// The client CAs, each with a verifier that trusts it alone: which of them issued a client
/// certificate directly.
#[derive(Default)]
pub struct Issuers {
    cas: Vec<ClientCa>,
}

/// A client CA: its subject and public key (DER), and a verifier that trusts it alone.
struct ClientCa {
    subject: Vec<u8>,
    key: Vec<u8>,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl Issuers {
    fn add(
        &mut self,
        ca: &CertificateDer<'static>,
        provider: &Arc<rustls::crypto::CryptoProvider>,
    ) -> anyhow::Result<()> {
        use der::{Decode, Encode};
        let certificate = x509_cert::Certificate::from_der(ca)?;
        let tbs = certificate.tbs_certificate();
        let subject = tbs.subject().to_der()?;
        let key = tbs.subject_public_key_info().to_der()?;
        // A client is named by its CA's name (certificate_issuer): CAs that share one are one
        // issuer to it, whichever of their keys signed.
        if self
            .cas
            .iter()
            .any(|ca| ca.subject == subject && ca.key != key)
        {
            tracing::warn!(
                ca = %tbs.subject(),
                "two client CAs have this name and different keys: a client configured by \
                 certificate_issuer and certificate_subject takes a certificate from either \
                 (give each CA its own name, unless it is one CA's new key)"
            );
        }
        let mut alone = RootCertStore::empty();
        alone.add(ca.clone())?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(alone), provider.clone())
                .allow_unauthenticated()
                .build()?;
        self.cas.push(ClientCa {
            subject,
            key,
            verifier,
        });
        Ok(())
    }

    /// Whether one of the CAs issued `leaf` itself (not through an intermediate): one whose
    /// subject is the leaf's issuer, byte for byte, and whose key verifies the leaf's
    /// signature (validity and key usage as in the handshake).
    pub fn issued(&self, leaf: &CertificateDer<'_>) -> bool {
        use der::{Decode, Encode};
        let Some(issuer) = x509_cert::Certificate::from_der(leaf)
            .ok()
            .and_then(|c| c.tbs_certificate().issuer().to_der().ok())
        else {
            return false;
        };
        self.cas.iter().any(|ca| {
            ca.subject == issuer
                && ca
                    .verifier
                    .verify_client_cert(leaf, &[], UnixTime::now())
                    .is_ok()
        })
    }
}

/// The TLS handshake on an accepted connection, within `timeout`; `None` when it fails (a
/// refused or missing client certificate, a client that does not speak TLS, a slow one). The
/// identity of the client certificate, when one was verified, comes with the stream.
pub async fn handshake<S>(
    tls: &Tls,
    stream: S,
    timeout: Duration,
) -> Option<(TlsStream<S>, Option<Arc<PeerCertificate>>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, tls.acceptor.accept(stream)).await {
        Ok(Ok(stream)) => {
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .filter(|chain| !chain.is_empty())
                .map(|chain| {
                    let direct = tls.issuers.issued(&chain[0]);
                    Arc::new(PeerCertificate::from_chain(chain, direct))
                });
            Some((stream, peer))
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA named `name`, issued by `issuer` (self-signed when None).
    fn ca(
        name: &str,
        issuer: Option<&(rcgen::CertificateParams, rcgen::KeyPair)>,
    ) -> (
        rcgen::CertificateParams,
        rcgen::KeyPair,
        CertificateDer<'static>,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = match issuer {
            None => params.self_signed(&key).unwrap(),
            Some((issuer_params, issuer_key)) => params
                .signed_by(&key, &rcgen::Issuer::new(issuer_params.clone(), issuer_key))
                .unwrap(),
        };
        (params, key, cert.der().clone())
    }

    /// A client certificate for `subject`, issued by `issuer`.
    fn client(
        subject: &str,
        issuer: &(rcgen::CertificateParams, rcgen::KeyPair),
    ) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, subject);
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &rcgen::Issuer::new(issuer.0.clone(), &issuer.1))
            .unwrap();
        cert.der().clone()
    }

    #[test]
    fn a_crls_next_update_is_read() {
        let (params, key, _) = ca("Client CA", None);
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2026, 1, 1),
            next_update: rcgen::date_time_ymd(2030, 1, 1),
            crl_number: 1u64.into(),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&rcgen::Issuer::new(params, &key))
        .unwrap();
        assert_eq!(next_update_s(crl.der()).unwrap(), Some(1_893_456_000));
        assert!(next_update_s(&vec![0x30, 0x00].into()).is_err());
    }

    #[test]
    fn only_a_client_ca_itself_issues_for_its_name() {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (a_params, a_key, a_der) = ca("Client CA A", None);
        let (b_params, b_key, b_der) = ca("Client CA B", None);
        let mut issuers = Issuers::default();
        issuers.add(&a_der, &provider).unwrap();
        issuers.add(&b_der, &provider).unwrap();
        let a = (a_params, a_key);
        let b = (b_params, b_key);
        assert!(issuers.issued(&client("carol", &a)), "issued by A itself");
        assert!(issuers.issued(&client("dave", &b)), "issued by B itself");
        // B's intermediate named as A: the chain verifies in the handshake (webpki links by
        // names), but A did not issue carol's certificate.
        let (i_params, i_key, i_der) = ca("Client CA A", Some(&b));
        let forged = client("carol", &(i_params, i_key));
        let mut roots = RootCertStore::empty();
        roots.add(a_der.clone()).unwrap();
        roots.add(b_der.clone()).unwrap();
        let handshake = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        assert!(
            handshake
                .verify_client_cert(&forged, &[i_der], UnixTime::now())
                .is_ok(),
            "the forged chain passes the handshake's verification"
        );
        assert!(!issuers.issued(&forged));
        assert!(
            !Issuers::default().issued(&client("carol", &a)),
            "no client CA"
        );
    }
}
