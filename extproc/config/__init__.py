"""Configuration documents (TokenPool, TokenEntitlement) and their loading/validation."""

from .documents import (
    API_VERSION,
    CLASS_WEIGHT,
    RESERVED_CLASSES,
    ServiceClass,
    TokenEntitlement,
    TokenPool,
)
from .load import Config, ConfigError, from_objects, load_file, load_text

__all__ = [
    "API_VERSION",
    "CLASS_WEIGHT",
    "RESERVED_CLASSES",
    "Config",
    "ConfigError",
    "ServiceClass",
    "TokenEntitlement",
    "TokenPool",
    "from_objects",
    "load_file",
    "load_text",
]
