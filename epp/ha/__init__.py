"""High availability: several replicas, one active (`leader.LeaderElector` over a coordination.k8s.io Lease).

Every replica runs discovery and scraping (a warm standby); only the Lease holder reports readiness SERVING,
so the Service, and through it the gateway, sends ext_proc streams to the leader only. The learned state
(prefix index, in-flight counts) stays in the leader's process; the README's "High availability" section
says why not active-active yet and how that state could be shared later.
"""
