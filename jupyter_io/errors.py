"""The one exception tree of jupyter-io.

Every error the product raises on purpose derives from :class:`JupyterIOError`, and its
message tells the user what happened and what to do next::

    JupyterIOError
    ├── ConfigError            bad or missing configuration (keypair file, URL, trait value)
    ├── ProtocolError          the tunnel peer sent bytes that break the wire protocol
    │   ├── FrameTooLarge      a frame exceeds the negotiated maximum size
    │   └── VersionMismatch    the peer speaks another protocol version
    ├── AuthError              a key, signature or token was refused
    ├── TunnelError            the tunnel cannot carry on (buffers overflowed, session unknown)
    │   └── BufferOverflow     unacknowledged data exceeded the configured bound
    ├── KernelLaunchError      the provider could not start (or restart) the kernel
    ├── LeaseError             the marketplace could not lease a GPU
    └── PaymentError           escrow, metering or settlement failed
        └── InsufficientFunds  the wallet cannot cover the escrow

Catch the narrowest class you can handle; let the rest propagate.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BufferOverflow",
    "ConfigError",
    "FrameTooLarge",
    "InsufficientFunds",
    "JupyterIOError",
    "KernelLaunchError",
    "LeaseError",
    "PaymentError",
    "ProtocolError",
    "TunnelError",
    "VersionMismatch",
]


class JupyterIOError(Exception):
    """Root of every error jupyter-io raises on purpose."""


class ConfigError(JupyterIOError):
    """Configuration is missing or invalid; the message names the setting to fix."""


class ProtocolError(JupyterIOError):
    """The peer sent bytes that violate the tunnel protocol; the connection is closed."""


class FrameTooLarge(ProtocolError):
    """A frame is larger than the maximum frame size both ends agreed on."""


class VersionMismatch(ProtocolError):
    """The peer speaks a protocol version this end does not support."""


class AuthError(JupyterIOError):
    """A public key, signature or lease token was refused."""


class TunnelError(JupyterIOError):
    """The tunnel session cannot continue (unknown session, peer gone for good)."""


class BufferOverflow(TunnelError):
    """More unacknowledged data piled up than the configured bound allows."""


class KernelLaunchError(JupyterIOError):
    """The provider host could not start the kernel."""


class LeaseError(JupyterIOError):
    """No GPU could be leased for the request."""


class PaymentError(JupyterIOError):
    """Escrow, metering or settlement failed."""


class InsufficientFunds(PaymentError):
    """The wallet holds less than the escrow needs."""
