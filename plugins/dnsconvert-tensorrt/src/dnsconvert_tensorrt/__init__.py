"""TensorRT target for dnsconvert (imports tensorrt only when building or running engines)."""

__version__ = "0.1.0"
PINNED_TENSORRT = ">=10,<12"
