"""Dynamic batching of feature rows across machines (like Triton's dynamic batcher)."""

from appliance.batch.batcher import Batcher

__all__ = ["Batcher"]
