"""Conversion between diffusers checkpoints (PyTorch layout) and jaxdiff NNX models."""
from jaxdiff.convert.configs import (UnsupportedConfigError, autoencoder_config_from_diffusers,
                                     autoencoder_config_to_diffusers, unet_config_from_diffusers,
                                     unet_config_to_diffusers)
from jaxdiff.convert.diffusers_model import load_diffusers_model
from jaxdiff.convert.diffusers_io import (diffusers_config, load_autoencoder, load_autoencoder_kl,
                                          load_diffusers, load_unet, load_vq_model, read_config,
                                          read_state_dict, save_diffusers)
from jaxdiff.convert.keys import CheckpointMismatchError, export_state_dict, load_state_dict
from jaxdiff.convert.lora import load_lora_diffusers, save_lora_diffusers
from jaxdiff.convert.clip import load_clip_text_model, save_clip_text_model
from jaxdiff.convert.text_to_image import PipelineError, TextToImagePipeline, load_text_to_image
from jaxdiff.convert.tokenizer import CLIPTokenizer, load_clip_tokenizer

__all__ = [
    "CLIPTokenizer", "PipelineError", "TextToImagePipeline", "load_clip_text_model", "load_clip_tokenizer",
    "load_text_to_image", "save_clip_text_model", "load_lora_diffusers", "save_lora_diffusers",
    "CheckpointMismatchError", "UnsupportedConfigError", "autoencoder_config_from_diffusers",
    "autoencoder_config_to_diffusers", "diffusers_config", "export_state_dict", "load_autoencoder",
    "load_autoencoder_kl", "load_diffusers", "load_diffusers_model", "load_state_dict", "load_unet", "load_vq_model", "read_config",
    "read_state_dict", "save_diffusers", "unet_config_from_diffusers", "unet_config_to_diffusers",
]
