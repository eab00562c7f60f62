"""Reads Prometheus text exposition on stdin with the reference parser
(prometheus_client.parser) and prints its families as JSON:
[{"name", "type", "samples": [{"name", "labels", "value"}]}]. Exits 1 if the text does
not parse."""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families

try:
    families = [
        {
            "name": f.name,
            "type": f.type,
            "samples": [
                {"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples
            ],
        }
        for f in text_string_to_metric_families(sys.stdin.read())
    ]
except Exception as e:  # the parser's errors are plain ValueErrors and friends
    print(f"unparsable exposition: {e!r}", file=sys.stderr)
    sys.exit(1)
json.dump(families, sys.stdout, allow_nan=True)
