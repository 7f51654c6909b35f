"""Cart configuration: pydantic models and the YAML loader."""

from ilup_controller.config.loader import ConfigError, load_config
from ilup_controller.config.models import CartConfig

__all__ = ["CartConfig", "ConfigError", "load_config"]
