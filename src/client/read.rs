//! Decoding a `TimeStampResp` into its parts.

use anyhow::{bail, Context};
use cms::content_info::ContentInfo;
use cms::signed_data::SignedData;
use der::{Decode, Encode};

use crate::alg::oid;
use crate::protocol::asn1::{TimeStampResp, TstInfo};
use crate::protocol::FailInfo;

/// A decoded response.
#[derive(Debug)]
pub struct Response {
    pub status: u8,
    pub status_text: Vec<String>,
    /// The failInfo bits that are set, by number.
    pub fail_bits: Vec<usize>,
    pub token: Option<Token>,
}

impl Response {
    pub fn from_der(der: &[u8]) -> anyhow::Result<Self> {
        let resp = TimeStampResp::from_der(der).context("not a DER TimeStampResp")?;
        let fail_bits = resp
            .status
            .fail_info
            .as_ref()
            .map(|bits| {
                bits.bits()
                    .enumerate()
                    .filter(|(_, b)| *b)
                    .map(|(i, _)| i)
                    .collect()
            })
            .unwrap_or_default();
        let status_text = resp
            .status
            .status_string
            .iter()
            .flatten()
            .map(|s| s.as_str().to_string())
            .collect();
        let token = resp
            .time_stamp_token
            .map(|any| Token::from_der(&any.to_der()?))
            .transpose()?;
        if resp.status.status <= 1 && token.is_none() {
            bail!("a granted response without a token");
        }
        if resp.status.status > 1 && token.is_some() {
            bail!("a rejection that carries a token");
        }
        Ok(Self {
            status: resp.status.status,
            status_text,
            fail_bits,
            token,
        })
    }

    pub fn granted(&self) -> bool {
        self.status <= 1
    }

    /// The single failInfo of a rejection, when it is one RFC 3161 names.
    pub fn fail_info(&self) -> Option<FailInfo> {
        match self.fail_bits.as_slice() {
            [bit] => FailInfo::from_bit(*bit),
            _ => None,
        }
    }
}

/// A time-stamp token: CMS SignedData over TSTInfo.
#[derive(Debug)]
pub struct Token {
    pub der: Vec<u8>,
    pub signed_data: SignedData,
    pub tst_info_der: Vec<u8>,
    /// The certificates the token carries, each as its octets there: a certificate decoded
    /// and encoded again may differ from them (a DEFAULT value written out, a date in
    /// GeneralizedTime before 2050, which DER and RFC 5280 forbid but issuers have made), and
    /// ESSCertID and the path's signatures bind the octets the TSA was given.
    carried: Vec<(x509_cert::Certificate, Vec<u8>)>,
}

impl Token {
    pub fn from_der(der: &[u8]) -> anyhow::Result<Self> {
        let content_info = ContentInfo::from_der(der).context("the token is not a ContentInfo")?;
        if content_info.content_type != oid::SIGNED_DATA {
            bail!(
                "the token is not SignedData but {}",
                content_info.content_type
            );
        }
        let signed_data: SignedData = content_info
            .content
            .decode_as()
            .context("the token's SignedData does not decode")?;
        let encap = &signed_data.encap_content_info;
        if encap.econtent_type != oid::CT_TST_INFO {
            bail!(
                "the token's content is {}, not TSTInfo",
                encap.econtent_type
            );
        }
        let econtent = encap
            .econtent
            .as_ref()
            .context("the token has no content")?;
        let octets: der::asn1::OctetString = econtent.decode_as().context("eContent")?;
        let tst_info_der = octets.into_bytes().into_vec();
        TstInfo::from_der(&tst_info_der).context("TSTInfo does not decode")?;
        // Decoded once, beside their octets (those that do not decode are none of the
        // certificates a verifier looks for).
        let carried = carried_certificates(&content_info.content.to_der()?)
            .context("the token's certificates do not decode")?
            .into_iter()
            .filter_map(|der| Some((x509_cert::Certificate::from_der(&der).ok()?, der)))
            .collect();
        Ok(Self {
            der: der.to_vec(),
            signed_data,
            tst_info_der,
            carried,
        })
    }

    /// `cert`'s octets as the token carries it, where it does.
    pub fn carried_der(&self, cert: &x509_cert::Certificate) -> Option<&[u8]> {
        self.carried
            .iter()
            .find(|(decoded, _)| decoded == cert)
            .map(|(_, der)| der.as_slice())
    }

    pub fn tst_info(&self) -> TstInfo<'_> {
        TstInfo::from_der(&self.tst_info_der).expect("checked in from_der")
    }
}

/// The certificates (`[0] IMPLICIT SET OF CertificateChoices`, the plain ones) of the DER
/// SignedData `signed_data`, each as the octets it is carried in, in the order carried.
fn carried_certificates(signed_data: &[u8]) -> der::Result<Vec<Vec<u8>>> {
    use der::asn1::AnyRef;
    use der::{Reader, SliceReader, Tag, TagNumber, Tagged};
    let outer = AnyRef::from_der(signed_data)?;
    let mut fields = SliceReader::new(outer.value())?;
    let mut carried = Vec::new();
    while !fields.is_finished() {
        let field = AnyRef::decode(&mut fields)?;
        let certificates = Tag::ContextSpecific {
            constructed: true,
            number: TagNumber(0),
        };
        if field.tag() != certificates {
            continue;
        }
        let mut set = SliceReader::new(field.value())?;
        while !set.is_finished() {
            let choice = AnyRef::decode(&mut set)?;
            if choice.tag() == Tag::Sequence {
                carried.push(choice.to_der()?);
            }
        }
    }
    Ok(carried)
}
