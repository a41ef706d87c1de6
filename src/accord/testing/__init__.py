"""Test helpers and contract suites that users and third-party backends can reuse."""

from accord.testing._deliveries import CapturedDelivery
from accord.testing._eventually import assert_eventually, wait_for
from accord.testing.faults import FaultyTransport
from accord.testing.transport_contract import Collector, TransportContract

__all__ = [
    "CapturedDelivery",
    "Collector",
    "FaultyTransport",
    "TransportContract",
    "assert_eventually",
    "wait_for",
]
