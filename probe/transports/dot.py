"""DNS over TLS (RFC 7858): the TCP stream transport inside verified TLS."""

from __future__ import annotations

import ssl

from probe.transports.tcp import StreamExchanger
from probe.transports.tls import client_context

__all__ = ["DotExchanger"]


class DotExchanger(StreamExchanger):
    """Pipelined queries over one TLS connection; the certificate must name the host."""

    tls = True

    def _ssl(self) -> ssl.SSLContext:
        return client_context(self.options.ca_file, ("dot",))
