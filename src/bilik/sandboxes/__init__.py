"""Sandbox lifecycle: the service that owns every sandbox's states (``service``, ``states``),
what a sandbox's timeout does (``lifecycle``: a kill or a pause) and the warm pool of
sandboxes made ahead (``pool``). Above the runtime, below the API."""

from .lifecycle import Lifecycle
from .pool import WarmPool, pool_sizes, warm_pool
from .service import CreateRequest, IdempotencyConflict, Listing, Sandbox, SandboxService
from .states import State, TransitionRefused

__all__ = [
    "CreateRequest",
    "IdempotencyConflict",
    "Lifecycle",
    "Listing",
    "Sandbox",
    "SandboxService",
    "State",
    "TransitionRefused",
    "WarmPool",
    "pool_sizes",
    "warm_pool",
]
