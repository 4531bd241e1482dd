// Picker-cost load: one small non-streaming OpenAI chat completion per iteration, POSTed to Envoy at a
// constant arrival rate (open model: requests start on schedule whether or not earlier ones finished, so a
// slow system shows up as latency and dropped iterations instead of silently lowering the load).
//
//   k6 run -e TARGET=http://127.0.0.1:10000 -e RATE=400 -e DURATION=10s -e VUS=50 \
//          -e SUMMARY=out.json -e ARM=epp -e MODE=full-duplex -e ENDPOINTS=64 benchmarks/k6/overhead.js
//
// Env: TARGET (Envoy ingress), RATE (requests/s), DURATION, VUS (preAllocatedVUs), MAX_VUS (default 2×VUS),
// P99_BOUND_MS (threshold, default 50), SUMMARY (JSON summary path), ARM / MODE / ENDPOINTS (tags), MODEL.
// Written by benchmarks/overhead/run.py, which drives it; usable alone too.

import http from "k6/http";
import { Counter } from "k6/metrics";

const TARGET = __ENV.TARGET || "http://127.0.0.1:10000";
const RATE = parseInt(__ENV.RATE || "100", 10);
const DURATION = __ENV.DURATION || "10s";
const VUS = parseInt(__ENV.VUS || "50", 10);
const MAX_VUS = parseInt(__ENV.MAX_VUS || String(2 * VUS), 10);
const P99_BOUND_MS = parseFloat(__ENV.P99_BOUND_MS || "50");
const MODEL = __ENV.MODEL || "m";

// A realistic small chat request: a system prompt plus a question, ~1 KB of JSON in all.
const SYSTEM =
  "You are a careful assistant for an online hardware store. Answer in at most three sentences, cite the " +
  "product page when you use it, never invent prices, and ask a clarifying question when the request is " +
  "ambiguous. Prefer metric units. If the customer mentions a safety problem, tell them to stop using the " +
  "product and to contact support before anything else. Orders ship within two working days; returns are " +
  "accepted for 30 days with the receipt. Do not discuss competitors, do not give legal advice, and keep " +
  "a friendly, plain tone. When a question needs a technician, offer to book one through the store page.";
const QUESTIONS = [
  "My cordless drill stops after a few seconds under load although the battery shows three bars. The " +
    "drill is two years old and I mostly use it for 8 mm holes in concrete. What should I check first?",
  "I need to hang a 25 kg mirror on a plasterboard wall with metal studs every 60 cm. Which anchors " +
    "would you recommend, and how many of them should I use for a mirror that is 120 cm wide?",
  "What is the difference between the 18 V and the 12 V versions of the impact driver in terms of torque, " +
    "weight and battery life, and which one would suit assembling furniture a few times a year?",
  "The thermostat I bought last month shows the wrong room temperature by about two degrees. Can I " +
    "calibrate it myself, or should I return it? The receipt says it has a two-year warranty.",
];
const BODIES = QUESTIONS.map((q) =>
  JSON.stringify({
    model: MODEL,
    messages: [
      { role: "system", content: SYSTEM },
      { role: "user", content: q },
    ],
    max_tokens: 64,
    temperature: 0,
    stream: false,
  }),
);
const URL = `${TARGET}/v1/chat/completions`;
const PARAMS = { headers: { "content-type": "application/json" } };

export const options = {
  discardResponseBodies: true, // the status says enough; reading bodies would cost k6 CPU we need
  summaryTrendStats: ["avg", "min", "med", "p(50)", "p(90)", "p(99)", "max"],
  tags: {
    arm: __ENV.ARM || "unknown",
    mode: __ENV.MODE || "-",
    endpoints: __ENV.ENDPOINTS || "-",
    rate: String(RATE),
  },
  scenarios: {
    overhead: {
      executor: "constant-arrival-rate",
      rate: RATE,
      timeUnit: "1s",
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: MAX_VUS,
      gracefulStop: "5s",
    },
  },
  thresholds: {
    http_req_failed: ["rate<0.01"],
    http_req_duration: [`p(99)<${P99_BOUND_MS}`],
    dropped_iterations: [`count<${Math.max(1, Math.floor(RATE * 0.01))}`],
  },
};

// Failed requests by status (0 = transport error / timeout): "no endpoint" and "picker bug" differ.
const FAILED_STATUSES = [0, 400, 404, 429, 500, 502, 503, 504];
const FAILED = Object.fromEntries(FAILED_STATUSES.map((s) => [s, new Counter(`failed_status_${s}`)]));
const FAILED_OTHER = new Counter("failed_status_other");

export default function () {
  const res = http.post(URL, BODIES[__ITER % BODIES.length], PARAMS);
  if (res.status !== 200) (FAILED[res.status] || FAILED_OTHER).add(1);
}

function metric(data, name, stat, fallback) {
  const m = data.metrics[name];
  return m && m.values && m.values[stat] !== undefined ? m.values[stat] : fallback;
}

export function handleSummary(data) {
  const seconds = data.state.testRunDurationMs / 1000;
  const requests = metric(data, "http_reqs", "count", 0);
  const failed = metric(data, "http_req_failed", "passes", 0);
  const summary = {
    target: URL,
    rate: RATE,
    duration: DURATION,
    pre_allocated_vus: VUS,
    max_vus: MAX_VUS,
    p99_bound_ms: P99_BOUND_MS,
    tags: options.tags,
    body_bytes: BODIES.map((b) => b.length),
    test_run_seconds: seconds,
    requests: requests,
    achieved_rps: metric(data, "http_reqs", "rate", 0),
    p50_ms: metric(data, "http_req_duration", "p(50)", null),
    p90_ms: metric(data, "http_req_duration", "p(90)", null),
    p99_ms: metric(data, "http_req_duration", "p(99)", null),
    max_ms: metric(data, "http_req_duration", "max", null),
    errors: failed,
    error_rate: metric(data, "http_req_failed", "rate", 0),
    failed_by_status: Object.fromEntries(
      [...FAILED_STATUSES, "other"]
        .map((s) => [String(s), metric(data, `failed_status_${s}`, "count", 0)])
        .filter(([, n]) => n > 0),
    ),
    dropped_iterations: metric(data, "dropped_iterations", "count", 0),
    vus_max: metric(data, "vus_max", "value", null),
  };
  const out = { stdout: JSON.stringify(summary) + "\n" };
  if (__ENV.SUMMARY) out[__ENV.SUMMARY] = JSON.stringify(summary, null, 2);
  return out;
}
