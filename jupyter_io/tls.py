"""TLS as jupyter-io's clients see it, and what to say when a certificate is not trusted.

Every client in the product (the coordinator client behind the provisioner, the server
extension and the CLI; the provider's coordinator link and relay dials; the provisioner's
tunnel) verifies a ``https://`` / ``wss://`` peer against Python's default trust store, which
honours the ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` environment variables. A coordinator or
provider whose certificate comes from a private CA (or is self-signed) is trusted by starting
the process with ``SSL_CERT_FILE`` pointing at that CA's certificate. When it is not, the
failure names the fix: :func:`untrusted_certificate`.
"""

from __future__ import annotations

import ssl

__all__ = ["untrusted_certificate"]


def untrusted_certificate(exc: BaseException | None) -> str | None:
    """What to tell the user when ``exc`` (or an exception it was raised from) is a failed
    certificate check, or None for any other error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = exc.verify_message or str(exc)
            return (
                f"its TLS certificate is not trusted ({reason}); if a private CA signed it, "
                f"start this process with SSL_CERT_FILE set to that CA's certificate (PEM)"
            )
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
