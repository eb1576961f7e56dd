"""diffusers ``config.json`` <-> jaxdiff config mapping.

Supported classes: ``UNet2DModel``, ``UNet2DConditionModel`` (SD 1.x/2.x block types),
``AutoencoderKL`` and ``VQModel``. Any other block type, or a config value jaxdiff does not
implement, raises :class:`UnsupportedConfigError` naming it.
"""
from __future__ import annotations

from jaxdiff.nn.autoencoder import AutoencoderConfig
from jaxdiff.nn.unet import UNetConfig


class UnsupportedConfigError(ValueError):
    """The diffusers config uses a feature jaxdiff does not implement."""


_DOWN = {"DownBlock2D": None, "AttnDownBlock2D": "self", "CrossAttnDownBlock2D": "cross"}
_UP = {"UpBlock2D": None, "AttnUpBlock2D": "self", "CrossAttnUpBlock2D": "cross"}
_UNET2D_DEFAULT_BLOCKS = (("DownBlock2D",) + ("AttnDownBlock2D",) * 3, ("AttnUpBlock2D",) * 3 + ("UpBlock2D",))
_COND_DEFAULT_BLOCKS = (("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
_DOWN_INV = {v: k for k, v in _DOWN.items()}
_UP_INV = {v: k for k, v in _UP.items()}

# Keys whose value does not change the network (or that jaxdiff keeps only as metadata).
_IGNORED = {"sample_size", "num_train_timesteps", "force_upcast", "upcast_attention",
            "addition_embed_type_num_heads", "lookup_from_codebook", "latents_mean", "latents_std"}


def _require(cfg: dict, key: str, allowed, cls: str):
    val = cfg.get(key, allowed[0])
    if isinstance(val, list):
        val = tuple(val)
    if val not in allowed:
        raise UnsupportedConfigError(f"{cls}: unsupported {key}={val!r} (jaxdiff supports {allowed})")
    return val


def _check_unknown(cfg: dict, known: set, cls: str):
    for k, v in cfg.items():
        if k.startswith("_") or k in known or k in _IGNORED:
            continue
        if v in (None, False):
            continue
        raise UnsupportedConfigError(f"{cls}: unsupported config key {k}={v!r}")


def _uniform(val, n, key, cls):
    if isinstance(val, (list, tuple)):
        if len(set(val)) != 1:
            raise UnsupportedConfigError(f"{cls}: per-level {key}={list(val)} is not supported")
        return val[0]
    return val


def _blocks(types, table, cls, which):
    out = []
    for t in types:
        t = t[7:] if t.startswith("UNetRes") else t
        if t not in table:
            raise UnsupportedConfigError(f"{cls}: unsupported {which} block type {t!r} "
                                         f"(supported: {sorted(table)})")
        out.append(table[t])
    return tuple(out)


_UNET_KNOWN = {"in_channels", "out_channels", "center_input_sample", "time_embedding_type",
               "time_embedding_dim", "freq_shift", "flip_sin_to_cos", "down_block_types", "mid_block_type",
               "up_block_types", "block_out_channels", "layers_per_block", "mid_block_scale_factor",
               "downsample_padding", "downsample_type", "upsample_type", "dropout", "act_fn",
               "attention_head_dim", "norm_num_groups", "attn_norm_num_groups", "norm_eps",
               "resnet_time_scale_shift", "add_attention", "class_embed_type", "num_class_embeds",
               # UNet2DConditionModel
               "only_cross_attention", "cross_attention_dim", "transformer_layers_per_block",
               "reverse_transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
               "num_attention_heads", "dual_cross_attention", "use_linear_projection",
               "addition_embed_type", "addition_time_embed_dim", "resnet_skip_time_act",
               "resnet_out_scale_factor", "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim",
               "conv_in_kernel", "conv_out_kernel", "projection_class_embeddings_input_dim",
               "attention_type", "class_embeddings_concat", "mid_block_only_cross_attention",
               "cross_attention_norm"}


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """Map a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` config dict to :class:`UNetConfig`."""
    cls = cfg.get("_class_name", "UNet2DModel")
    if cls not in ("UNet2DModel", "UNet2DConditionModel"):
        raise UnsupportedConfigError(f"expected a UNet2DModel or UNet2DConditionModel config, got {cls!r}")
    cond = cls == "UNet2DConditionModel"
    _check_unknown(cfg, _UNET_KNOWN, cls)
    _require(cfg, "time_embedding_type", ("positional",), cls)
    _require(cfg, "act_fn", ("silu", "swish"), cls)
    _require(cfg, "resnet_time_scale_shift", ("default", "scale_shift"), cls)
    _require(cfg, "class_embed_type", (None,), cls)
    _require(cfg, "downsample_type", ("conv",), cls)
    _require(cfg, "upsample_type", ("conv",), cls)
    for key, ok in [("only_cross_attention", (False,)), ("dual_cross_attention", (False,)),
                    ("encoder_hid_dim", (None,)), ("encoder_hid_dim_type", (None,)), ("num_attention_heads", (None,)),
                    ("addition_embed_type", (None,)), ("resnet_skip_time_act", (False,)),
                    ("resnet_out_scale_factor", (1.0, 1)), ("time_embedding_act_fn", (None,)),
                    ("timestep_post_act", (None,)), ("time_cond_proj_dim", (None,)), ("conv_in_kernel", (3,)),
                    ("conv_out_kernel", (3,)), ("attention_type", ("default",)),
                    ("class_embeddings_concat", (False,)), ("cross_attention_norm", (None,)),
                    ("reverse_transformer_layers_per_block", (None,)),
                    ("projection_class_embeddings_input_dim", (None,)),
                    ("mid_block_only_cross_attention", (None, False))]:
        _require(cfg, key, ok, cls)
    chs = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280) if cond else (224, 448, 672, 896)))
    n = len(chs)
    defaults = _COND_DEFAULT_BLOCKS if cond else _UNET2D_DEFAULT_BLOCKS
    down = _blocks(cfg.get("down_block_types", defaults[0]), _DOWN, cls, "down")
    up = _blocks(cfg.get("up_block_types", defaults[1]), _UP, cls, "up")
    if len(down) != n or len(up) != n:
        raise UnsupportedConfigError(f"{cls}: {len(down)} down / {len(up)} up block types for {n} levels")
    norm_groups = cfg.get("norm_num_groups", 32)
    if norm_groups is None:
        raise UnsupportedConfigError(f"{cls}: norm_num_groups=None is not supported")
    shift = cfg.get("resnet_time_scale_shift", "default")
    ahd = cfg.get("attention_head_dim", 8)
    ahd = tuple(ahd) if isinstance(ahd, (list, tuple)) else (ahd,) * n
    rev = tuple(reversed(chs))
    if cond:
        n_heads = ahd  # diffusers' historical naming: attention_head_dim holds the head count
        down_heads = tuple(n_heads[i] if down[i] == "cross" else chs[i] // (ahd[i] or chs[i]) for i in range(n))
        up_heads = tuple(n_heads[n - 1 - i] if up[i] == "cross" else rev[i] // (ahd[i] or rev[i])
                         for i in range(n))
        mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        mids = {"UNetMidBlock2DCrossAttn": ("cross", 1), "UNetMidBlock2D": (None, 0), None: (None, 0)}
        if mid_type not in mids:
            raise UnsupportedConfigError(f"{cls}: unsupported mid_block_type {mid_type!r}")
        mid_attention, mid_layers = mids[mid_type]
        mid_heads = n_heads[-1]
        mid_attn_groups = -1
        cad = cfg.get("cross_attention_dim", 1280)
        cad = _uniform(cad, n, "cross_attention_dim", cls)
        depth = _uniform(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block", cls)
        scale = cfg.get("mid_block_scale_factor", 1.0)
        num_classes = cfg.get("num_class_embeds")
    else:
        hd = ahd
        down_heads = tuple(chs[i] // (hd[i] or chs[i]) for i in range(n))
        up_heads = tuple(rev[i] // (hd[i] or rev[i]) for i in range(n))
        mid_type = cfg.get("mid_block_type", "UNetMidBlock2D")
        if mid_type not in ("UNetMidBlock2D", None):
            raise UnsupportedConfigError(f"{cls}: unsupported mid_block_type {mid_type!r}")
        mid_attention = "self" if cfg.get("add_attention", True) else None
        mid_layers = 1
        mid_heads = chs[-1] // (hd[-1] or chs[-1])
        ang = cfg.get("attn_norm_num_groups")
        mid_attn_groups = ang if ang is not None else (norm_groups if shift == "default" else None)
        cad, depth, scale = None, 1, cfg.get("mid_block_scale_factor", 1.0)
        num_classes = cfg.get("num_class_embeds")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        block_out_channels=chs, layers_per_block=(tuple(cfg["layers_per_block"])
                                                  if isinstance(cfg.get("layers_per_block"), list)
                                                  else cfg.get("layers_per_block", 2)),
        down_attention=down, up_attention=up, down_heads=down_heads, up_heads=up_heads,
        mid_block=mid_type is not None, mid_attention=mid_attention, mid_heads=mid_heads,
        mid_num_layers=mid_layers, mid_attn_norm_groups=mid_attn_groups, mid_block_scale_factor=scale,
        transformer_depth=depth, cross_attention_dim=cad,
        linear_projection=bool(cfg.get("use_linear_projection", False)), norm_num_groups=norm_groups,
        norm_eps=cfg.get("norm_eps", 1e-5), time_embed_dim=cfg.get("time_embedding_dim"),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0),
        resnet_time_scale_shift=shift, num_classes=num_classes, class_null=False,
        center_input_sample=cfg.get("center_input_sample", False),
        downsample_padding=cfg.get("downsample_padding", 1), dropout=cfg.get("dropout", 0.0))


def unet_config_to_diffusers(c: UNetConfig) -> dict:
    """Map a :class:`UNetConfig` to a diffusers config dict (``_class_name`` included)."""
    n = len(c.block_out_channels)
    chs = tuple(c.block_out_channels)
    rev = tuple(reversed(chs))
    down = tuple(c.down_attention)
    up = tuple(reversed(down)) if c.up_attention is None else tuple(c.up_attention)
    dh = (c.down_heads,) * n if isinstance(c.down_heads, int) else tuple(c.down_heads)
    uh = tuple(reversed(dh)) if c.up_heads is None else ((c.up_heads,) * n if isinstance(c.up_heads, int)
                                                          else tuple(c.up_heads))
    if not c.resample_with_conv:
        raise UnsupportedConfigError("resample_with_conv=False has no diffusers equivalent")
    if c.low_res_channels or c.aug_level_embedding:
        raise UnsupportedConfigError("a super-resolution UNet (low_res_channels, aug_level_embedding) has no "
                                     "diffusers UNet2DModel equivalent")
    cond = "cross" in down + up + (c.mid_attention,)
    common = dict(in_channels=c.in_channels, out_channels=c.out_channels, center_input_sample=c.center_input_sample,
                  flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift, block_out_channels=list(chs),
                  layers_per_block=(list(c.layers_per_block) if isinstance(c.layers_per_block, tuple)
                                    else c.layers_per_block),
                  down_block_types=[_DOWN_INV[a] for a in down], up_block_types=[_UP_INV[a] for a in up],
                  downsample_padding=c.downsample_padding, mid_block_scale_factor=c.mid_block_scale_factor,
                  dropout=c.dropout, act_fn="silu", norm_num_groups=c.norm_num_groups, norm_eps=c.norm_eps,
                  resnet_time_scale_shift=c.resnet_time_scale_shift, time_embedding_dim=c.time_embed_dim,
                  num_class_embeds=(c.num_classes + int(c.class_null)) if c.num_classes else None)
    if cond:
        heads = [dh[i] if down[i] == "cross" else None for i in range(n)]
        for i in range(n):
            if up[i] == "cross" and heads[n - 1 - i] not in (None, uh[i]):
                raise UnsupportedConfigError("up/down cross-attention head counts differ; not expressible")
            if up[i] == "cross":
                heads[n - 1 - i] = uh[i]
        if c.mid_attention == "cross":
            heads[-1] = c.mid_heads or dh[-1]
        if "self" in down + up:
            raise UnsupportedConfigError("mixing self- and cross-attention blocks is not exported")
        heads = [h if h is not None else 8 for h in heads]
        if c.mid_attention not in ("cross", None) or (c.mid_attention is None and c.mid_num_layers):
            raise UnsupportedConfigError(f"mid block {c.mid_attention!r} x {c.mid_num_layers} not exportable")
        return dict(_class_name="UNet2DConditionModel", **common,
                    mid_block_type=("UNetMidBlock2DCrossAttn" if c.mid_attention == "cross" else
                                    ("UNetMidBlock2D" if c.mid_block else None)),
                    attention_head_dim=heads if len(set(heads)) > 1 else heads[0],
                    cross_attention_dim=c.cross_attention_dim, transformer_layers_per_block=c.transformer_depth,
                    use_linear_projection=c.linear_projection)
    # UNet2DModel: one head width for all self-attention levels (None = one head per level).
    widths = {chs[i] // dh[i] for i in range(n) if down[i]} | {rev[i] // uh[i] for i in range(n) if up[i]}
    mid_heads = c.mid_heads or dh[-1]
    if c.mid_attention:
        widths.add(chs[-1] // mid_heads)
    single_head = all(h == 1 for i, h in enumerate(dh) if down[i]) and all(
        h == 1 for i, h in enumerate(uh) if up[i]) and (not c.mid_attention or mid_heads == 1)
    if single_head:
        head_dim = None
    elif len(widths) == 1:
        head_dim = widths.pop()
    else:
        raise UnsupportedConfigError(f"UNet2DModel needs one attention head width, got {sorted(widths)}")
    if c.mid_num_layers != 1 or not c.mid_block:
        raise UnsupportedConfigError("UNet2DModel mid block always has one attention layer")
    default_groups = c.norm_num_groups if c.resnet_time_scale_shift == "default" else None
    actual = c.norm_num_groups if c.mid_attn_norm_groups == -1 else c.mid_attn_norm_groups
    if actual is None and default_groups is not None and c.mid_attention:
        raise UnsupportedConfigError("mid attention without GroupNorm needs resnet_time_scale_shift='scale_shift' "
                                     "in diffusers")
    return dict(_class_name="UNet2DModel", **common, mid_block_type="UNetMidBlock2D",
                attention_head_dim=head_dim, add_attention=c.mid_attention is not None,
                attn_norm_num_groups=None if actual == default_groups else actual,
                time_embedding_type="positional")


_VAE_KNOWN = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "scaling_factor",
              "shift_factor", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
              "num_vq_embeddings", "vq_embed_dim", "norm_type"}


def autoencoder_config_from_diffusers(cfg: dict) -> tuple[str, AutoencoderConfig]:
    """Map a diffusers ``AutoencoderKL`` / ``VQModel`` config to ``(class_name, AutoencoderConfig)``."""
    cls = cfg.get("_class_name", "AutoencoderKL")
    if cls not in ("AutoencoderKL", "VQModel"):
        raise UnsupportedConfigError(f"expected an AutoencoderKL or VQModel config, got {cls!r}")
    _check_unknown(cfg, _VAE_KNOWN, cls)
    _require(cfg, "act_fn", ("silu", "swish"), cls)
    _require(cfg, "norm_type", ("group",), cls)
    _blocks(cfg.get("down_block_types", ["DownEncoderBlock2D"]), {"DownEncoderBlock2D": 1}, cls, "down")
    _blocks(cfg.get("up_block_types", ["UpDecoderBlock2D"]), {"UpDecoderBlock2D": 1}, cls, "up")
    chs = tuple(cfg.get("block_out_channels", (64,)))
    if len(cfg.get("down_block_types", [0])) != len(chs) or len(cfg.get("up_block_types", [0])) != len(chs):
        raise UnsupportedConfigError(f"{cls}: block type lists and block_out_channels differ in length")
    vq = cls == "VQModel"
    return cls, AutoencoderConfig(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3), block_out_channels=chs,
        layers_per_block=cfg.get("layers_per_block", 1), latent_channels=cfg.get("latent_channels", 3 if vq else 4),
        norm_num_groups=cfg.get("norm_num_groups", 32), scaling_factor=cfg.get("scaling_factor", 0.18215),
        shift_factor=cfg.get("shift_factor"), use_quant_conv=cfg.get("use_quant_conv", True),
        use_post_quant_conv=cfg.get("use_post_quant_conv", True),
        mid_block_add_attention=cfg.get("mid_block_add_attention", True),
        num_vq_embeddings=cfg.get("num_vq_embeddings", 256), vq_embed_dim=cfg.get("vq_embed_dim"))


def autoencoder_config_to_diffusers(c: AutoencoderConfig, cls: str) -> dict:
    """Map an :class:`AutoencoderConfig` to a diffusers ``AutoencoderKL`` or ``VQModel`` config."""
    n = len(c.block_out_channels)
    d = dict(_class_name=cls, in_channels=c.in_channels, out_channels=c.out_channels,
             down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
             block_out_channels=list(c.block_out_channels), layers_per_block=c.layers_per_block, act_fn="silu",
             latent_channels=c.latent_channels, norm_num_groups=c.norm_num_groups,
             scaling_factor=c.scaling_factor, mid_block_add_attention=c.mid_block_add_attention)
    if cls == "VQModel":
        d.update(num_vq_embeddings=c.num_vq_embeddings, vq_embed_dim=c.vq_embed_dim, norm_type="group")
    else:
        d.update(shift_factor=c.shift_factor, use_quant_conv=c.use_quant_conv,
                 use_post_quant_conv=c.use_post_quant_conv)
    return d
