"""Queue names, importable without resolving the broker."""

CONTROL_QUEUE = "mixbatch.control"
REALTIME_QUEUE = "mixbatch.realtime"
DELIVER_QUEUE = "mixbatch.deliver"
BATCH_QUEUE = "mixbatch.batch"
GPU_QUEUE = "gpu"
SERVICE_QUEUES = (CONTROL_QUEUE, REALTIME_QUEUE, DELIVER_QUEUE, BATCH_QUEUE)
