// One time-stamp exchange with BouncyCastle, for tests/interop_java.rs.
//
// Usage: java TsaInterop URL DATA_FILE CA_PEM OUT_DIR [POLICY_OID]
//
// Builds a TimeStampRequest for the SHA-256 of DATA_FILE with TimeStampRequestGenerator
// (certReq true, a random 64-bit nonce, the policy if given), POSTs it with
// HttpURLConnection, parses the reply with TimeStampResponse, checks it against the request
// with response.validate(request), verifies the token's signature with
// JcaSimpleSignerInfoVerifierBuilder against the certificate carried in the token, and
// checks that certificate's signature with the CA's key. Writes req.tsq and reply.tsr into
// OUT_DIR and prints key=value lines; failed checks are printed, not thrown, so that the
// caller can assert on them.

import java.io.ByteArrayOutputStream;
import java.io.FileInputStream;
import java.io.InputStream;
import java.io.OutputStream;
import java.math.BigInteger;
import java.net.HttpURLConnection;
import java.net.URL;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.SecureRandom;
import java.security.Security;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.util.Collection;

import org.bouncycastle.asn1.ASN1ObjectIdentifier;
import org.bouncycastle.asn1.cmp.PKIFailureInfo;
import org.bouncycastle.asn1.cms.AttributeTable;
import org.bouncycastle.asn1.pkcs.PKCSObjectIdentifiers;
import org.bouncycastle.cert.X509CertificateHolder;
import org.bouncycastle.cert.jcajce.JcaX509CertificateHolder;
import org.bouncycastle.cms.jcajce.JcaSimpleSignerInfoVerifierBuilder;
import org.bouncycastle.jce.provider.BouncyCastleProvider;
import org.bouncycastle.operator.jcajce.JcaContentVerifierProviderBuilder;
import org.bouncycastle.tsp.TSPAlgorithms;
import org.bouncycastle.tsp.TimeStampRequest;
import org.bouncycastle.tsp.TimeStampRequestGenerator;
import org.bouncycastle.tsp.TimeStampResponse;
import org.bouncycastle.tsp.TimeStampToken;
import org.bouncycastle.tsp.TimeStampTokenInfo;
import org.bouncycastle.util.encoders.Hex;

public final class TsaInterop {
    /** The PKIFailureInfo bits RFC 3161 names, as BouncyCastle numbers them. */
    private static final Object[][] FAIL_INFO = {
        {"badAlg", PKIFailureInfo.badAlg},
        {"badRequest", PKIFailureInfo.badRequest},
        {"badDataFormat", PKIFailureInfo.badDataFormat},
        {"timeNotAvailable", PKIFailureInfo.timeNotAvailable},
        {"unacceptedPolicy", PKIFailureInfo.unacceptedPolicy},
        {"unacceptedExtension", PKIFailureInfo.unacceptedExtension},
        {"addInfoNotAvailable", PKIFailureInfo.addInfoNotAvailable},
        {"systemFailure", PKIFailureInfo.systemFailure},
    };

    public static void main(String[] args) throws Exception {
        if (args.length < 4) {
            System.err.println("usage: TsaInterop URL DATA_FILE CA_PEM OUT_DIR [POLICY_OID]");
            System.exit(2);
        }
        Security.addProvider(new BouncyCastleProvider());
        String url = args[0];
        byte[] data = Files.readAllBytes(Path.of(args[1]));
        Path out = Path.of(args[3]);

        TimeStampRequestGenerator generator = new TimeStampRequestGenerator();
        generator.setCertReq(true);
        if (args.length > 4) {
            generator.setReqPolicy(new ASN1ObjectIdentifier(args[4]));
        }
        byte[] digest = MessageDigest.getInstance("SHA-256").digest(data);
        BigInteger nonce = new BigInteger(64, new SecureRandom());
        TimeStampRequest request = generator.generate(TSPAlgorithms.SHA256, digest, nonce);
        byte[] requestDer = request.getEncoded();
        Files.write(out.resolve("req.tsq"), requestDer);

        HttpURLConnection http = (HttpURLConnection) new URL(url).openConnection();
        http.setConnectTimeout(10_000);
        http.setReadTimeout(30_000);
        http.setRequestMethod("POST");
        http.setDoOutput(true);
        http.setRequestProperty("Content-Type", "application/timestamp-query");
        try (OutputStream os = http.getOutputStream()) {
            os.write(requestDer);
        }
        System.out.println("http_status=" + http.getResponseCode());
        System.out.println("content_type=" + http.getContentType());
        byte[] replyDer;
        try (InputStream is = http.getInputStream()) {
            replyDer = is.readAllBytes();
        }
        Files.write(out.resolve("reply.tsr"), replyDer);

        TimeStampResponse response = new TimeStampResponse(replyDer);
        System.out.println("pki_status=" + response.getStatus());
        if (response.getStatusString() != null) {
            System.out.println("status_string=" + response.getStatusString());
        }
        if (response.getFailInfo() != null) {
            int bits = response.getFailInfo().intValue();
            StringBuilder names = new StringBuilder();
            for (Object[] named : FAIL_INFO) {
                if ((bits & (Integer) named[1]) != 0) {
                    names.append(names.length() == 0 ? "" : ",").append(named[0]);
                }
            }
            System.out.println("fail_info=" + names);
        }
        System.out.println("request_nonce=" + nonce.toString(16));
        try {
            response.validate(request);
            System.out.println("validate=ok");
        } catch (Exception e) {
            System.out.println("validate=FAILED " + e);
        }
        TimeStampToken token = response.getTimeStampToken();
        if (token == null) {
            System.out.println("token=none");
            return;
        }
        TimeStampTokenInfo info = token.getTimeStampInfo();
        System.out.println("token_nonce=" + (info.getNonce() == null ? "none" : info.getNonce().toString(16)));
        System.out.println("policy=" + info.getPolicy().getId());
        System.out.println("serial=" + info.getSerialNumber().toString(16));
        System.out.println("imprint=" + Hex.toHexString(info.getMessageImprintDigest()));
        System.out.println("gen_time_ms=" + info.getGenTime().getTime());
        System.out.println("tsa=" + (info.getTsa() == null ? "none" : info.getTsa().toString()));
        AttributeTable signed = token.getSignedAttributes();
        System.out.println("ess_cert_id_v1=" + (signed.get(PKCSObjectIdentifiers.id_aa_signingCertificate) != null));
        System.out.println("ess_cert_id_v2=" + (signed.get(PKCSObjectIdentifiers.id_aa_signingCertificateV2) != null));
        if (info.getAccuracy() != null) {
            System.out.println("accuracy_seconds=" + info.getAccuracy().getSeconds());
            System.out.println("accuracy_millis=" + info.getAccuracy().getMillis());
            System.out.println("accuracy_micros=" + info.getAccuracy().getMicros());
        }
        System.out.println("signature_algorithm=" + token.toCMSSignedData().getSignerInfos().getSigners().iterator().next().getEncryptionAlgOID());

        @SuppressWarnings("unchecked")
        Collection<X509CertificateHolder> matches = token.getCertificates().getMatches(token.getSID());
        System.out.println("certificates=" + matches.size());
        if (matches.isEmpty()) {
            return;
        }
        X509CertificateHolder signer = matches.iterator().next();
        System.out.println("signer=" + signer.getSubject());
        try {
            token.validate(new JcaSimpleSignerInfoVerifierBuilder().setProvider("BC").build(signer));
            System.out.println("signature=ok");
        } catch (Exception e) {
            System.out.println("signature=FAILED " + e);
        }

        X509Certificate ca;
        try (InputStream is = new FileInputStream(args[2])) {
            ca = (X509Certificate) CertificateFactory.getInstance("X.509").generateCertificate(is);
        }
        try {
            boolean issuedByCa = signer.getIssuer().equals(new JcaX509CertificateHolder(ca).getSubject())
                    && signer.isSignatureValid(new JcaContentVerifierProviderBuilder().setProvider("BC").build(ca))
                    && signer.isValidOn(info.getGenTime());
            System.out.println("chain=" + (issuedByCa ? "ok" : "FAILED not issued by the CA"));
        } catch (Exception e) {
            System.out.println("chain=FAILED " + e);
        }
    }
}
