"""vla-opt: make Vision-Language-Action policies fast at inference time, and measure the cost."""

from vlaopt.config import HeadConfig, LMConfig, VisionConfig, VLAConfig
from vlaopt.model.vla import VLA
from vlaopt.optimize import apply, load_recipe

__all__ = ["VLA", "VLAConfig", "VisionConfig", "LMConfig", "HeadConfig", "apply", "load_recipe"]
__version__ = "0.1.0"
