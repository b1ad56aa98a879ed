"""Celery configuration, read lazily by ``config.app`` so the broker is resolved at start-up."""

from __future__ import annotations

from datetime import timedelta

from kombu import Queue

from config.queues import (
    BATCH_QUEUE,
    CONTROL_QUEUE,
    DELIVER_QUEUE,
    GPU_QUEUE,
    REALTIME_QUEUE,
    SERVICE_QUEUES,
)
from config.settings import get_settings, redbeat_store_config

_s = get_settings()


# Celery's broker may be another engine than the lane store (MIXBATCH_BROKER_URL: RabbitMQ, a
# Redis, a Sentinel service); durability is the lane store's, so a lost or repeated message
# neither loses nor repeats a request (docs/scale-out.md).
broker_url = _s.broker_url()
# MIXBATCH_BEAT_SCHEDULER=redbeat: schedule and lock in the lane store, so a beat on every host
# is safe (one fires, the others wait on the lock); needed whenever beat runs on several hosts
globals().update(redbeat_store_config(_s.store_url(), _s.namespace))
broker_connection_retry_on_startup = True
broker_transport_options = {
    "visibility_timeout": _s.visibility_timeout_s,
    "priority_steps": list(range(10)),
    "queue_order_strategy": "priority",
    **_s.broker_transport_options(),
}
if broker_url.startswith(("amqp", "pyamqp")):
    # RabbitMQ confirms each publish: a Celery-callback delivery is marked only once the broker
    # has the message (a Redis broker has no such confirm: docs/scale-out.md)
    broker_transport_options["confirm_publish"] = True
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_send_sent_event = True
worker_send_task_events = True
worker_hijack_root_logger = False
timezone = "UTC"
enable_utc = True
task_default_queue = CONTROL_QUEUE
task_queues = tuple(Queue(name) for name in (*SERVICE_QUEUES, GPU_QUEUE))
task_routes = {
    "mixbatch.aggregate": {"queue": CONTROL_QUEUE},
    "mixbatch.sweep": {"queue": CONTROL_QUEUE},
    "mixbatch.enqueue": {"queue": CONTROL_QUEUE},
    "mixbatch.enqueue_many": {"queue": CONTROL_QUEUE},
    "mixbatch.realtime": {"queue": REALTIME_QUEUE},
    "mixbatch.deliver": {"queue": DELIVER_QUEUE},
    "mixbatch.deliver_many": {"queue": DELIVER_QUEUE},
    "mixbatch.gpu_batch": {"queue": GPU_QUEUE},
    "mixbatch.batch_flush": {"queue": CONTROL_QUEUE},
    "mixbatch.batch_submit": {"queue": BATCH_QUEUE},
    "mixbatch.batch_poll": {"queue": BATCH_QUEUE},
}
beat_schedule = {
    "aggregate": {
        "task": "mixbatch.aggregate",
        "schedule": timedelta(seconds=_s.aggregate_interval_s),
        "options": {"expires": _s.aggregate_interval_s * 5},
    },
    "batch-flush": {
        "task": "mixbatch.batch_flush",
        "schedule": timedelta(seconds=_s.batch_flush_interval_s),
        "options": {"expires": _s.batch_flush_interval_s * 5},
    },
    "batch-poll": {
        "task": "mixbatch.batch_poll",
        "schedule": timedelta(seconds=_s.batch_poll_interval_s),
        "options": {"expires": _s.batch_poll_interval_s * 3},
    },
    "sweep": {
        "task": "mixbatch.sweep",
        "schedule": timedelta(seconds=_s.sweep_interval_s),
        "options": {"expires": _s.sweep_interval_s * 3},
    },
}
