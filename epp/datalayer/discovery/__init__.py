"""Which endpoints the pool has: `static` (the config) or `kubernetes` (an InferencePool's Ready pods)."""
