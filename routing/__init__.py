"""Decisions and outward adapters: request models, lanes, the route choice, providers, sinks.

Imports nothing of ``config``, ``tasks`` or ``gpu_worker`` (docs/architecture.md: one-way imports).
"""
