"""The communication side of flnode: bytes, peers and trust.

This package moves and checks bytes. It never imports `node` or torch: it does
not know what a model is, only tensors as (name, dtype, shape, raw bytes).
"""
