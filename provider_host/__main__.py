"""``python -m provider_host``: run the provider host daemon (see :mod:`provider_host.app`)."""

from __future__ import annotations

from .app import main

if __name__ == "__main__":
    main()
