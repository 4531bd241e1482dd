"""Which endpoints the pool has, and what the cluster says about routing.

`static` (the config's endpoints) or `kubernetes`: `kubernetes.InferencePoolDiscovery` follows an
InferencePool's Ready pods, `objectives.ObjectiveWatch` its InferenceObjective / InferenceModelRewrite
objects, both over `kubeapi.KubeClient` (list/watch with bounded, jittered timeouts, stall detection, TCP
keep-alive and back-off), which leader election (`epp.ha.leader`) shares.
"""
