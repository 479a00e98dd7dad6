"""Test helpers: the protocol-speaking fake worker and the harness that runs real daemons around it."""
