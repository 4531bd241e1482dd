// Flow-control load: replay a pre-generated mixed sequence (priorities x tenants, Poisson arrivals) through
// the router under test and record one sample per request, for the Python side to aggregate.
//
//   k6 run --out csv=samples.csv -e TARGET=http://127.0.0.1:10000 -e REQUESTS=requests.json \
//          benchmarks/flowcontrol/mixed.js
//
// REQUESTS (written by benchmarks/flowcontrol/workload.py): a list of {"at": seconds after start, "path",
// "body" (streaming chat), "headers" (objective, fairness id), "cls", "tenant"}. Arrivals as in
// benchmarks/k6/routing.js (open model: one VU per request, each sleeps until its offset, lateness kept in
// `schedule_lag`). Per request, the Trend `fc_request` gets the time to first byte in ms (the simulator
// sends headers with the first token: TTFT) for a 200, the duration otherwise, tagged with the request's
// index, class, tenant, HTTP status, drop reason (x-llm-d-request-dropped-reason), output tokens (from
// the final SSE usage chunk) and end-to-end ms.

import http from "k6/http";
import exec from "k6/execution";
import { sleep } from "k6";
import { SharedArray } from "k6/data";
import { Trend } from "k6/metrics";

const TARGET = __ENV.TARGET || "http://127.0.0.1:10000";
const TIMEOUT = __ENV.TIMEOUT || "300s";

const REQUESTS = new SharedArray("requests", () =>
  JSON.parse(open(__ENV.REQUESTS)).map((r) => ({
    at: r.at,
    url: TARGET + r.path,
    body: JSON.stringify(r.body),
    headers: Object.assign({ "content-type": "application/json" }, r.headers),
    cls: r.cls,
    tenant: r.tenant,
  })),
);

const sample = new Trend("fc_request", true);
const scheduleLag = new Trend("schedule_lag", true);

export const options = {
  discardResponseBodies: false,
  summaryTrendStats: ["p(50)", "p(90)", "p(99)", "max", "count"],
  scenarios: {
    replay: {
      executor: "shared-iterations",
      vus: REQUESTS.length,
      iterations: REQUESTS.length,
      maxDuration: __ENV.MAX_DURATION || "20m",
      gracefulStop: "0s",
    },
  },
  thresholds: { schedule_lag: ["p(99)<100"] },
};

function outputTokens(body) {
  if (!body) return -1;
  const at = body.lastIndexOf('"usage"');
  if (at < 0) return -1;
  const start = body.lastIndexOf("data: ", at);
  const end = body.indexOf("\n", at);
  try {
    return JSON.parse(body.substring(start + 6, end < 0 ? body.length : end)).usage.completion_tokens || 0;
  } catch (_) {
    return -1;
  }
}

export default function () {
  const i = exec.scenario.iterationInTest;
  const req = REQUESTS[i];
  const due = exec.scenario.startTime + req.at * 1000;
  const wait = due - Date.now();
  if (wait > 0) sleep(wait / 1000);
  scheduleLag.add(Math.max(0, Date.now() - due));
  const res = http.post(req.url, req.body, { headers: req.headers, timeout: TIMEOUT, responseType: "text" });
  const ok = res.status === 200;
  sample.add(ok ? res.timings.waiting : res.timings.duration, {
    i: String(i),
    cls: req.cls,
    tenant: req.tenant,
    code: String(res.status),
    reason: res.headers["X-Llm-D-Request-Dropped-Reason"] || "",
    out: String(ok ? outputTokens(res.body) : 0),
    e2e: String(Math.round(res.timings.duration)),
    sent: String(Date.now() - Math.round(res.timings.duration) - exec.scenario.startTime),
  });
}

export function handleSummary(data) {
  const lag = data.metrics.schedule_lag;
  const summary = { wall_s: data.state.testRunDurationMs / 1000, schedule_lag_p99_ms: lag ? lag.values["p(99)"] : null };
  const out = { stdout: JSON.stringify(summary) + "\n" };
  if (__ENV.SUMMARY) out[__ENV.SUMMARY] = JSON.stringify(summary);
  return out;
}
