"""An online, per-endpoint model of the time to first token (TTFT), learned from what the picker observes.

    TTFT(e) ≈ θ0(e)                    fixed overhead: scheduling step, network, the first decode step
            + θ1(e) × W / 1000         W = prompt tokens e must prefill before this request's first token:
                                       its backlog (uncached tokens the picker sent e and has not seen
                                       answered) + this prompt's tokens e does not have cached
            + θ2(e) × R / 10           R = requests running on e (scraped): decode steps share the GPU
            + θ3(e) × L                L = 1 when the request's LoRA adapter must be loaded on e
            + θ4(e) × K                K = max(0, kv − 0.9) / 0.1: KV-cache pressure (kv = scraped use +
                                       what the picker sent since + this request's need): near full, a
                                       server queues new requests until decodes free blocks, or preempts
            + θ5(e) × S                S = 1 when the adapter is not resident and every adapter slot is
                                       taken by running adapters: the request waits for a slot

θ(e) is learned by recursive least squares with exponential forgetting (factor λ, default 0.99: the last ~100
observations of an endpoint weigh most), one observation per streamed request (dispatch → first response
chunk). Robust: a residual is clipped to ±3 of its running standard deviation (after 10 observations), so a
stalled request does not throw the rates off; every θ stays at least `FLOOR` (rates cannot go negative).
Before an endpoint's first observation its θ is the pool's (one more RLS over all endpoints' observations),
which starts at the prior (`Rates`); so a new replica is predicted like the average one, then learns its own
(a pool mixing faster and slower replicas is handled). Memory: a 6-vector and a 6×6 matrix per endpoint,
forgotten when the endpoint leaves the pool.

Features are scaled (thousands of tokens, tens of running requests) so the four θ have similar magnitudes and
the update stays well conditioned. Plain Python (6×6): an update costs ~25 µs, off the reply's path (it runs
in the `response_started` hook); a prediction is one dot product.
"""

from __future__ import annotations

from dataclasses import dataclass

DIM = 6
FLOOR = (0.0005, 0.001, 0.0, 0.0, 0.0, 0.0)  # seconds; θ never goes below these
KV_KNEE = 0.9  # KV-cache use (after admitting the request) beyond which the pressure feature grows
_CLIP_SIGMAS = 3.0
_CLIP_AFTER = 10


@dataclass(frozen=True, slots=True)
class Rates:
    """Prior rates before any observation (defaults: an 8B model on one H100; see the module docstring).

    overhead_s: θ0; s_per_ktoken: θ1 (0.15 s per 1,000 prefilled tokens ≈ 6,700 tokens/s); s_per_10_running:
    θ2; lora_load_s: θ3; kv_full_s: θ4 (extra wait at a full KV cache); slot_wait_s: θ5 (wait for a LoRA
    slot)."""

    overhead_s: float = 0.04
    s_per_ktoken: float = 0.15
    s_per_10_running: float = 0.005
    lora_load_s: float = 0.03
    kv_full_s: float = 0.3
    slot_wait_s: float = 1.0

    def vector(self) -> list[float]:
        return [
            self.overhead_s, self.s_per_ktoken, self.s_per_10_running, self.lora_load_s, self.kv_full_s,
            self.slot_wait_s,
        ]  # fmt: skip


Features = tuple[float, float, float, float, float, float]


def features(
    work_tokens: float, running: float, lora_load: bool, kv_use: float = 0.0, slot_wait: bool = False
) -> Features:
    """The scaled feature vector x: TTFT ≈ θ·x."""
    pressure = min(3.0, max(0.0, kv_use - KV_KNEE) / (1.0 - KV_KNEE))
    return (
        1.0, work_tokens / 1000.0, running / 10.0, 1.0 if lora_load else 0.0, pressure,
        1.0 if slot_wait else 0.0,
    )  # fmt: skip


class _Fit:
    """Recursive least squares of y ≈ θ·x with forgetting."""

    __slots__ = ("n", "p", "resid_var", "theta")

    def __init__(self, theta: list[float], variance: float) -> None:
        self.theta = list(theta)
        self.p = [[variance if i == j else 0.0 for j in range(DIM)] for i in range(DIM)]
        self.n = 0
        self.resid_var = 0.0

    def predict(self, x: tuple[float, ...]) -> float:
        return sum(t * v for t, v in zip(self.theta, x, strict=True))

    def update(self, x: tuple[float, ...], y: float, forgetting: float, variance_cap: float) -> None:
        p = self.p
        px = [sum(a * b for a, b in zip(row, x, strict=True)) for row in p]
        denominator = forgetting + sum(a * b for a, b in zip(x, px, strict=True))
        gain = [v / denominator for v in px]
        error = y - self.predict(x)
        if self.n >= _CLIP_AFTER and self.resid_var > 0.0:
            bound = _CLIP_SIGMAS * self.resid_var**0.5
            error = max(-bound, min(bound, error))
        self.resid_var = 0.95 * self.resid_var + 0.05 * error * error if self.n else error * error
        theta = self.theta
        for i in range(DIM):
            theta[i] = max(FLOOR[i], theta[i] + gain[i] * error)
        # P = (P - gain x^T P) / λ, with x^T P = px^T (P symmetric).
        for i in range(DIM):
            row = p[i]
            gi = gain[i]
            for j in range(DIM):
                row[j] = (row[j] - gi * px[j]) / forgetting
        # Forgetting without new information (the same features over and over) winds the gain up: cap each
        # variance, scaling its row and column alike so that P stays symmetric.
        for i in range(DIM):
            if p[i][i] > variance_cap:
                scale = (variance_cap / p[i][i]) ** 0.5
                for j in range(DIM):
                    if j != i:
                        p[i][j] *= scale
                        p[j][i] *= scale
                p[i][i] = variance_cap
        self.n += 1


class LatencyModel:
    """θ per endpoint address, and the pool's; `predict` uses the endpoint's once it has observations."""

    def __init__(self, prior: Rates | None = None, forgetting: float = 0.99, variance: float = 0.1) -> None:
        if not 0.5 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0.5, 1], got {forgetting}")
        self.prior = prior or Rates()
        self.forgetting = forgetting
        self.variance = variance
        self.pool = _Fit(self.prior.vector(), variance)
        self._fits: dict[str, _Fit] = {}

    def theta(self, address: str) -> list[float]:
        fit = self._fits.get(address)
        return (fit if fit is not None and fit.n else self.pool).theta

    def observations(self, address: str) -> int:
        fit = self._fits.get(address)
        return fit.n if fit is not None else 0

    def predict(self, address: str, x: tuple[float, ...]) -> float:
        return sum(t * v for t, v in zip(self.theta(address), x, strict=True))

    def observe(self, address: str, x: tuple[float, ...], seconds: float) -> None:
        """One observed TTFT at `address` with the features it was dispatched with."""
        fit = self._fits.get(address)
        if fit is None:
            fit = self._fits[address] = _Fit(self.pool.theta, self.variance)
        fit.update(x, seconds, self.forgetting, self.variance)
        self.pool.update(x, seconds, self.forgetting, self.variance)

    def forget(self, address: str) -> None:
        self._fits.pop(address, None)
