"""Shared building blocks: table schemas, image reading."""
