// Routing-quality load: replay a pre-generated OpenAI streaming request sequence (Poisson arrivals) against
// the router under test, measuring TTFT, end-to-end latency, time per output token and output tokens.
//
//   k6 run -e TARGET=http://127.0.0.1:10000 -e REQUESTS=requests.json -e SUMMARY=summary.json \
//          -e ARM=epp -e WORKLOAD=shared-prefix -e QPS=6 benchmarks/k6/routing.js
//
// REQUESTS is a JSON file written by benchmarks/routing (epp.loadgen.workloads): a list of
// {"at": seconds after start, "path": "/v1/chat/completions", "body": {...stream: true...}}.
//
// Arrivals (open model, faithful Poisson): executor `shared-iterations` with as many VUs as requests and
// one iteration per request. Iteration i takes request i, sleeps until the scenario start + at[i], then
// sends it. Every request has a VU of its own, so a slow response never delays a later arrival (which a
// closed loop, or too few VUs, would do), and the inter-arrival gaps are exactly the generator's
// exponential gaps (an arrival-rate executor would space them evenly). The lateness of every send against
// its schedule is recorded (`schedule_lag`) to prove k6 kept up.
//
// TTFT: the simulated servers send the response headers together with the first token, so k6's time to
// first byte (`http_req_waiting`) is the time to first token as the client sees it; it is also recorded
// as the Trend `ttft` (ok responses only). The last SSE `usage` chunk gives output, prompt and cached
// tokens. Env: TARGET, REQUESTS, SUMMARY, ARM, WORKLOAD, QPS (tags), TIMEOUT (per request, default
// 600s), MAX_DURATION (whole replay, default 30m), MAX_ERROR_RATE (threshold, default 0.01).

import http from "k6/http";
import exec from "k6/execution";
import { sleep } from "k6";
import { SharedArray } from "k6/data";
import { Counter, Trend } from "k6/metrics";

const TARGET = __ENV.TARGET || "http://127.0.0.1:10000";
const TIMEOUT = __ENV.TIMEOUT || "600s";
const MAX_ERROR_RATE = parseFloat(__ENV.MAX_ERROR_RATE || "0.01");

// Parsed once, shared read-only by every VU (bodies are pre-serialised: no per-request JSON.stringify).
const REQUESTS = new SharedArray("requests", () =>
  JSON.parse(open(__ENV.REQUESTS)).map((r) => ({ at: r.at, url: TARGET + r.path, body: JSON.stringify(r.body) })),
);

const ttft = new Trend("ttft", true);
const e2e = new Trend("e2e", true);
const tpot = new Trend("tpot", true);
const scheduleLag = new Trend("schedule_lag", true);
const outputTokens = new Counter("output_tokens");
const promptTokens = new Counter("prompt_tokens");
const cachedTokens = new Counter("cached_tokens");
const okRequests = new Counter("ok_requests");
const errors = new Counter("errors");
const rejected429 = new Counter("rejected_429");
const noUsage = new Counter("no_usage");

export const options = {
  discardResponseBodies: false, // the SSE body is read for its final usage chunk
  summaryTrendStats: ["avg", "min", "med", "p(50)", "p(90)", "p(99)", "max", "count"],
  tags: {
    arm: __ENV.ARM || "unknown",
    workload: __ENV.WORKLOAD || "unknown",
    qps: __ENV.QPS || "-",
  },
  scenarios: {
    replay: {
      executor: "shared-iterations",
      vus: REQUESTS.length,
      iterations: REQUESTS.length,
      maxDuration: __ENV.MAX_DURATION || "30m",
      gracefulStop: "0s",
    },
  },
  thresholds: {
    http_req_failed: [`rate<${MAX_ERROR_RATE}`],
    schedule_lag: ["p(99)<100"], // ms: a late k6 would under-load the system
    no_usage: ["count<1"],
  },
};

const PARAMS = { headers: { "content-type": "application/json" }, timeout: TIMEOUT, responseType: "text" };

// The last `data: {...}` event carrying "usage" (the sim sends it right before `data: [DONE]`).
function usageOf(body) {
  if (!body) return null;
  const at = body.lastIndexOf('"usage"');
  if (at < 0) return null;
  const start = body.lastIndexOf("data: ", at);
  const end = body.indexOf("\n", at);
  try {
    return JSON.parse(body.substring(start + 6, end < 0 ? body.length : end)).usage;
  } catch (_) {
    return null;
  }
}

export default function () {
  const i = exec.scenario.iterationInTest;
  const req = REQUESTS[i];
  const due = exec.scenario.startTime + req.at * 1000;
  const wait = due - Date.now();
  if (wait > 0) sleep(wait / 1000);
  scheduleLag.add(Math.max(0, Date.now() - due));
  const res = http.post(req.url, req.body, PARAMS);
  if (res.status !== 200) {
    errors.add(1);
    if (res.status === 429) rejected429.add(1);
    return;
  }
  const usage = usageOf(res.body);
  if (!usage) {
    noUsage.add(1);
    errors.add(1);
    return;
  }
  const out = usage.completion_tokens || 0;
  const first = res.timings.waiting;
  const total = res.timings.duration;
  okRequests.add(1);
  ttft.add(first);
  e2e.add(total);
  if (out > 1) tpot.add((total - first) / (out - 1));
  outputTokens.add(out);
  promptTokens.add(usage.prompt_tokens || 0);
  cachedTokens.add((usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0);
}

function value(data, name, stat, fallback) {
  const m = data.metrics[name];
  return m && m.values && m.values[stat] !== undefined ? m.values[stat] : fallback;
}

const SECONDS = (ms) => (ms === null ? null : ms / 1000);

export function handleSummary(data) {
  const wall = data.state.testRunDurationMs / 1000;
  const out = value(data, "output_tokens", "count", 0);
  const ok = value(data, "ok_requests", "count", 0);
  const prompt = value(data, "prompt_tokens", "count", 0);
  const trend = (name) => ({
    avg_s: SECONDS(value(data, name, "avg", null)),
    p50_s: SECONDS(value(data, name, "p(50)", null)),
    p90_s: SECONDS(value(data, name, "p(90)", null)),
    p99_s: SECONDS(value(data, name, "p(99)", null)),
    max_s: SECONDS(value(data, name, "max", null)),
  });
  const summary = {
    tags: options.tags,
    requests: REQUESTS.length,
    ok: ok,
    errors: value(data, "errors", "count", 0),
    rejected_429: value(data, "rejected_429", "count", 0),
    http_req_failed: value(data, "http_req_failed", "passes", 0),
    no_usage: value(data, "no_usage", "count", 0),
    wall_s: wall,
    ttft: trend("ttft"),
    http_req_waiting: trend("http_req_waiting"),
    e2e: trend("e2e"),
    tpot: trend("tpot"),
    schedule_lag: trend("schedule_lag"),
    output_tokens: out,
    prompt_tokens: prompt,
    cached_tokens: value(data, "cached_tokens", "count", 0),
    output_tok_s: wall > 0 ? out / wall : 0,
    req_s: wall > 0 ? ok / wall : 0,
    thresholds_ok: Object.values(data.metrics).every(
      (m) => !m.thresholds || Object.values(m.thresholds).every((t) => t.ok),
    ),
  };
  const result = { stdout: JSON.stringify(summary) + "\n" };
  if (__ENV.SUMMARY) result[__ENV.SUMMARY] = JSON.stringify(summary, null, 2);
  return result;
}
