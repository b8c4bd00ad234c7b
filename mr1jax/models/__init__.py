"""Vision-language models in Flax NNX, one interface for every family.

* `load_pretrained(path, *, dtype, param_dtype, mesh)` reads config.json's ``model_type`` (``qwen2_vl`` or
  ``qwen2_5_vl``) and returns a `Qwen2VL` or `Qwen25VL` with the checkpoint's weights;
* `save_pretrained(model, path)` writes a directory the matching ``transformers`` class loads;
* `config_from_hf(path_or_dict)` reads either family's config.json.

Both model classes share the trainer-facing interface (`forward`, `image_features`, `hidden_states`,
`logits`, `decode_hidden`; `prepare_inputs(config, ...)` for the host-side inputs); only the vision tower
differs, so the sampler, the GRPO / SFT steps, eval and export take either.
"""

from mr1jax.models.families import FAMILIES, config_class, config_from_hf, model_class
from mr1jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
from mr1jax.models.qwen2_vl import Qwen2VL, Qwen2VLConfig, prepare_inputs
from mr1jax.models.qwen2_vl.hf import CheckpointMismatchError, load_pretrained, save_pretrained

__all__ = ["FAMILIES", "CheckpointMismatchError", "Qwen25VL", "Qwen25VLConfig", "Qwen2VL", "Qwen2VLConfig",
           "config_class", "config_from_hf", "load_pretrained", "model_class", "prepare_inputs",
           "save_pretrained"]
