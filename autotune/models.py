"""The model catalog: named Llama presets built from configs in code, and their weights.

A preset is the public architecture config of a model; no file is downloaded. Weights come
from a :class:`WeightSource`: seeded random ("dummy") weights by default, which run at the same
speed as real ones (vLLM's ``load_format=dummy`` is the precedent), or a local Hugging Face
checkpoint directory (safetensors only, no remote code, no network).

This module does not place weights on a device for serving: engines do that, unit by unit,
straight from the source (so a 7B model never exists twice in memory).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from autotune.errors import UserInputError

DTYPES = ("float16", "bfloat16", "float32")
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a Llama-family decoder, enough to build it and to predict its memory."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Rotary scaling as Hugging Face configs give it, as sorted (key, value) pairs (hashable):
    # ("rope_type", "llama3" | "linear") and its factors; () for none.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    # The LM head is the embedding matrix (Llama 3.2). Engines still hold the head as their
    # own copy (streamed or resident like any unit), so the bytes counted stay two matrices.
    tie_word_embeddings: bool = False
    description: str = ""
    weights_dir: str | None = None  # set when built from a local checkpoint

    def __post_init__(self) -> None:
        for key in _SIZES:
            value = getattr(self, key)
            if not _whole(value):
                raise UserInputError(f"model {self.name}: {key}: expected a whole number, 1 or "
                                     f"more; got {value!r}")
        for key in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, key)
            if not _positive(value):
                raise UserInputError(f"model {self.name}: {key}: expected a number above 0; "
                                     f"got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise UserInputError(
                f"model {self.name}: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserInputError(
                f"model {self.name}: num_attention_heads {self.num_attention_heads} is not a "
                f"multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        kind = dict(self.rope_scaling).get("rope_type", "default") if self.rope_scaling else None
        if kind not in (None, *ROPE_SCALINGS):
            raise UserInputError(
                f"model {self.name}: rope scaling {kind!r} is not implemented (autotune runs "
                f"{', '.join(ROPE_SCALINGS)})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape of one decoder layer, in Hugging Face naming."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        kv = self.num_key_value_heads * d
        p = f"model.layers.{layer}."
        return {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }

    def other_shapes(self) -> dict[str, tuple[int, ...]]:
        """The weights outside the decoder layers (embedding, final norm, LM head)."""
        return {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
            "model.norm.weight": (self.hidden_size,),
            "lm_head.weight": (self.vocab_size, self.hidden_size),
        }

    def all_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = dict(self.other_shapes())
        for layer in range(self.num_hidden_layers):
            shapes.update(self.layer_shapes(layer))
        return shapes

    def num_params(self) -> int:
        return sum(_numel(s) for s in self.all_shapes().values())

    def distinct_params(self) -> int:
        """The model's parameter count as published: a tied head counted once (engines still
        hold it as its own copy, so weight_bytes counts it twice)."""
        tied = self.vocab_size * self.hidden_size if self.tie_word_embeddings else 0
        return self.num_params() - tied

    def layer_params(self) -> int:
        return sum(_numel(s) for s in self.layer_shapes(0).values())

    def weight_bytes(self, dtype: str) -> int:
        return self.num_params() * dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Bytes of KV cache one token of one sequence holds, all layers."""
        kv = self.num_key_value_heads * self.head_dim
        return 2 * self.num_hidden_layers * kv * dtype_bytes(dtype)

    def hf_config(self, dtype: str = "float32") -> Any:
        """The ``transformers.LlamaConfig`` of this spec."""
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) or None,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
        )


# The sizes of a model (ModelSpec's fields; config.json's keys): each a whole number >= 1.
_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "vocab_size", "max_position_embeddings")


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and v > 0)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def dtype_bytes(dtype: str) -> int:
    check_dtype(dtype)
    return _DTYPE_BYTES[dtype]


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise UserInputError(f"dtype: expected one of {', '.join(DTYPES)}; got {dtype!r}")
    return dtype


def torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, check_dtype(dtype))


# Rotary scalings the native runtime implements (autotune.streaming.llama.rope_frequencies).
ROPE_SCALINGS = ("linear", "llama3")
# Llama 3.1's: low frequencies slowed down by 8, a smooth band between (its config.json).
_LLAMA31_ROPE = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                 ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
_LLAMA32_ROPE = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                 ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))

# The public Llama-2, Llama-3.1 and Llama-3.2 configs (meta-llama/*/config.json), plus a tiny model for
# CPU tests and demos. tiny-llama has grouped-query attention so that path is tested too.
PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("llama2-7b", 4096, 11008, 32, 32, 32, 32000,
                  description="Llama-2 7B"),
        ModelSpec("llama2-13b", 5120, 13824, 40, 40, 40, 32000,
                  description="Llama-2 13B"),
        ModelSpec("llama2-70b", 8192, 28672, 80, 64, 8, 32000,
                  description="Llama-2 70B, GQA"),
        ModelSpec("llama3-8b", 4096, 14336, 32, 32, 8, 128256, max_position_embeddings=131072,
                  rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                  description="Llama-3.1 8B, GQA"),
        ModelSpec("llama3-70b", 8192, 28672, 80, 64, 8, 128256, max_position_embeddings=131072,
                  rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                  description="Llama-3.1 70B, GQA"),
        ModelSpec("llama3.2-1b", 2048, 8192, 16, 32, 8, 128256, max_position_embeddings=131072,
                  rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True,
                  description="Llama-3.2 1B, GQA"),
        ModelSpec("tiny-llama", 128, 352, 6, 4, 2, 512, max_position_embeddings=1024,
                  description="CPU tests only"),
    )
}


def get_spec(name: str, weights: str | Path | None = None) -> ModelSpec:
    """The spec of a preset, or of the checkpoint in ``weights`` (which then names the model)."""
    if weights is not None:
        spec = spec_from_checkpoint(weights, name)
        preset = PRESETS.get(name)
        if preset is not None and _shape(preset) != _shape(spec):
            # Labelled with a preset's name, its studies and reproduce lines would say (and
            # `autotune bench --model NAME` would run) a model it is not.
            raise UserInputError(
                f"--model {name} is a preset ({_shape(preset)}), but the checkpoint in "
                f"{weights} is {_shape(spec)}: leave --model out (the checkpoint names itself) "
                "or give a name that is not a preset's")
        return spec
    if name not in PRESETS:
        raise UserInputError(
            f"unknown model {name!r}; known models: {', '.join(PRESETS)} "
            "(or give --weights DIR with a local Hugging Face Llama checkpoint)"
        )
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------
# Weight sources


class WeightSource(Protocol):
    """Gives each named parameter as a tensor of the requested shape, dtype and device."""

    def get(self, name: str, shape: tuple[int, ...], dtype: Any, device: Any) -> Any: ...


@dataclass(frozen=True)
class RandomWeights:
    """Seeded random weights: normal(0, std) matrices, ones for the RMSNorm scales.

    Each tensor's values depend only on (seed, name, device type), so every engine and the
    reference model see the same weights.
    """

    seed: int = 0
    std: float = 0.02
    tied: bool = False  # the LM head is the embedding (tie_word_embeddings)

    def get(self, name: str, shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
        import torch

        if self.tied and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype, device=device)
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.normal_(0.0, self.std, generator=gen)


@dataclass(frozen=True)
class CheckpointWeights:
    """Weights of a local Hugging Face checkpoint directory (``*.safetensors`` only)."""

    path: str
    _index: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        directory = Path(self.path)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise UserInputError(
                f"--weights {self.path}: no *.safetensors files there (autotune loads only "
                "safetensors checkpoints, never pickled .bin files)"
            )
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    self._index[key] = str(file)

    def names(self) -> Iterator[str]:
        return iter(self._index)

    def get(self, name: str, shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
        from safetensors import safe_open

        if name not in self._index:
            if name == "lm_head.weight" and "model.embed_tokens.weight" in self._index:
                name = "model.embed_tokens.weight"  # tied embeddings
            else:
                raise UserInputError(f"--weights {self.path}: the checkpoint has no {name}")
        with safe_open(self._index[name], framework="pt") as f:
            t = f.get_tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise UserInputError(
                f"--weights {self.path}: {name} has shape {tuple(t.shape)}, "
                f"the config says {tuple(shape)}"
            )
        return t.to(device=device, dtype=dtype)


def spec_from_checkpoint(weights: str | Path, name: str | None = None) -> ModelSpec:
    """Reads ``config.json`` of a local Llama checkpoint (no remote code, no network)."""
    directory = Path(weights)
    try:
        directory.resolve(strict=directory.is_symlink())
    except (OSError, RuntimeError) as e:  # a symbolic link loop, a link to nothing
        raise UserInputError(f"--weights {weights}: cannot be followed ({e}); give the "
                             "checkpoint's real folder") from e
    if directory.exists() and not directory.is_dir():
        raise UserInputError(f"--weights {weights}: is a file; give the checkpoint's folder "
                             "(the one holding config.json and *.safetensors)")
    if not directory.is_dir():
        raise UserInputError(f"--weights {weights}: no such directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserInputError(
            f"--weights {weights}: not a Hugging Face checkpoint (no config.json there)"
        )
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON
        raise UserInputError(f"--weights {weights}: config.json is not valid JSON "
                             f"({type(e).__name__}: {e})"[:300]) from e
    if not isinstance(cfg, dict):
        raise UserInputError(f"--weights {weights}: config.json is a JSON "
                             f"{type(cfg).__name__}; a Hugging Face config is an object")
    if cfg.get("model_type") not in ("llama", "mistral"):
        raise UserInputError(
            f"--weights {weights}: model_type {cfg.get('model_type')!r} is not supported; "
            "autotune runs Llama-family checkpoints (model_type 'llama' or 'mistral')"
        )
    _check_fields(cfg, weights)
    _check_supported(cfg, weights)
    rope = cfg.get("rope_parameters") or {}
    try:
        return ModelSpec(
            name=name or directory.name,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=_positions(cfg),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            description=f"checkpoint {directory}",
            weights_dir=str(directory),
        )
    except KeyError as e:
        raise UserInputError(f"--weights {weights}: config.json lacks {e.args[0]}") from e


def _shape(spec: ModelSpec) -> str:
    """What makes two models the same model, in words."""
    return (f"{spec.num_hidden_layers} layers, hidden {spec.hidden_size}, intermediate "
            f"{spec.intermediate_size}, {spec.num_attention_heads}/{spec.num_key_value_heads} "
            f"heads, vocabulary {spec.vocab_size}")


def _check_fields(cfg: dict[str, Any], weights: str | Path) -> None:
    """Every field autotune reads from config.json, of its type and range (a size of 0, or
    "64" as a string, would fail far from here, in words that do not name the field)."""
    def bad(key: str, expected: str) -> UserInputError:
        return UserInputError(f"--weights {weights}: config.json's {key}: expected "
                              f"{expected}; got {cfg[key]!r}")

    for key in _SIZES:
        optional = key in ("num_key_value_heads", "max_position_embeddings")
        if key not in cfg and optional:
            continue
        if key not in cfg:
            raise UserInputError(f"--weights {weights}: config.json lacks {key}")
        if not _whole(cfg[key]):
            raise bad(key, "a whole number, 1 or more")
    for key in ("head_dim", "sliding_window"):
        if cfg.get(key) is not None and not _whole(cfg[key]):
            raise bad(key, "a whole number, 1 or more (or null)")
    for key in ("rms_norm_eps", "rope_theta"):
        if key in cfg and not _positive(cfg[key]):
            raise bad(key, "a number above 0")
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise bad(key, "a JSON object (or null)")
    for key in ("rope_scaling", "rope_parameters"):
        for name, value in (cfg.get(key) or {}).items():
            if name in _ROPE_NUMBERS and not _positive(value):
                raise UserInputError(f"--weights {weights}: config.json's {key} {name}: "
                                     f"expected a number above 0; got {value!r}")


# The numbers of a rotary scaling (and transformers 5's rope_parameters), each above 0.
_ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                 "original_max_position_embeddings")


def _positions(cfg: dict[str, Any]) -> int:
    """The longest sequence autotune runs: Mistral's sliding window, where it has one, bounds
    it (within the window, its attention is Llama's; beyond, it would differ)."""
    positions = cfg.get("max_position_embeddings", 4096)
    window = cfg.get("sliding_window") if cfg.get("model_type") == "mistral" else None
    return min(positions, window) if window else positions


def _rope_scaling(cfg: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The checkpoint's rotary scaling: transformers 4's ``rope_scaling`` (``type`` in old
    files) or transformers 5's ``rope_parameters`` (which also holds ``rope_theta``)."""
    scaling = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    scaling.pop("rope_theta", None)
    if "type" in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return ()
    return tuple(sorted(scaling.items()))


def _check_supported(cfg: dict[str, Any], weights: str | Path) -> None:
    """Refuses what the native runtime would compute differently from the checkpoint's own
    model: biases, another activation, a head size that is not hidden / heads."""
    unsupported = []
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            unsupported.append(f"{key}=true")
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={cfg['hidden_act']!r}")
    head_dim = cfg.get("head_dim")
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    if head_dim is not None and heads and hidden and head_dim * heads != hidden:
        unsupported.append(f"head_dim={head_dim} (not hidden_size / num_attention_heads)")
    if unsupported:
        raise UserInputError(
            f"--weights {weights}: {', '.join(unsupported)} is not supported; autotune runs "
            "Llama checkpoints without biases, with SiLU and head_dim = hidden_size / heads")


def weight_source(spec: ModelSpec, seed: int = 0) -> WeightSource:
    """The checkpoint's weights when the spec came from one, else seeded random weights."""
    if spec.weights_dir is not None:
        return CheckpointWeights(spec.weights_dir)
    return RandomWeights(seed, tied=spec.tie_word_embeddings)


def build_hf_model(spec: ModelSpec, dtype: str, device: str, source: WeightSource) -> Any:
    """A ``transformers`` LlamaForCausalLM with the source's weights: the reference model for
    numerics tests and the module Torch-TensorRT compiles."""
    import torch
    from transformers import LlamaForCausalLM

    tdtype = torch_dtype(dtype)
    config = spec.hf_config()
    config.attn_implementation = "eager"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(tdtype)
    state = {n: source.get(n, s, tdtype, device) for n, s in spec.all_shapes().items()}
    model.load_state_dict(state, strict=True)
    return model.eval()
