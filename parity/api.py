"""What the glue for a user's own port needs, in one import.

``from parity.api import ...`` gives the harness's components (to subclass: the reference side,
inputs, configs and thresholds come with them), the MLX capture and alignment declarations, and
the strict weight loader. See README "Checking your own port" and examples/external_port_parity.py.
"""
from mlx_impl.vae_decoder import encoder_weights
from parity.alignment import Alignment, Exclusion, Rule
from parity.capture_mlx import MlxHooks
from parity.component import Component, RunContext, Section
from parity.components.block import BlockComponent
from parity.components.rope import RopeComponent
from parity.components.scheduler import SchedulerComponent
from parity.components.time_embedding import TimeEmbeddingComponent
from parity.components.vae import VaeComponent
from parity.components.wan_block import WanBlockComponent
from parity.config import ComponentConfig
from parity.weights import strict_load

__all__ = ["Alignment", "BlockComponent", "Component", "ComponentConfig", "Exclusion", "MlxHooks", "RopeComponent",
           "Rule", "RunContext", "SchedulerComponent", "Section", "TimeEmbeddingComponent", "VaeComponent",
           "WanBlockComponent", "encoder_weights", "strict_load"]
