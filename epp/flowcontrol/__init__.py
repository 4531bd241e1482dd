"""Flow control: hold requests in the picker while the pool is saturated; serve them by priority, fairly
between tenants, and bind each to an endpoint as late as possible.

    gate.py        CapacityGate (protocol) and SaturationGate: is there room on these endpoints now?
    queues.py      bands (one per priority), flows (one per fairness id), FCFS; fair order between flows
    controller.py  FlowController: admission (dispatch / hold / shed), limits, deadlines, dispatch passes

The request director calls it from its admission step (`Director.admit`); the ext_proc servicer awaits a
held request's ticket without blocking the event loop (`RequestStream.handle` returns a `Wait`).
Configuration: `flow_control` in epp/config.py.
"""

from epp.flowcontrol.controller import FlowController
from epp.flowcontrol.gate import CapacityGate, SaturationGate
from epp.flowcontrol.queues import QueuedRequest

__all__ = ["CapacityGate", "FlowController", "QueuedRequest", "SaturationGate"]
