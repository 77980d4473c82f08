"""Fakes for rehearsals and tests, like `trio.testing`: never used by a production node.

`faults`: `FaultyTransport` wraps any transport and drops or delays what a member
receives, by a seeded `FaultPlan` (loss, delay, jitter, network partitions).
"""
