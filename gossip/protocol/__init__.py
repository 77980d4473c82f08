"""The round protocol, sans-IO (h11 style): events in, actions out."""
