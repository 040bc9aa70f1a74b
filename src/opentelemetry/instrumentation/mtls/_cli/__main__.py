"""``python -m opentelemetry.instrumentation.mtls._cli``: the same as ``otel-mtls``."""

from opentelemetry.instrumentation.mtls._cli.main import main

raise SystemExit(main())
