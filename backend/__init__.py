"""sam-backend: a Label Studio ML backend serving Segment Anything masks."""

__version__ = "0.1.0"
