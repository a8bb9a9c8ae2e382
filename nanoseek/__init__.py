"""nanoseek: DeepSeek-V3 and the DeepSeek-R1 recipe, small and readable."""
from nanoseek.config import ConfigError, ModelConfig

__all__ = ["ModelConfig", "ConfigError"]
__version__ = "0.1.0"
