"""The monitor job: scoring, drift per window, alerts, reports."""
