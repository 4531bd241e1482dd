// Soak load: streamed chat completions at a constant arrival rate for a long time, through Envoy and the
// picker to a simulated fleet (benchmarks/soak/run.py drives it and restarts replicas meanwhile).
//
//   k6 run -e TARGET=http://127.0.0.1:10000 -e RATE=100 -e DURATION=10m -e SUMMARY=summary.json \
//          --log-format raw --log-output file=failures.jsonl benchmarks/soak/soak.js
//
// Requests (deterministic from the iteration number n): GROUPS shared system prompts of ~PREFIX_CHARS
// characters (prefix-cache traffic that keeps teaching and evicting the picker's prefix index) and a user
// question unique to n; `stream: true`, `max_tokens` MAX_TOKENS. Arrivals: `constant-arrival-rate` (open
// model: a slow system shows up as latency and `dropped_iterations`, never as a lower rate).
//
// Every request is checked to its end: ok = status 200 and the body ends with `data: [DONE]`. Every other
// request is logged as one JSON line (console.log, written raw to the log file) with its start and end
// (epoch ms), status, k6 error and error code, the replica that answered (`x-sim-replica`, when headers
// came) and the start of the body, so that run.py can tell a request cut by a replica it killed from a lost
// one. A request still open after TIMEOUT is "hung" (k6 error code 1050).
//
// Env: TARGET, RATE (requests/s), DURATION, MODEL, MAX_TOKENS (64), GROUPS (16), PREFIX_CHARS (4000),
// TIMEOUT (60s), VUS (preallocated, default RATE x 3), MAX_VUS (default RATE x 20), SUMMARY.

import http from "k6/http";
import exec from "k6/execution";
import { SharedArray } from "k6/data";
import { Counter, Trend } from "k6/metrics";

const TARGET = __ENV.TARGET || "http://127.0.0.1:10000";
const RATE = parseInt(__ENV.RATE || "100", 10);
const DURATION = __ENV.DURATION || "10m";
const MODEL = __ENV.MODEL || "meta-llama/Llama-3.1-8B-Instruct";
const MAX_TOKENS = parseInt(__ENV.MAX_TOKENS || "64", 10);
const GROUPS = parseInt(__ENV.GROUPS || "16", 10);
const PREFIX_CHARS = parseInt(__ENV.PREFIX_CHARS || "4000", 10);
const TIMEOUT = __ENV.TIMEOUT || "60s";
const VUS = parseInt(__ENV.VUS || String(RATE * 3), 10);
const MAX_VUS = parseInt(__ENV.MAX_VUS || String(RATE * 20), 10);

const WORDS = ("inventory shipment warranty battery torque anchor plaster thermostat voltage drill mirror " +
  "invoice refund cable socket ladder paint primer sealant hinge bracket screw washer valve filter").split(" ");

function text(seed, chars) {
  // A deterministic pseudo-random word salad of about `chars` characters (Park-Miller: exact in doubles).
  let x = (seed % 2147483646) + 1;
  const out = [];
  let length = 0;
  while (length < chars) {
    x = (x * 48271) % 2147483647;
    const word = WORDS[x % WORDS.length];
    out.push(word);
    length += word.length + 1;
  }
  return out.join(" ");
}

// Built once, shared read-only by every VU.
const PREFIXES = new SharedArray("prefixes", () =>
  Array.from({ length: GROUPS }, (_, g) => `System prompt ${g}: ${text(g + 1, PREFIX_CHARS)}`),
);
const URL = `${TARGET}/v1/chat/completions`;
const PARAMS = { headers: { "content-type": "application/json" }, timeout: TIMEOUT, responseType: "text" };

const okRequests = new Counter("ok_requests");
const failedRequests = new Counter("failed_requests");
const hungRequests = new Counter("hung_requests");
const ttft = new Trend("ttft", true);
const e2e = new Trend("e2e", true);

export const options = {
  discardResponseBodies: false, // every body is read to its end: a cut stream must be seen as cut
  summaryTrendStats: ["avg", "min", "med", "p(50)", "p(90)", "p(99)", "max"],
  scenarios: {
    soak: {
      executor: "constant-arrival-rate",
      rate: RATE,
      timeUnit: "1s",
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: MAX_VUS,
      gracefulStop: "90s",
    },
  },
};

export default function () {
  const n = exec.scenario.iterationInTest;
  const body = JSON.stringify({
    model: MODEL,
    messages: [
      { role: "system", content: PREFIXES[n % GROUPS] },
      { role: "user", content: `Request ${n}: ${text(100000 + n, 300)}?` },
    ],
    max_tokens: MAX_TOKENS,
    stream: true,
  });
  const start = Date.now();
  const res = http.post(URL, body, PARAMS);
  const end = Date.now();
  const text_ = typeof res.body === "string" ? res.body : "";
  if (res.status === 200 && text_.endsWith("data: [DONE]\n\n")) {
    okRequests.add(1);
    ttft.add(res.timings.waiting);
    e2e.add(res.timings.duration);
    return;
  }
  failedRequests.add(1);
  if (res.error_code === 1050) hungRequests.add(1);
  const replica = res.headers ? res.headers["X-Sim-Replica"] || null : null;
  console.log(
    JSON.stringify({
      n: n,
      start: start,
      end: end,
      status: res.status,
      error: res.error || "",
      error_code: res.error_code || 0,
      replica: replica,
      bytes: text_.length,
      head: res.status === 200 ? "" : text_.substring(0, 200), // a cut stream's ids name the replica
    }),
  );
}

function value(data, name, stat, fallback) {
  const m = data.metrics[name];
  return m && m.values && m.values[stat] !== undefined ? m.values[stat] : fallback;
}

export function handleSummary(data) {
  const ms = (name, stat) => value(data, name, stat, null);
  const summary = {
    rate: RATE,
    duration: DURATION,
    wall_s: data.state.testRunDurationMs / 1000,
    sent: value(data, "http_reqs", "count", 0),
    ok: value(data, "ok_requests", "count", 0),
    failed: value(data, "failed_requests", "count", 0),
    hung: value(data, "hung_requests", "count", 0),
    dropped_iterations: value(data, "dropped_iterations", "count", 0),
    vus_max: value(data, "vus_max", "value", 0),
    ttft_ms: { p50: ms("ttft", "p(50)"), p90: ms("ttft", "p(90)"), p99: ms("ttft", "p(99)"), max: ms("ttft", "max") },
    e2e_ms: { p50: ms("e2e", "p(50)"), p90: ms("e2e", "p(90)"), p99: ms("e2e", "p(99)"), max: ms("e2e", "max") },
  };
  const out = { stdout: JSON.stringify(summary) + "\n" };
  if (__ENV.SUMMARY) out[__ENV.SUMMARY] = JSON.stringify(summary, null, 2);
  return out;
}
