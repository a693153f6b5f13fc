"""modelgate: a reverse proxy that routes, shadows, faults and judges traffic to ML models."""

__version__ = "0.1.0"
