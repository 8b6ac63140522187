"""Bridges to other libraries and their checkpoint layouts."""
