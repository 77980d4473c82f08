"""The learning side of flnode: everything that touches data and models."""
