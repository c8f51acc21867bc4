"""Prometheus text for a stats snapshot, rendered by prometheus-client at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from proxy.operations.stats import LATENCY_BUCKETS


class _SnapshotCollector:
    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        active = GaugeMetricFamily("element_proxy_connections_active", "Open connections.", labels=["listener"])
        total = CounterMetricFamily("element_proxy_connections", "Accepted connections.", labels=["listener"])
        for listener, counts in sorted(snap.get("connections", {}).items()):
            active.add_metric([listener], counts["active"])
            total.add_metric([listener], counts["total"])
        yield active
        yield total
        closed = CounterMetricFamily("element_proxy_connections_closed", "Ended connections by outcome.",
                                     labels=["outcome"])
        for outcome, count in sorted(snap.get("closed", {}).items()):
            closed.add_metric([outcome], count)
        yield closed
        refused = CounterMetricFamily("element_proxy_connections_refused", "Connections refused at accept "
                                      "(max_connections, a fail-closed element's breaker open).")
        refused.add_metric([], snap.get("refused", 0))
        yield refused
        written = CounterMetricFamily("element_proxy_bytes", "Bytes written, by direction (request: to the "
                                      "upstream, response: to the client).", labels=["direction"])
        for direction, count in sorted(snap.get("bytes", {}).items()):
            written.add_metric([direction], count)
        yield written
        yield from self._elements(snap.get("elements", {}))
        yield from self._modes(snap.get("elements", {}))

    @staticmethod
    def _elements(elements: dict[str, Any]) -> Iterator[Metric]:
        labels = ["position", "element"]
        up = GaugeMetricFamily("element_proxy_element_session_up",
                               "Worker sessions to the element that are up (one per worker).", labels=labels)
        breaker = GaugeMetricFamily("element_proxy_element_breaker_open",
                                    "Workers whose circuit breaker for the element is open.", labels=labels)
        describe_invalid = GaugeMetricFamily("element_proxy_element_describe_invalid",
                                             "Workers that cannot honour the element's Describe (it is treated "
                                             "as unreachable).", labels=labels)
        events = CounterMetricFamily("element_proxy_element_events", "Events sent to the element.",
                                     labels=[*labels, "kind"])
        batches = CounterMetricFamily("element_proxy_element_batches", "Session messages sent to the element "
                                      "(events / batches is how well batching works).", labels=labels)
        verdicts = CounterMetricFamily("element_proxy_element_verdicts", "Verdicts received, by event kind and "
                                       "action.", labels=[*labels, "kind", "action"])
        failures = CounterMetricFamily("element_proxy_element_failures", "Events the failure policy answered, by "
                                       "cause.", labels=[*labels, "cause"])
        invalid = CounterMetricFamily("element_proxy_element_invalid_verdicts", "Verdicts not followed, by cause "
                                      "(the ones with an event waiting also count as failures).",
                                      labels=[*labels, "cause"])
        closes_lost = CounterMetricFamily("element_proxy_element_closes_lost", "Close events not delivered: more "
                                          "connections ended while the session was down than the proxy keeps.",
                                          labels=labels)
        latency = HistogramMetricFamily("element_proxy_element_latency_seconds",
                                        "From sending an event to its verdict.", labels=labels)
        replica = [*labels, "endpoint"]
        endpoint_up = GaugeMetricFamily("element_proxy_element_endpoint_up", "Worker sessions to this replica "
                                        "(an address the element's name resolves to) that are up.", labels=replica)
        endpoint_draining = GaugeMetricFamily("element_proxy_element_endpoint_draining", "Worker sessions to this "
                                              "replica that see it draining (health NOT_SERVING or GOAWAY): it gets "
                                              "no new connections.", labels=replica)
        endpoint_connections = GaugeMetricFamily("element_proxy_element_endpoint_connections",
                                                 "Open connections assigned to this replica.", labels=replica)
        endpoint_events = CounterMetricFamily("element_proxy_element_endpoint_events", "Events sent to this "
                                              "replica.", labels=replica)
        for key, element in sorted(elements.items()):
            position, name = key.split(":", 1)
            values = [position, name]
            up.add_metric(values, element["up"])
            breaker.add_metric(values, element["breaker_open"])
            describe_invalid.add_metric(values, element["describe_invalid"])
            closes_lost.add_metric(values, element["closes_lost"])
            batches.add_metric(values, element["batches"])
            for kind, count in sorted(element["events"].items()):
                events.add_metric([*values, kind], count)
            for kind_action, count in sorted(element["verdicts"].items()):
                verdicts.add_metric([*values, *kind_action.split("/", 1)], count)
            for cause, count in sorted(element["failures"].items()):
                failures.add_metric([*values, cause], count)
            for cause, count in sorted(element["invalid_verdicts"].items()):
                invalid.add_metric([*values, cause], count)
            counts = element["latency"]["counts"]
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(values, buckets, element["latency"]["sum"])
            for endpoint, seen in sorted(element.get("endpoints", {}).items()):
                endpoint_up.add_metric([*values, endpoint], seen["up"])
                endpoint_draining.add_metric([*values, endpoint], seen["draining"])
                endpoint_connections.add_metric([*values, endpoint], seen["connections"])
                endpoint_events.add_metric([*values, endpoint], seen["events"])
        yield from (up, breaker, describe_invalid, events, batches, verdicts, failures, invalid, closes_lost, latency,
                    endpoint_up, endpoint_draining, endpoint_connections, endpoint_events)

    @staticmethod
    def _modes(elements: dict[str, Any]) -> Iterator[Metric]:
        """The operator's mode of each element, and what its no-wait verdicts did (detect) or would
        have done (shadow): a mode that does not enforce is always visible."""
        labels = ["position", "element"]
        mode = GaugeMetricFamily("element_proxy_element_mode", "The element's mode as configured (inline, detect, "
                                 "shadow): 1 for the mode it runs in.", labels=[*labels, "mode"])
        would = CounterMetricFamily("element_proxy_element_would", "Verdicts of a shadow-mode element that were "
                                    "not enforced, by what they would have done.", labels=[*labels, "action"])
        late = CounterMetricFamily("element_proxy_element_late_enforcements", "CLOSE and RESET verdicts of a "
                                   "detect-mode element, applied when they arrived.", labels=[*labels, "action"])
        delay = CounterMetricFamily("element_proxy_element_late_delay_seconds", "Sum over late enforcements of "
                                    "the time from sending the event to applying its verdict.", labels=labels)
        for key, element in sorted(elements.items()):
            values = key.split(":", 1)
            for name in element.get("mode", {}):
                mode.add_metric([*values, name], 1)
            for action, count in sorted(element.get("would", {}).items()):
                would.add_metric([*values, action], count)
            for action, count in sorted(element.get("late", {}).items()):
                late.add_metric([*values, action], count)
            delay.add_metric(values, element.get("late_delay_sum", 0.0))
        yield from (mode, would, late, delay)


def render(snapshot: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)
