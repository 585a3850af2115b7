"""Pydantic records and the build spec; the Arrow schemas are derived from these models."""
