"""Thin Celery tasks wiring ``routing/`` (and later ``gpu_worker/``) to the lane store.

Each task loads state from the store, calls a pure decision, persists the outcome and
schedules what comes next. A lost or repeated message is harmless: every task re-reads the
store and every step checks its lease.
"""
