"""An MLX port of Helios / Wan2.1 pieces written independently of this repository's ``mlx_impl``.

It plays the part of a stranger's port that the parity harness must check without having
written it: its own module names, weight names, tensor layouts and call structure, plain
``mlx`` + ``numpy`` only. Each model mirrors a diffusers 0.42.1 module numerically:

- :mod:`external_port.rope`: ``HeliosRotaryPosEmbed`` + ``apply_rotary_emb_transposed``
  (plain functions ``rotary_table``, ``rotate``, ``axis_frequencies``);
- :mod:`external_port.embedding`: ``HeliosTimeTextEmbedding`` incl. the t = 0 history embedding
  (``TimeTextEmbedder``);
- :mod:`external_port.dit_block`: ``HeliosTransformerBlock`` (``HeliosBlock``);
- :mod:`external_port.wan_vae`: the ``AutoencoderKLWan`` (Wan2.1) chunked encode path
  (``WanVideoEncoder``).

Every model module has ``convert_state_dict(diffusers_state) -> port_state`` (strict: unknown
keys and incomplete fused groups raise, naming the keys) and ``load(model, converted, dtype=None)``
(strict: missing / extra / mis-shaped parameters raise; a missing one is named with the diffusers
key it comes from). See ``README.md`` next to this file for the module paths and layouts.
"""
from . import dit_block, embedding, rope, wan_vae, weights
from .dit_block import HeliosBlock
from .embedding import TimeTextEmbedder
from .wan_vae import WanVideoEncoder
from .weights import ConversionError

__all__ = ["ConversionError", "HeliosBlock", "TimeTextEmbedder", "WanVideoEncoder", "dit_block", "embedding",
           "rope", "wan_vae", "weights"]
