"""Kopf handlers; importing this package registers them with kopf's default registry."""

from . import fleet, lifecycle

__all__ = ["fleet", "lifecycle"]
