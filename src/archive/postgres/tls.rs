//! TLS for the PostgreSQL archive: tokio-postgres's `MakeTlsConnect` / `TlsConnect` /
//! `TlsStream` over tokio-rustls (rustls on its aws-lc-rs provider, TLS 1.2 and 1.3), with
//! `tls-server-end-point` channel binding for SCRAM-SHA-256-PLUS.
//!
//! What `[archive]` asks for ([`tls_settings`]), by `sslmode` in `postgres_url`:
//!
//! - `postgres_ca` set: every connection is TLS (`prefer`, the default, acts as `require`;
//!   `disable` is refused), and the server's certificate must chain to one of those CAs and
//!   name the host of `postgres_url` (a DNS name or an IP address): libpq's `verify-full`.
//! - `sslmode=require` without `postgres_ca`: refused, unless `postgres_tls_insecure = true`,
//!   which encrypts without authenticating the server (anyone on the path who can answer for
//!   the database's address receives the archive).
//! - `sslmode=prefer` without `postgres_ca`: as libpq, TLS when the server offers it, without
//!   authenticating it, else plain.
//! - `sslmode=disable`: plain; refused together with any TLS setting.
//!
//! `postgres_client_certificate` and `postgres_client_key` (PEM) present a client certificate
//! (PostgreSQL's `cert` authentication, or `clientcert=verify-full` in pg_hba.conf).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use const_oid::db::rfc5912;
use der::Decode;
use postgres::config::SslMode;
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::archive::store::StoreError;
use crate::config::ArchiveConfig;

/// The connector given to `postgres::Config::connect`: one rustls configuration for every
/// connection (and reconnection) of the process.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
}

/// What `[archive]` makes of TLS: `None` for plain connections (`sslmode=disable`). Reads
/// the PEM files; every inconsistency is an error naming the setting. May set `pg`'s
/// `sslmode` to `require` (with `postgres_ca`).
pub fn tls_settings(
    config: &ArchiveConfig,
    pg: &mut postgres::Config,
) -> Result<Option<MakeRustls>, StoreError> {
    let err = |text: String| Err(StoreError(text));
    let verified = !config.postgres_ca.is_empty();
    let client = match (
        &config.postgres_client_certificate,
        &config.postgres_client_key,
    ) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => {
            return err(
                "archive.postgres_client_certificate and postgres_client_key go \
                 together"
                    .into(),
            )
        }
    };
    if verified && config.postgres_tls_insecure {
        return err(
            "archive.postgres_tls_insecure = true and postgres_ca contradict each other: \
             with postgres_ca the server's certificate is verified"
                .into(),
        );
    }
    match pg.get_ssl_mode() {
        SslMode::Disable => {
            if verified || client.is_some() || config.postgres_tls_insecure {
                return err(
                    "archive.postgres_url has sslmode=disable, yet postgres_ca, \
                     postgres_client_certificate or postgres_tls_insecure is set: remove \
                     sslmode=disable to use TLS"
                        .into(),
                );
            }
            return Ok(None);
        }
        SslMode::Prefer if verified => {
            pg.ssl_mode(SslMode::Require);
        }
        SslMode::Require if !verified && !config.postgres_tls_insecure => {
            return err(
                "archive.postgres_url has sslmode=require but archive.postgres_ca is not set: \
                 the PostgreSQL server's certificate would not be verified, and the archive \
                 would go to whoever answers for its address. Set postgres_ca to the PEM file \
                 of the CA that signs the server's certificate (verified as libpq's \
                 sslmode=verify-full), or postgres_tls_insecure = true to encrypt without \
                 authenticating the server"
                    .into(),
            );
        }
        SslMode::Prefer | SslMode::Require => {}
        other => {
            return err(format!(
                "archive.postgres_url: sslmode {other:?} is not supported"
            ))
        }
    }

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError(format!("TLS protocol versions: {e}")))?;
    let builder = if verified {
        let mut roots = RootCertStore::empty();
        for path in &config.postgres_ca {
            for cert in certificates(path, "archive.postgres_ca")? {
                roots.add(cert).map_err(|e| {
                    StoreError(format!(
                        "archive.postgres_ca: {} is not a usable CA certificate: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
    };
    let mut tls = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates(cert, "archive.postgres_client_certificate")?;
            let key = crate::pem::service_private_key(key)
                .map_err(|e| StoreError(format!("archive.postgres_client_key: {e:#}")))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                StoreError(format!(
                    "archive.postgres_client_certificate and postgres_client_key do not make a \
                     usable client certificate: {e}"
                ))
            })?
        }
    };
    // As libpq 17 does; required by PostgreSQL 17's sslnegotiation=direct, ignored before.
    tls.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(MakeRustls {
        config: Arc::new(tls),
    }))
}

/// Every certificate of a PEM file (at least one), the errors naming `setting`.
fn certificates(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    crate::pem::certificates(path).map_err(|e| StoreError(format!("{setting}: {e:#}")))
}

/// A hint for an error from connecting: what to look at when the server's certificate was
/// refused (rustls's error is somewhere in the chain of sources).
pub fn certificate_hint(error: &(dyn std::error::Error + 'static), ca: &[PathBuf]) -> String {
    let mut source = Some(error);
    while let Some(e) = source {
        let rustls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(_)) = rustls {
            let files: Vec<String> = ca.iter().map(|p| p.display().to_string()).collect();
            return format!(
                " (the PostgreSQL server's certificate failed verification against \
                 archive.postgres_ca = {files:?}: it must chain to one of those CAs and name \
                 the host of postgres_url)"
            );
        }
        source = e.source();
    }
    String::new()
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    /// `domain` is the host of `postgres_url` ("" for a Unix socket, where PostgreSQL never
    /// offers TLS): checked when the handshake starts.
    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        Ok(RustlsConnect {
            config: self.config.clone(),
            name: ServerName::try_from(domain.to_string()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("'{domain}' is not a host name or address for TLS"),
                )
            }),
        })
    }
}

/// One connection's handshake.
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: io::Result<ServerName<'static>>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let connector = tokio_rustls::TlsConnector::from(self.config);
            let tls = connector.connect(self.name?, stream).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS connection to PostgreSQL.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> TlsStream for RustlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// `tls-server-end-point` (RFC 5929): the hash of the server's certificate, by the hash
    /// of its signature algorithm (SHA-256 for MD5 and SHA-1), as PostgreSQL computes it.
    /// None for algorithms without one hash (Ed25519, RSA-PSS): SCRAM without binding then
    /// (refused by `channel_binding=require`).
    fn channel_binding(&self) -> ChannelBinding {
        self.0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| server_end_point(leaf))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

fn server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use aws_lc_rs::digest::{digest, SHA256, SHA384, SHA512};
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let oid = cert.signature_algorithm().oid;
    let algorithm = if [
        rfc5912::MD_5_WITH_RSA_ENCRYPTION,
        rfc5912::SHA_1_WITH_RSA_ENCRYPTION,
        rfc5912::SHA_256_WITH_RSA_ENCRYPTION,
        rfc5912::ECDSA_WITH_SHA_256,
    ]
    .contains(&oid)
    {
        &SHA256
    } else if [
        rfc5912::SHA_384_WITH_RSA_ENCRYPTION,
        rfc5912::ECDSA_WITH_SHA_384,
    ]
    .contains(&oid)
    {
        &SHA384
    } else if [
        rfc5912::SHA_512_WITH_RSA_ENCRYPTION,
        rfc5912::ECDSA_WITH_SHA_512,
    ]
    .contains(&oid)
    {
        &SHA512
    } else {
        return None;
    };
    Some(digest(algorithm, der).as_ref().to_vec())
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Any server certificate (`postgres_tls_insecure`, or `sslmode=prefer` without
/// `postgres_ca`): the handshake's signatures are still checked against the certificate's
/// key, so channel binding ties SCRAM to the certificate actually seen.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str, extra: impl FnOnce(&mut ArchiveConfig)) -> Result<SslMode, String> {
        let mut config = ArchiveConfig {
            postgres_url: url.into(),
            ..ArchiveConfig::default()
        };
        extra(&mut config);
        let mut pg: postgres::Config = url.parse().unwrap();
        tls_settings(&config, &mut pg)
            .map(|_| pg.get_ssl_mode())
            .map_err(|e| e.0)
    }

    fn ca_file(dir: &Path) -> PathBuf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let path = dir.join("ca.pem");
        std::fs::write(&path, params.self_signed(&key).unwrap().pem()).unwrap();
        path
    }

    #[test]
    fn sslmode_and_the_tls_settings_are_checked_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_file(dir.path());
        let url = "host=db.example.org user=tsa";
        // Today's configurations: prefer, TLS when offered.
        assert!(matches!(settings(url, |_| {}), Ok(SslMode::Prefer)));
        assert!(matches!(
            settings(&format!("{url} sslmode=disable"), |_| {}),
            Ok(SslMode::Disable)
        ));
        let err = settings(&format!("{url} sslmode=require"), |_| {}).unwrap_err();
        assert!(
            err.contains("postgres_ca is not set") && err.contains("postgres_tls_insecure"),
            "{err}"
        );
        assert!(matches!(
            settings(&format!("{url} sslmode=require"), |c| c
                .postgres_tls_insecure =
                true),
            Ok(SslMode::Require)
        ));
        // A CA makes TLS mandatory, even under the default sslmode.
        let with_ca = |c: &mut ArchiveConfig| c.postgres_ca = vec![ca.clone()];
        assert!(matches!(settings(url, with_ca), Ok(SslMode::Require)));
        assert!(matches!(
            settings(&format!("{url} sslmode=require"), with_ca),
            Ok(SslMode::Require)
        ));
        let err = settings(&format!("{url} sslmode=disable"), with_ca).unwrap_err();
        assert!(err.contains("sslmode=disable"), "{err}");
        let err = settings(url, |c| {
            with_ca(c);
            c.postgres_tls_insecure = true;
        })
        .unwrap_err();
        assert!(err.contains("contradict"), "{err}");
        let err = settings(url, |c| {
            c.postgres_client_certificate = Some(ca.clone());
        })
        .unwrap_err();
        assert!(err.contains("go together"), "{err}");
        // Unreadable or empty files are named.
        let err = settings(url, |c| {
            c.postgres_ca = vec![dir.path().join("missing.pem")]
        })
        .unwrap_err();
        assert!(
            err.contains("archive.postgres_ca") && err.contains("missing.pem"),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = settings(url, |c| c.postgres_ca = vec![empty.clone()]).unwrap_err();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let err = settings(url, |c| {
            c.postgres_client_certificate = Some(ca.clone());
            c.postgres_client_key = Some(empty.clone());
        })
        .unwrap_err();
        assert!(err.contains("archive.postgres_client_key"), "{err}");
    }

    #[test]
    fn the_channel_binding_hash_follows_the_signature_algorithm() {
        for (alg, len) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, Some(32)),
            (&rcgen::PKCS_ECDSA_P384_SHA384, Some(48)),
            (&rcgen::PKCS_ED25519, None),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let hash = server_end_point(cert.der());
            assert_eq!(hash.as_ref().map(Vec::len), len);
            if let Some(hash) = hash {
                let expected = match len {
                    Some(32) => aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.der()),
                    _ => aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA384, cert.der()),
                };
                assert_eq!(hash, expected.as_ref());
            }
        }
    }
}
