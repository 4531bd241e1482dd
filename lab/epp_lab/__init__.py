"""epp-lab: everything around the picker that is not the picker: a simulated vLLM fleet, a load generator,
the demo, the Envoy launcher and the child-process helper shared by the demo, the tests and the benchmarks.

The picker package `epp` never imports `epp_lab`; `epp_lab` imports `epp` where the two must agree (e.g.
`epp.config.CHARS_PER_TOKEN`). The production wheel and image ship `epp` only.

    sim/            the simulated vLLM fleet (`epp sim`, `python -m epp_lab.sim.cli`)
    loadgen/        deterministic workloads and an open-loop streaming client
    demo.py         `epp demo`: round-robin vs the picker through real Envoy
    envoy_launcher  renders the repository's envoy/*.yaml and runs Envoy
    procs           child processes: start, ready file or HTTP probe, stop by process group
    tables          the markdown-table writer of every report
"""

__version__ = "0.1.0"
