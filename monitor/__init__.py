"""Views of runs for operators: status reports, the web page, Prometheus metrics, run diffs."""
