"""One module per transport behind one contract (`Exchanger`); this is the registry."""

from __future__ import annotations

from typing import Protocol

from probe.model import Transport
from probe.specs import Endpoint
from probe.transports.base import Exchange, Exchanger, Failure, FailureKind, Loss, Options, Phase
from probe.transports.doh import DohExchanger
from probe.transports.doh3 import Doh3Exchanger
from probe.transports.doq import DoqExchanger
from probe.transports.dot import DotExchanger
from probe.transports.tcp import TcpExchanger
from probe.transports.udp import UdpExchanger

__all__ = ["Exchange", "Exchanger", "Failure", "FailureKind", "Loss", "Options", "Phase", "make_exchanger"]


class _Factory(Protocol):
    def __call__(self, endpoint: Endpoint, options: Options, /) -> Exchanger: ...


# Typed as factories of `Exchanger`, so mypy checks that every transport meets the contract.
_REGISTRY: dict[Transport, _Factory] = {
    Transport.UDP: UdpExchanger,
    Transport.TCP: TcpExchanger,
    Transport.DOT: DotExchanger,
    Transport.DOH: DohExchanger,
    Transport.DOH3: Doh3Exchanger,
    Transport.DOQ: DoqExchanger,
}


def make_exchanger(endpoint: Endpoint, options: Options) -> Exchanger:
    """The exchanger that owns connections to `endpoint` for one run."""
    return _REGISTRY[endpoint.transport](endpoint, options)
