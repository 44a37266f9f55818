"""Sandbox lifecycle: the service that owns every sandbox's states (``service``, ``states``) and
the warm pool of sandboxes made ahead (``pool``). Above the runtime, below the API."""

from .pool import WarmPool, pool_sizes, warm_pool
from .service import CreateRequest, IdempotencyConflict, Listing, Sandbox, SandboxService
from .states import State, TransitionRefused

__all__ = [
    "CreateRequest",
    "IdempotencyConflict",
    "Listing",
    "Sandbox",
    "SandboxService",
    "State",
    "TransitionRefused",
    "WarmPool",
    "pool_sizes",
    "warm_pool",
]
