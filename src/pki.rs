//! A development PKI: a root CA and a TSU certificate with the ETSI EN 319 422 profile.
//! Used by `tsa init`, the tests and the benchmarks; never meant for production keys.

use chrono::{Datelike, Duration as ChronoDuration, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, RsaKeySize, SanType,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyAlgorithm {
    P256,
    P384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

/// The PEM files of a development PKI.
pub struct DevPki {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub tsu_cert_pem: String,
    /// PKCS#8 `PRIVATE KEY`.
    pub tsu_key_pem: String,
}

impl DevPki {
    /// A fresh root CA and TSU key pair and certificate, both of `algorithm`.
    pub fn generate(algorithm: KeyAlgorithm) -> anyhow::Result<Self> {
        let ca_key = new_key(algorithm)?;
        let ca_params = ca_params()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, &ca_key);
        let tsu_key = new_key(algorithm)?;
        let tsu_cert = issued(tsu_params()?).signed_by(&tsu_key, &issuer)?;
        Ok(Self {
            ca_cert_pem: ca_cert.pem(),
            ca_key_pem: ca_key.serialize_pem(),
            tsu_cert_pem: tsu_cert.pem(),
            tsu_key_pem: tsu_key.serialize_pem(),
        })
    }
}

/// A development root CA that certifies a TSU key held elsewhere (an HSM): the CA key is a
/// PEM file, the TSU certificate is made for `tsu_key`'s public key.
pub struct DevPkiForKey {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub tsu_cert_pem: String,
}

impl DevPkiForKey {
    /// A fresh root CA of `ca_algorithm` and a TSU certificate for `tsu_key`.
    pub fn generate(
        ca_algorithm: KeyAlgorithm,
        tsu_key: &impl rcgen::PublicKeyData,
    ) -> anyhow::Result<Self> {
        let ca_key = new_key(ca_algorithm)?;
        let ca_params = ca_params()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, &ca_key);
        let tsu_cert = issued(tsu_params()?).signed_by(tsu_key, &issuer)?;
        Ok(Self {
            ca_cert_pem: ca_cert.pem(),
            ca_key_pem: ca_key.serialize_pem(),
            tsu_cert_pem: tsu_cert.pem(),
        })
    }
}

/// TLS for a development HTTPS listener (P-256 keys): a server certificate for `localhost`,
/// `127.0.0.1` and `::1` issued by the development root CA, and a client CA with one client
/// certificate for mutual TLS.
pub struct DevTls {
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_ca_cert_pem: String,
    pub client_ca_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    /// The client certificate's DER (its fingerprint maps it to a client).
    pub client_cert_der: Vec<u8>,
}

impl DevTls {
    /// `root_ca_key_pem` is the development root CA's key (made by [`DevPki`] or
    /// [`DevPkiForKey`]); `client_name` the client certificate's common name.
    pub fn generate(root_ca_key_pem: &str, client_name: &str) -> anyhow::Result<Self> {
        let root = Issuer::new(ca_params()?, KeyPair::from_pem(root_ca_key_pem)?);
        let server_key = new_key(KeyAlgorithm::P256)?;
        let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
        server.distinguished_name = name("localhost");
        for ip in ["127.0.0.1", "::1"] {
            server
                .subject_alt_names
                .push(SanType::IpAddress(ip.parse().expect("an IP address")));
        }
        server.is_ca = IsCa::ExplicitNoCa;
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut server, 2);
        let server_cert = issued(server).signed_by(&server_key, &root)?;

        let client_ca_key = new_key(KeyAlgorithm::P256)?;
        let mut client_ca = ca_params()?;
        client_ca.distinguished_name = name("Development TSA Client CA");
        let client_ca_cert = client_ca.self_signed(&client_ca_key)?;
        let client_ca = Issuer::new(client_ca, &client_ca_key);
        let client_key = new_key(KeyAlgorithm::P256)?;
        let mut client = CertificateParams::new(vec![])?;
        client.distinguished_name = name(client_name);
        client.is_ca = IsCa::ExplicitNoCa;
        client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut client, 2);
        let client_cert = issued(client).signed_by(&client_key, &client_ca)?;
        Ok(Self {
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_ca_cert_pem: client_ca_cert.pem(),
            client_ca_key_pem: client_ca_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
            client_cert_der: client_cert.der().to_vec(),
        })
    }
}

/// The TSU profile's parameters (for a CSR: the subject is the caller's).
pub fn tsu_certificate_params() -> anyhow::Result<CertificateParams> {
    tsu_params()
}

/// A self-signed certificate (DER) of the TSU profile with these key usages instead, for
/// tests of the profile's checks.
#[cfg(test)]
pub(crate) fn tsu_certificate_with_key_usages(usages: Vec<KeyUsagePurpose>) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = tsu_params().unwrap();
    params.key_usages = usages;
    params.self_signed(&key).unwrap().der().to_vec()
}

fn new_key(algorithm: KeyAlgorithm) -> anyhow::Result<KeyPair> {
    Ok(match algorithm {
        KeyAlgorithm::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        KeyAlgorithm::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?,
        KeyAlgorithm::Rsa2048 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)?
        }
        KeyAlgorithm::Rsa3072 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_3072)?
        }
        KeyAlgorithm::Rsa4096 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_4096)?
        }
    })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, country("VN").expect("a country code"));
    dn.push(
        DnType::OrganizationName,
        "Development TSA (not for production)",
    );
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A countryName value: two letters as a PrintableString (RFC 5280 `X520countryName`; rcgen
/// would write a `&str` as a UTF8String, which validators and linters refuse).
pub fn country(code: &str) -> anyhow::Result<DnValue> {
    anyhow::ensure!(
        code.len() == 2 && code.bytes().all(|b| b.is_ascii_alphabetic()),
        "a country is two letters (ISO 3166), not '{code}'"
    );
    Ok(DnValue::PrintableString(code.try_into()?))
}

/// A certificate's parameters for issuing by a CA (not self-signed, not for a request): with
/// an authority key identifier, which RFC 5280 4.2.1.1 requires of such a certificate (chain
/// builders match it to the issuer's subject key identifier).
fn issued(mut params: CertificateParams) -> CertificateParams {
    params.use_authority_key_identifier_extension = true;
    params
}

/// Validity from yesterday (clock skew between machines) for `years`.
fn validity(params: &mut CertificateParams, years: i32) {
    let start = Utc::now() - ChronoDuration::days(1);
    params.not_before = rcgen::date_time_ymd(start.year(), start.month() as u8, start.day() as u8);
    params.not_after = rcgen::date_time_ymd(start.year() + years, start.month() as u8, 1);
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![])?;
    params.distinguished_name = name("Development TSA Root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, 10);
    Ok(params)
}

/// The TSU profile of ETSI EN 319 422: end entity, digitalSignature, and id-kp-timeStamping as
/// the only extended key usage, marked critical (rcgen writes EKU non-critical, so it is added
/// as a custom extension).
fn tsu_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(vec![])?;
    params.distinguished_name = name("Development Time-Stamping Unit");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // SEQUENCE { OBJECT IDENTIFIER 1.3.6.1.5.5.7.3.8 }
    let eku = vec![
        0x30, 0x0a, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x08,
    ];
    let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 37], eku);
    ext.set_criticality(true);
    params.custom_extensions.push(ext);
    validity(&mut params, 3);
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::{DecodePem, Tag, Tagged};
    use x509_cert::ext::pkix::{AuthorityKeyIdentifier, SubjectKeyIdentifier};
    use x509_cert::Certificate;

    fn country_tag(cert: &Certificate) -> Tag {
        let country = const_oid::db::rfc4519::COUNTRY_NAME;
        let rdns = cert.tbs_certificate().subject().as_ref().iter();
        let value = rdns
            .flat_map(|rdn| rdn.as_ref().iter())
            .find(|atv| atv.oid == country)
            .expect("a countryName");
        value.value.tag()
    }

    /// RFC 5280: a CA's certificates carry its key identifier (4.2.1.1), and countryName is a
    /// PrintableString (appendix A).
    #[test]
    fn issued_certificates_name_their_issuers_key_and_country_as_printable() {
        let pki = DevPki::generate(KeyAlgorithm::P256).unwrap();
        let ca = Certificate::from_pem(&pki.ca_cert_pem).unwrap();
        let tsu = Certificate::from_pem(&pki.tsu_cert_pem).unwrap();
        let (_, ca_ski) = ca
            .tbs_certificate()
            .get_extension::<SubjectKeyIdentifier>()
            .unwrap()
            .expect("the CA's subject key identifier");
        let issuers_key = |cert: &Certificate| {
            let (critical, aki) = cert
                .tbs_certificate()
                .get_extension::<AuthorityKeyIdentifier>()
                .unwrap()
                .expect("an authority key identifier");
            assert!(!critical);
            aki.key_identifier
        };
        assert_eq!(issuers_key(&tsu).as_ref(), Some(&ca_ski.0));
        assert_eq!(country_tag(&ca), Tag::PrintableString);
        assert_eq!(country_tag(&tsu), Tag::PrintableString);

        let tls = DevTls::generate(&pki.ca_key_pem, "client").unwrap();
        let server = Certificate::from_pem(&tls.server_cert_pem).unwrap();
        assert_eq!(issuers_key(&server).as_ref(), Some(&ca_ski.0));

        assert!(country("VNM").is_err());
        assert!(country("V1").is_err());
    }
}
