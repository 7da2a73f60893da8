"""One module per transport behind one contract (`Exchanger`); this is the registry."""

from __future__ import annotations

from probe.model import Transport
from probe.specs import Endpoint
from probe.transports.base import Exchange, Exchanger, Failure, Options
from probe.transports.doh import DohExchanger
from probe.transports.doh3 import Doh3Exchanger
from probe.transports.doq import DoqExchanger
from probe.transports.dot import DotExchanger
from probe.transports.tcp import TcpExchanger
from probe.transports.udp import UdpExchanger

__all__ = ["Exchange", "Exchanger", "Failure", "Options", "make_exchanger"]


_REGISTRY: dict[Transport, type] = {
    Transport.UDP: UdpExchanger,
    Transport.TCP: TcpExchanger,
    Transport.DOT: DotExchanger,
    Transport.DOH: DohExchanger,
    Transport.DOH3: Doh3Exchanger,
    Transport.DOQ: DoqExchanger,
}


def make_exchanger(endpoint: Endpoint, options: Options) -> Exchanger:
    """The exchanger that owns connections to `endpoint` for one run."""
    exchanger: Exchanger = _REGISTRY[endpoint.transport](endpoint, options)
    return exchanger
