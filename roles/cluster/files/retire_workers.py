"""Move the named workers' results to the others, then close them.

Run on the scheduler's machine: python retire_workers.py ADDRESS TLS_DIR NAME...
With mutual TLS it shows the scheduler machine's own certificate.
"""
import sys

from distributed import Client, Security

address, tls_dir, names = sys.argv[1], sys.argv[2], sys.argv[3:]
security = Security(tls_ca_file=f"{tls_dir}/ca.pem", tls_client_cert=f"{tls_dir}/node.pem",
                    tls_client_key=f"{tls_dir}/node.key", require_encryption=True) if address.startswith("tls://") else None
with Client(address, security=security, timeout=30) as client:
    print(client.retire_workers(names=names, close_workers=True))
