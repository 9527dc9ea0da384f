#!/usr/bin/env python3
"""One time-stamp exchange with Trail of Bits' rfc3161-client, for tests/interop_python.rs.

Builds a request for --data (nonce, certReq), POSTs it to --url, decodes the reply and
verifies it against the root CA in --ca (and, if given, the policy --policy). Writes the
request and the reply to --out as req.tsq and reply.tsr, and prints what it saw as
key=value lines; verification failures are reported, not raised, so that the caller can
also check that a wrong CA or policy is refused.
"""

import argparse
import datetime
import sys
import urllib.request
from pathlib import Path

import rfc3161_client as tsp
from cryptography import x509

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def micros_since_epoch(t: datetime.datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return (t - EPOCH) // datetime.timedelta(microseconds=1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--ca", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--hash", choices=["sha256", "sha512"], default="sha256")
    parser.add_argument("--policy")
    args = parser.parse_args()

    data = args.data.read_bytes()
    algorithm = {"sha256": tsp.HashAlgorithm.SHA256, "sha512": tsp.HashAlgorithm.SHA512}[args.hash]
    request = (
        tsp.TimestampRequestBuilder()
        .data(data)
        .hash_algorithm(algorithm)
        .nonce(nonce=True)
        .cert_request(cert_request=True)
        .build()
    )
    (args.out / "req.tsq").write_bytes(request.as_bytes())

    http = urllib.request.Request(
        args.url,
        data=request.as_bytes(),
        headers={"Content-Type": "application/timestamp-query"},
        method="POST",
    )
    with urllib.request.urlopen(http, timeout=30) as reply:
        print(f"http_status={reply.status}")
        print(f"content_type={reply.headers.get('Content-Type')}")
        body = reply.read()
    (args.out / "reply.tsr").write_bytes(body)

    response = tsp.decode_timestamp_response(body)
    print(f"pki_status={response.status}")
    tst = response.tst_info
    print(f"request_nonce={request.nonce:x}")
    print(f"token_nonce={tst.nonce:x}")
    print(f"policy={tst.policy.dotted_string}")
    print(f"serial={tst.serial_number:x}")
    print(f"hash_oid={tst.message_imprint.hash_algorithm.dotted_string}")
    print(f"imprint={tst.message_imprint.message.hex()}")
    # rfc3161-client reads genTime to the whole second.
    print(f"gen_time_s={micros_since_epoch(tst.gen_time) // 1_000_000}")
    print(f"certificates={len(response.signed_data.certificates)}")

    root = x509.load_pem_x509_certificate(args.ca.read_bytes())
    builder = tsp.VerifierBuilder(nonce=request.nonce)
    if args.policy:
        builder = builder.policy_id(x509.ObjectIdentifier(args.policy))
    verifier = builder.add_root_certificate(root).build()
    try:
        verifier.verify_message(response, data)
        print("verified=true")
    except tsp.VerificationError as e:
        print("verified=false")
        print(f"error={e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
