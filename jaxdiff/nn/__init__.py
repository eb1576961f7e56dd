"""Flax NNX models for diffusion: UNet (DDPM/ADM/SD), KL and VQ autoencoders. NHWC layout."""
from jaxdiff.nn.attention import Attention, SpatialSelfAttention, Transformer2D, TransformerBlock
from jaxdiff.nn.clip_text import CLIPTextConfig, CLIPTextModel
from jaxdiff.nn.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from jaxdiff.nn.embeddings import TimestepEmbedding, timestep_embedding
from jaxdiff.nn.layers import Conv2d, Dense, Downsample2D, Embed, GroupNorm, LayerNorm, Upsample2D
from jaxdiff.nn.resnet import ResnetBlock2D
from jaxdiff.nn.unet import UNet, UNetConfig, count_params
from jaxdiff.nn.vq import VectorQuantizer, VQModel

__all__ = [
    "Attention", "AutoencoderConfig", "CLIPTextConfig", "CLIPTextModel", "AutoencoderKL", "Conv2d", "Dense", "DiagonalGaussian", "Downsample2D",
    "Embed", "GroupNorm", "LayerNorm", "ResnetBlock2D", "SpatialSelfAttention", "TimestepEmbedding",
    "Transformer2D", "TransformerBlock", "UNet", "UNetConfig", "Upsample2D", "VQModel", "VectorQuantizer",
    "count_params", "timestep_embedding",
]
