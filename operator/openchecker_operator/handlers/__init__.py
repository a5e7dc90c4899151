"""Kopf handlers; importing this package registers them with kopf's default registry."""

from . import fleet, lifecycle, queues

__all__ = ["fleet", "lifecycle", "queues"]
