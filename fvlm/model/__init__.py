"""The fVLM model: 3D ViT vision tower, anatomy pooling, BERT-family text tower, export.

Public API::

    from fvlm.model import create_model, list_models, FVLM, ModelConfig
    model = create_model("tiny", text={"vocab_size": len(tokenizer)})
    out = model(image, anatomy, input_ids, attention_mask, cut=None)   # dict, see FVLM.forward
    save_pretrained(model, tokenizer, "run/model"); model, tokenizer = load_pretrained("run/model")
"""

from fvlm.model.config import ModelConfig, ModelConfigError, PoolingConfig, TextConfig, VisionConfig
from fvlm.model.export import load_pretrained, read_config, save_pretrained
from fvlm.model.factory import create_model, list_models, load_model_config
from fvlm.model.fvlm import FVLM, OUTPUT_KEYS, count_parameters
from fvlm.model.pooling import AnatomyPooling, GlobalPooling, touch_mask
from fvlm.model.registry import (
    create_text_encoder,
    create_vision_encoder,
    list_text_encoders,
    list_vision_encoders,
    register_text_encoder,
    register_vision_encoder,
)
from fvlm.model.tokenizer import load_tokenizer, train_wordpiece
from fvlm.model.vision import ViT3D, VisionOutput, patchify, token_grid

__all__ = [
    "AnatomyPooling", "FVLM", "GlobalPooling", "ModelConfig", "ModelConfigError", "OUTPUT_KEYS", "PoolingConfig",
    "TextConfig", "ViT3D", "VisionConfig", "VisionOutput", "count_parameters", "create_model",
    "create_text_encoder", "create_vision_encoder", "list_models", "list_text_encoders", "list_vision_encoders",
    "load_model_config", "load_pretrained", "load_tokenizer", "patchify", "read_config", "register_text_encoder",
    "register_vision_encoder", "save_pretrained", "token_grid", "touch_mask", "train_wordpiece",
]
