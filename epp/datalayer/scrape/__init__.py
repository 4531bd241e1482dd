"""Scraping model servers' Prometheus pages: `http_get` (transport), `extract` (text → `MetricsSnapshot`,
driven by the metric names in `epp.datalayer.engines`), `scraper` (one loop per endpoint)."""
