"""Typed model configuration: :class:`ModelConfig` with nested vision, pooling and text parts.

Model sizes are data (``configs/model/*.yaml``); this module turns such a mapping into checked dataclasses
and back (``to_dict`` is what ``config.json`` of an export holds). Unknown keys are errors that name the
section and list the known fields, so a typo in a recipe fails at start-up, not after an hour of training.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from configs.checks import ConfigError
from configs.typed import CHECK, build


class ModelConfigError(ConfigError):
    """A model configuration (YAML preset, override or ``config.json``) is malformed."""


def _triple(where: str, name: str, value: Any) -> tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value, value)
    value = tuple(value)
    if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ModelConfigError(f"{where}: {name} must be three positive integers (z, y, x), got {list(value)}")
    return value  # type: ignore[return-value]


def check_windows(value: Any, where: str) -> tuple[tuple[float, float], ...]:
    """A non-empty list of ``[lo, hi]`` HU windows with ``lo < hi``, as a tuple of float pairs."""
    try:
        wins = tuple((float(lo), float(hi)) for lo, hi in value)
    except (TypeError, ValueError):
        raise ModelConfigError(f"{where}: give a list of [lo, hi] HU windows, e.g. [[-1150, 350], "
                               f"[-160, 240]], got {value!r}") from None
    if not wins or any(not lo < hi for lo, hi in wins):
        raise ModelConfigError(f"{where}: every window needs lo < hi and at least one window, got {value!r}")
    return wins


STEMS = ("linear", "conv")
TEXT_POOLINGS = ("cls", "mean")
"""How the text tower reads a text's vector (``TextConfig.pooling``)."""
"""Patch-embedding stems of the 3D ViT (``VisionConfig.stem``)."""


@dataclass
class VisionConfig:
    """3D ViT over the whole crop (docs/architecture.md#model: ViT-B, 3D patches of 16 x 16 x 32 in z, y, x)."""

    name: str = "vit3d"
    """Registry key of the vision encoder (``fvlm.model.registry.list_vision_encoders()``)."""
    in_channels: int = 1
    """Image channels (CT: 1 window; follows ``input_windows_hu`` when that is given)."""
    input_windows_hu: tuple[tuple[float, float], ...] | None = field(
        default=None, metadata={CHECK: lambda v, where: None if v is None else check_windows(v, where)})
    """HU windows, one per input channel: channel c is ``clip((hu - lo_c) / (hi_c - lo_c), 0, 1)``. None (the
    reference): one channel with the preprocess run's training window (``window_hu`` of ``preprocess.json``,
    -1150..350 HU). Several windows give the tower the contrast a radiologist's window presets give: a
    400 HU soft-tissue window makes a 40 HU density change 0.1 of the input range instead of 0.027, and a bone
    window keeps what the reference window clips at 350 HU (bone density, calcification, sclerosis). Part of the
    model config so a checkpoint says what its channels mean; evaluation and ``fvlm predict`` read it."""
    image_size: tuple[int, int, int] = (112, 256, 352)
    """(z, y, x) size the position embeddings are learned for; other sizes are interpolated to."""
    patch_size: tuple[int, int, int] = (16, 16, 32)
    """(z, y, x) patch size; every input side must be a multiple of it."""
    width: int = 768
    """Token width (embedding dimension of the ViT)."""
    depth: int = 12
    """Number of transformer blocks."""
    heads: int = 12
    """Attention heads per block; must divide ``width``."""
    mlp_ratio: float = 4.0
    """Hidden size of each block's MLP as a multiple of ``width``."""
    qkv_bias: bool = True
    """Bias in the query/key/value projection."""
    dropout: float = 0.0
    """Dropout on attention weights and block outputs (0 in the reference)."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon."""
    output_layers: tuple[int, ...] = (3, 6, 9, -1)
    """Blocks whose tokens are returned for pooling, 1-based (block 1 is the first); -1 means the last."""
    grad_checkpointing: bool = False
    """Recompute each block in backward (torch.utils.checkpoint, non-reentrant) to save activation memory."""
    stem: str = "linear"
    """Patch embedding: ``linear`` (one linear map per patch, the reference) or ``conv`` (hybrid stem: strided
    convolutions + GroupNorm + GELU, then a projection to ``width``; :class:`fvlm.model.vision.ConvStem`).
    Absent from configs written before the option: linear."""
    stem_channels: tuple[int, ...] = (16, 32, 64)
    """Channels of the conv stem's stages, one stage per entry (``stem: conv`` only; see :meth:`stem_strides`)."""
    anatomy_channels: int = 0
    """Anatomy map as input (0: off, the reference): E > 0 channels, a learned E-vector per anatomy label (0
    background, 1..A; ``fvlm.model.vision.AnatomyInput``), concatenated to the image before the stem, so the stem
    sees which voxels of a patch belong to which anatomy. With coarse tokens an anatomy fills a few percent of
    the tokens that touch it (benchmark geometry: adrenal 5%, pancreas 8%, bone 21%); the pooled tokens then
    mix its voxels with its neighbours', and its size or density cannot be read from them. The stem's input
    has ``stem_in_channels`` = in_channels + anatomy_channels channels."""

    def __post_init__(self) -> None:
        w = "model.vision"
        self.image_size = _triple(w, "image_size", self.image_size)
        if self.input_windows_hu is not None:
            self.input_windows_hu = check_windows(self.input_windows_hu, f"{w}.input_windows_hu")
            n = len(self.input_windows_hu)
            if self.in_channels not in (1, n):
                raise ModelConfigError(
                    f"{w}: in_channels={self.in_channels} but input_windows_hu gives {n} channel(s); leave "
                    "in_channels out (it follows the windows)"
                )
            self.in_channels = n
        self.patch_size = _triple(w, "patch_size", self.patch_size)
        if self.stem not in STEMS:
            raise ModelConfigError(f"{w}: unknown stem {self.stem!r}; choose one of {', '.join(STEMS)}")
        if isinstance(self.stem_channels, (str, int)) or not self.stem_channels or not all(
                isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.stem_channels):
            raise ModelConfigError(
                f"{w}: stem_channels must be a non-empty list of positive integers (one per conv stage, e.g. "
                f"[16, 32, 64]), got {self.stem_channels!r}"
            )
        self.stem_channels = tuple(self.stem_channels)
        if self.anatomy_channels < 0:
            raise ModelConfigError(f"{w}: anatomy_channels must be >= 0 (0: off), got {self.anatomy_channels}")
        if self.stem == "conv":
            odd = [f"{a}={p}" for p, a in zip(self.patch_size, "zyx") if p % 2]
            if odd:
                raise ModelConfigError(
                    f"{w}: stem conv cannot factor patch_size {list(self.patch_size)}: side {', '.join(odd)} is odd, "
                    "so the first stride-2 stage cannot downsample it; use even patch sides or stem: linear"
                )
        for s, p, axis in zip(self.image_size, self.patch_size, "zyx"):
            if s % p:
                raise ModelConfigError(f"{w}: image_size {axis}={s} is not a multiple of patch_size {axis}={p}")
        if self.width <= 0 or self.depth <= 0 or self.heads <= 0:
            raise ModelConfigError(f"{w}: width, depth and heads must be positive")
        if self.width % self.heads:
            raise ModelConfigError(f"{w}: heads={self.heads} does not divide width={self.width}")
        if self.mlp_ratio <= 0:
            raise ModelConfigError(f"{w}: mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"{w}: dropout must be in [0, 1), got {self.dropout}")
        layers = tuple(int(i) for i in self.output_layers)
        if not layers:
            raise ModelConfigError(f"{w}: output_layers is empty; give at least one block (e.g. [-1])")
        resolved = self.resolved_output_layers(layers)
        if len(set(resolved)) != len(resolved):
            raise ModelConfigError(f"{w}: output_layers {list(layers)} name a block twice (depth {self.depth})")
        self.output_layers = layers

    def resolved_output_layers(self, layers: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """``output_layers`` as 1-based block indices in [1, depth] (-1 -> depth)."""
        out = []
        for i in self.output_layers if layers is None else layers:
            j = self.depth + 1 + i if i < 0 else i
            if not 1 <= j <= self.depth:
                raise ModelConfigError(f"model.vision: output layer {i} is outside blocks 1..{self.depth}")
            out.append(j)
        return tuple(out)

    @property
    def stem_in_channels(self) -> int:
        """Channels the stem reads: the image's plus the anatomy map's (``anatomy_channels``)."""
        return self.in_channels + self.anatomy_channels

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (gz, gy, gx) of an ``image_size`` input."""
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))  # type: ignore[return-value]

    def stem_strides(self) -> tuple[tuple[tuple[int, int, int], ...], tuple[int, int, int]]:
        """Strides of the conv stem: ``(stage strides, projection kernel)``, all (z, y, x) triples.

        Rule, per axis with patch side p: stage i (in ``stem_channels`` order) has stride 2 when what is left
        of p after the earlier stages, r_i = p / (s_1 ... s_{i-1}), is even, else 1; the final projection has
        kernel = stride = what is left after the last stage, r = p / (s_1 ... s_K). So prod_i s_i * r = p on
        every axis: patch 8 x 8 x 8 with 3 stages -> strides 2, 2, 2 and a 1 x 1 x 1 projection; 8 x 16 x 16
        with 3 stages -> 2, 2, 2 and 1 x 2 x 2; 16 x 16 x 32 with 3 stages -> 2, 2, 2 and 2 x 2 x 4;
        4 x 16 x 16 with 3 stages -> (2, 2, 2), (2, 2, 2), (1, 2, 2) and 1 x 2 x 2.
        """
        left = list(self.patch_size)
        strides = []
        for _ in self.stem_channels:
            s = tuple(2 if r % 2 == 0 else 1 for r in left)
            left = [r // k for r, k in zip(left, s)]
            strides.append(s)
        return tuple(strides), tuple(left)  # type: ignore[return-value]


@dataclass
class PoolingConfig:
    """Anatomy pooling: one learnable query per anatomy attends to the tokens touching that anatomy."""

    heads: int = 12
    """Heads of the shared multi-head attention; must divide the vision width."""
    dropout: float = 0.0
    """Dropout on the pooling attention weights."""

    def __post_init__(self) -> None:
        if self.heads <= 0:
            raise ModelConfigError(f"model.pooling: heads must be positive, got {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"model.pooling: dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TextConfig:
    """BERT-family text encoder through transformers: built from these dimensions, or loaded from a local
    pretrained folder (``pretrained``). Nothing is ever fetched from a model hub."""

    name: str = "bert"
    """Registry key of the text encoder (``fvlm.model.registry.list_text_encoders()``)."""
    model_type: str = "bert"
    """transformers model type used when building from dimensions (a BERT-family encoder, e.g. bert)."""
    pretrained: str | None = None
    """Local folder with pretrained encoder weights (``from_pretrained(..., local_files_only=True)``)."""
    tokenizer: str | None = None
    """Local pretrained tokenizer folder; None: train a WordPiece tokenizer on the corpus."""
    vocab_size: int = 30522
    """Vocabulary size (of the WordPiece tokenizer to train, and of the encoder built from dimensions)."""
    hidden_size: int = 768
    """Encoder width."""
    num_layers: int = 12
    """Encoder layers."""
    num_heads: int = 12
    """Encoder attention heads."""
    intermediate_size: int = 3072
    """Encoder MLP hidden size."""
    max_position_embeddings: int = 512
    """Longest sequence the encoder accepts."""
    dropout: float = 0.1
    """Hidden and attention dropout of the encoder (also applied to a pretrained one)."""
    max_length: int = 128
    """Tokenizer truncation length (<= max_position_embeddings)."""
    grad_checkpointing: bool = False
    """Activation checkpointing inside the encoder (transformers' gradient_checkpointing_enable)."""
    hf_config: dict[str, Any] | None = None
    """Further transformers config fields of the encoder (written by exports); the fields above override it."""
    pooling: str = "cls"
    """The text's vector before the projection: ``cls`` (the first token's last hidden state, BERT's and the
    reference's) or ``mean`` (the mean of the attended tokens' last hidden states). An encoder trained from
    scratch starts with nearly one CLS state for every text (the CLS token's own embedding dominates its
    residual stream): texts' embeddings agree to cosine 0.9999 at initialisation, a saddle of the contrastive
    loss whose gradient vanishes there; the mean keeps the words (cosine 0.95). Absent from older configs: cls."""

    def __post_init__(self) -> None:
        w = "model.text"
        if self.pooling not in TEXT_POOLINGS:
            raise ModelConfigError(f"{w}: unknown pooling {self.pooling!r}; choose one of {', '.join(TEXT_POOLINGS)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ModelConfigError(f"{w}: {name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ModelConfigError(f"{w}: num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}")
        if self.max_length > self.max_position_embeddings:
            raise ModelConfigError(
                f"{w}: max_length={self.max_length} exceeds max_position_embeddings={self.max_position_embeddings}"
            )
        if self.hf_config is not None and not isinstance(self.hf_config, dict):
            raise ModelConfigError(f"{w}: hf_config must be a mapping, got {type(self.hf_config).__name__}")


@dataclass
class ModelConfig:
    """The whole fVLM model: vision tower, anatomy pooling, text tower, shared embedding space."""

    name: str = "custom"
    """Preset name (the YAML file's stem) or 'custom'."""
    description: str = ""
    """One line on what this size is for."""
    num_anatomies: int = 15
    """Anatomies A of the anatomy set (labels 1..A of the anatomy map; fvlm15 has 15)."""
    anatomy_names: tuple[str, ...] = ()
    """Names of the anatomies in label order (optional; when given, their count must be num_anatomies)."""
    embed_dim: int = 256
    """Dimension D of the shared image/text embedding space."""
    init_temperature: float = 0.07
    """Initial softmax temperature tau; the learnable logit scale starts at 1/tau (stored as its log)."""
    max_logit_scale: float = 100.0
    """Upper clamp of the logit scale 1/tau."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision tower."""
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    """Anatomy pooling."""
    text: TextConfig = field(default_factory=TextConfig)
    """Text tower."""
    heads: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    """Optional heads (``fvlm.model.heads``): head name -> its options, e.g. ``{uncertainty: {}}``; built in
    this order, saved and loaded with the model."""

    def __post_init__(self) -> None:
        if not isinstance(self.heads, dict) or not all(
                isinstance(k, str) and isinstance(v, (dict, type(None))) for k, v in self.heads.items()):
            raise ModelConfigError(f"model: heads must map head names to option mappings, got {self.heads!r}")
        self.heads = {k: dict(v or {}) for k, v in self.heads.items()}
        for key, cls in (("vision", VisionConfig), ("pooling", PoolingConfig), ("text", TextConfig)):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, build(cls, value, f"model.{key}", ModelConfigError))
            elif not isinstance(value, cls):
                raise ModelConfigError(f"model: {key} must be a mapping, got {type(value).__name__}")
        if not isinstance(self.num_anatomies, int) or self.num_anatomies <= 0:
            raise ModelConfigError(f"model: num_anatomies must be a positive integer, got {self.num_anatomies!r}")
        self.anatomy_names = tuple(self.anatomy_names)
        if self.anatomy_names and len(self.anatomy_names) != self.num_anatomies:
            raise ModelConfigError(
                f"model: anatomy_names has {len(self.anatomy_names)} names but num_anatomies={self.num_anatomies}"
            )
        if self.embed_dim <= 0:
            raise ModelConfigError(f"model: embed_dim must be positive, got {self.embed_dim}")
        if not 0 < self.init_temperature:
            raise ModelConfigError(f"model: init_temperature must be positive, got {self.init_temperature}")
        if self.max_logit_scale < 1.0 / self.init_temperature:
            raise ModelConfigError(
                f"model: max_logit_scale={self.max_logit_scale} is below the initial scale 1/{self.init_temperature}"
            )
        if self.vision.width % self.pooling.heads:
            raise ModelConfigError(
                f"model.pooling: heads={self.pooling.heads} does not divide vision width={self.vision.width}"
            )

    # ---- dict round trip ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model", **overrides: Any) -> "ModelConfig":
        """Build from a mapping (a parsed YAML preset or ``config.json``); ``overrides`` are merged in,
        nested mappings key by key (``text={"vocab_size": 500}`` changes only that field)."""
        if not isinstance(data, dict):
            raise ModelConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        return build(cls, merge(data, overrides), where, ModelConfigError)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable mapping (tuples as lists) that ``from_dict`` reads back."""

        def plain(v: Any) -> Any:
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v

        return plain(dataclasses.asdict(self))

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with ``overrides`` merged in (nested mappings key by key)."""
        return ModelConfig.from_dict(self.to_dict(), **overrides)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (mappings key by key, everything else replaced)."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "hf_config":
            out[k] = merge(out[k], v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            out[k] = dataclasses.asdict(v)
        else:
            out[k] = copy.deepcopy(v)
    return out
