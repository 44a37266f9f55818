"""Templates: steps into layers, built in build sandboxes, cached by content."""

from .build import Builder, BuildFailed, BuildLog
from .files import BadUpload, FileStore
from .service import TemplateService, build_image

__all__ = [
    "BadUpload",
    "BuildFailed",
    "BuildLog",
    "Builder",
    "FileStore",
    "TemplateService",
    "build_image",
]
