"""Secure aggregation's sans-IO core (issue 22): the field, the fixed-point encoding, Shamir
sharing with Reed-Solomon decoding, and the robust selection on secret-shared vectors
(BREA). Pure functions on numpy arrays: no I/O, no clock, no torch; the round machine
(gossip/protocol) drives them. What each party learns: docs/privacy-secure.md."""
