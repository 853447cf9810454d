"""Configuration as data: GPTConfig (the model) and TrainConfig (a run).

Both are frozen dataclasses validated once in __post_init__, so every later stage can
trust them. `add_dataclass_flags`/`parse_flags` build the CLI from the fields, which is
how the scripts accept nanoGPT's `--key=value` form without exec-ing any config file.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_type_hints

from jaxgpt.errors import UserError
from jaxgpt.presets import PRESETS, RECIPE_FOR_PRESET, RECIPES

REMAT_CHOICES = ("auto", "none", "full", "dots")  # auto: jaxgpt.platform decides per backend
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
ATTENTION_KERNELS = ("xla", "cudnn", "explicit")  # dropout-free attention's kernels (jaxgpt.layers)
ATTENTION_CHOICES = ("auto", "fast", *ATTENTION_KERNELS)  # --attention; jaxgpt.platform resolves auto and fast
MATMUL_CHOICES = ("auto", "float32", "bfloat16")  # the linear layers' products in float32 compute (jaxgpt.layers)
ACTIVATIONS = ("gelu", "gelu_tanh", "relu2")
POS_EMBEDDINGS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
OPTIMIZERS = ("adamw", "muon")
# Muon's Newton-Schulz iteration (jaxgpt/optim.py and torchref/optim.py): Keller Jordan's quintic coefficients
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
NS_GRAM_RESTART = 3  # a wide matrix's steps between two products with X (jaxgpt.optim._gram_iteration)


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


@dataclass(frozen=True)
class GPTConfig:
    """The architecture. Field names are nanoGPT's `model_args`, so conversion is 1:1."""

    block_size: int = 256
    vocab_size: int = 256  # bytes
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False  # nanoGPT train.py's default (its shakespeare_char run has no biases)
    activation: Literal["gelu", "gelu_tanh", "relu2"] = "gelu"  # exact erf GELU (nanoGPT); gelu_tanh = GPT-2's gelu_new
    layer_norm_epsilon: float = 1e-5  # every norm's epsilon, LayerNorm or RMSNorm, passed explicitly on both sides
    # The modern recipe's switches; these defaults are nanoGPT's model (jaxgpt/layers.py has each one).
    pos_embedding: Literal["learned", "rope"] = "learned"  # rope: rotary q/k (half-split, NeoX/Gemma), no wpe
    rope_base: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # rmsnorm: learnable scale, no bias
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (learnable scale), before RoPE
    tie_embeddings: bool = True  # False: a separate lm_head
    zero_init_proj: bool = False  # zero-init both residual projections (and an untied lm_head)
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap); 0 = off
    # > 0: that many extra token-embedding tables mixed into the attention values of the first and the last
    # that many layers, v = l0 * v + l1 * ve[token], l learned per layer (modded-nanogpt's value embeddings)
    value_embeds: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                     f"GPTConfig.{name} must be a positive integer, got {value!r}")
        _require(self.n_embd % self.n_head == 0,
                 f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                 f"pick n_embd as a multiple of n_head")
        _require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
                 f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        _require(isinstance(self.bias, bool), f"GPTConfig.bias must be a bool, got {self.bias!r}")
        _require(self.activation in ACTIVATIONS, f"GPTConfig.activation must be one of {ACTIVATIONS}, "
                                                 f"got {self.activation!r}")
        _require(isinstance(self.layer_norm_epsilon, (int, float)) and 0 < self.layer_norm_epsilon < 1,
                 f"GPTConfig.layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon!r}")
        _require(self.pos_embedding in POS_EMBEDDINGS,
                 f"GPTConfig.pos_embedding must be one of {POS_EMBEDDINGS}, got {self.pos_embedding!r}")
        _require(self.norm in NORMS, f"GPTConfig.norm must be one of {NORMS}, got {self.norm!r}")
        _require(isinstance(self.rope_base, (int, float)) and self.rope_base > 1,
                 f"GPTConfig.rope_base must be > 1, got {self.rope_base!r}")
        _require(self.pos_embedding != "rope" or self.head_dim % 2 == 0,
                 f"RoPE rotates pairs of dimensions: head size n_embd/n_head = {self.head_dim} must be even")
        for name in ("qk_norm", "tie_embeddings", "zero_init_proj"):
            _require(isinstance(getattr(self, name), bool), f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        _require(isinstance(self.logit_softcap, (int, float)) and self.logit_softcap >= 0,
                 f"GPTConfig.logit_softcap must be >= 0 (0 = off), got {self.logit_softcap!r}")
        _require(isinstance(self.value_embeds, int) and not isinstance(self.value_embeds, bool)
                 and 0 <= self.value_embeds <= self.n_layer,
                 f"GPTConfig.value_embeds must be an integer in [0, n_layer={self.n_layer}] (0 = off), "
                 f"got {self.value_embeds!r}")

    def value_table(self, layer: int) -> int:
        """Which value-embedding table layer `layer` mixes in: table i for the first value_embeds layers
        and again for the last (the first rule wins where they overlap), value_embeds (none) between."""
        k, last = self.value_embeds, self.n_layer - self.value_embeds
        return layer if layer < k else layer - last if layer >= last else k

    def modern_fields(self) -> dict[str, Any]:
        """The switches set away from nanoGPT's model that change what it computes (zero_init_proj
        only changes the init): what a nanoGPT ckpt.pt or a GPT-2 folder cannot hold."""
        out = {k: getattr(self, k) for k, v in NANOGPT_MODEL.items() if getattr(self, k) != v}
        return {**out, "activation": self.activation} if self.activation == "relu2" else out

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self, non_embedding: bool = True) -> int:
        """GPT.num_params in closed form, for a model not built (FLOPs, memory): nanoGPT's get_num_params(),
        everything except wpe unless non_embedding=False; a tied wte/lm_head counted once, an untied head
        twice. Per layer: 4 matrices (12 C^2), their biases (9 C), two norms (scale, + bias for a LayerNorm
        with bias=True), and q/k norms over head_dim with qk_norm."""
        C, L = self.n_embd, self.n_layer
        norm = 2 * C if self.bias and self.norm == "layernorm" else C
        per_layer = 12 * C * C + 2 * norm + (9 * C if self.bias else 0) + (2 * self.head_dim if self.qk_norm else 0)
        n = L * per_layer + norm + self.vocab_size * C * (1 if self.tie_embeddings else 2)
        return n + (self.block_size * C if not non_embedding and self.pos_embedding == "learned" else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a dict that may hold extra keys (nanoGPT's model_args, a run config)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# the recipe's switches that change the function, at nanoGPT's values
NANOGPT_MODEL = {"pos_embedding": "learned", "norm": "layernorm", "qk_norm": False, "tie_embeddings": True,
                 "logit_softcap": 0.0, "value_embeds": 0}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the seed's GPU config (nanoGPT shakespeare_char)."""

    dataset: str = "shakespeare"
    data_dir: str = "data"
    out_dir: str = ""  # "" means out/<dataset>
    batch_size: int = 64
    max_iters: int = 5000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0 means "= max_iters"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    gradient_accumulation_steps: int = 1
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    seed: int = 1337
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 compute on GPU/TPU, fp32 on CPU
    remat: Literal["auto", "none", "full", "dots"] = "auto"  # auto: by platform and memory (jaxgpt.platform)
    # float32 compute only: bfloat16 = the linear layers' inputs rounded to bfloat16, products summed in float32
    # (a TPU's float32 default); auto: bfloat16 where the CPU multiplies bfloat16 natively (jaxgpt.platform)
    matmul_precision: Literal["auto", "float32", "bfloat16"] = "float32"
    # auto: the platform's kernel that keeps nanoGPT's numbers (cuDNN flash attention on GPU in bf16, else
    # XLA's fused op); fast: auto's choice except on CPU, where explicit is faster; xla, cudnn, explicit (the
    # softmax written out in einsums): that one (jaxgpt.platform.resolve_attention)
    attention: Literal["auto", "fast", "xla", "cudnn", "explicit"] = "auto"
    # each (micro-)batch cut into this many parts whose gradients one program computes side by side, then
    # averages: 1 = one batch (nanoGPT's numbers); 0 = the platform's choice, 2 on CPU (XLA:CPU runs the two
    # parts' chains of small matmuls on two cores at once), 1 elsewhere (jaxgpt.platform.resolve_batch_split)
    batch_split: int = 1
    mesh_data: int = 0  # data-parallel mesh axis; 0 = every device not used by fsdp
    mesh_fsdp: int = 1  # parameter-sharding mesh axis
    keep_checkpoints: int = 3
    resume: bool | Literal["auto"] = False  # auto: continue if out_dir holds a committed checkpoint, else start
    init_from: str = ""  # fine-tune: start from this checkpoint's weights (run folder, .pt, .safetensors, HF folder)
    plot: bool = True
    progress: bool = True
    # the recipe (--recipe): optimizer and its groups' learning rates; one schedule multiplies every group
    recipe: Literal["nanogpt", "modern"] = "nanogpt"
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon on the blocks' matrices, AdamW on the rest
    muon_lr: float = 0.02  # Muon's peak learning rate (spectral norm per step); learning_rate stays AdamW's
    muon_momentum: float = 0.95
    muon_beta2: float = 0.0  # > 0: NorMuon, per-neuron normalisation of Muon's update with this EMA decay; 0 = off
    # tracking (jaxgpt/tracking.py): metrics.jsonl always; TensorBoard event files in <out_dir>/tb; W&B as nanoGPT
    tensorboard: bool = False
    wandb_log: bool = False
    wandb_project: str = "jaxgpt"
    wandb_run_name: str = ""  # "" = a name W&B picks
    # evaluation
    eval_full: bool = False  # evaluate on the whole val split (deterministic windows) instead of eval_iters batches
    stop_loss: float = 0.0  # > 0: stop at the first evaluation whose val loss is <= this (time-to-loss runs)
    # > 0: skip the evaluations (not the last) until the mean of the last 20 logged train losses is <= this; an
    # ablation sets it a margin above --stop_loss, so evaluations far above the target cost it nothing
    eval_below: float = 0.0
    # data (jaxgpt/loader.py): random = nanoGPT's windows at random offsets; epoch = every window of the train split
    # once per epoch in a seeded order (shards.EpochOrder); both a function of (seed, step) alone
    data_order: Literal["random", "epoch"] = "random"
    val_tokens: int = 0  # > 0: evaluations read only the val split's first val_tokens tokens; 0 = all of it
    # shown while training (jaxgpt/probes.py): HellaSwag's acc / acc_norm and a short sample every N steps; 0 = off
    hellaswag_interval: int = 0
    hellaswag_file: str = ""  # hellaswag_val.jsonl (local, gs:// or a URL); "" = downloaded once into the cache
    sample_interval: int = 0
    sample_prompt: str = "\n"

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_iters", "gradient_accumulation_steps", "eval_interval",
                     "eval_iters", "log_interval", "keep_checkpoints", "mesh_fsdp"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value > 0, f"--{name} must be a positive integer, got {value!r}")
        for name in ("warmup_iters", "lr_decay_iters", "seed", "mesh_data", "batch_split", "val_tokens"):
            _require(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
            _require(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)!r}")
        _require(self.min_lr <= self.learning_rate,
                 f"--min_lr ({self.min_lr}) must not exceed --learning_rate ({self.learning_rate})")
        for name in ("beta1", "beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, f"--{name} must be in [0, 1), got {getattr(self, name)!r}")
        _require(self.dtype in DTYPE_CHOICES, f"--dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        _require(self.remat in REMAT_CHOICES, f"--remat must be one of {REMAT_CHOICES}, got {self.remat!r}")
        _require(self.matmul_precision in MATMUL_CHOICES,
                 f"--matmul_precision must be one of {MATMUL_CHOICES}, got {self.matmul_precision!r}")
        _require(self.attention in ATTENTION_CHOICES,
                 f"--attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        _require(self.batch_size % max(1, self.batch_split) == 0,
                 f"--batch_split={self.batch_split} must divide --batch_size={self.batch_size} (0 = the platform's choice)")
        _require(self.data_order in ("random", "epoch"), f"--data_order must be random or epoch, got {self.data_order!r}")
        _require(self.resume in (True, False, "auto"), f"--resume must be true, false or auto, got {self.resume!r}")
        _require(self.recipe in RECIPES, f"--recipe must be one of {tuple(RECIPES)}, got {self.recipe!r}")
        _require(self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _require(self.muon_lr >= 0, f"--muon_lr must be >= 0, got {self.muon_lr!r}")
        _require(0.0 <= self.muon_momentum < 1.0, f"--muon_momentum must be in [0, 1), got {self.muon_momentum!r}")
        _require(0.0 <= self.muon_beta2 < 1.0, f"--muon_beta2 must be in [0, 1) (0 = plain Muon), got {self.muon_beta2!r}")
        _require(self.stop_loss >= 0, f"--stop_loss must be >= 0 (0 = off), got {self.stop_loss!r}")
        _require(self.eval_below >= 0, f"--eval_below must be >= 0 (0 = off), got {self.eval_below!r}")
        for name in ("hellaswag_interval", "sample_interval"):
            _require(getattr(self, name) >= 0, f"--{name} must be >= 0 (0 = off), got {getattr(self, name)!r}")
        _require(bool(self.dataset) and "/" not in self.dataset and self.dataset not in (".", ".."),
                 f"--dataset must be a plain name like 'shakespeare', got {self.dataset!r}")
        if not self.out_dir:
            object.__setattr__(self, "out_dir", f"out/{self.dataset}")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.max_iters

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _help(text: str, default: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class ServeConfig:
    """scripts/serve.py's options (its flags are generated from these fields, as train.py's from TrainConfig)."""

    checkpoint: str = _help("run folder, ckpt.pt, .safetensors or Hugging Face folder, local or gs:// (required)", "")
    which: Literal["best", "latest"] = "best"
    meta: str | None = _help("nanoGPT meta.pkl for character-level checkpoints", None)
    host: str = _help("address to bind (127.0.0.1: this machine only)", "127.0.0.1")
    port: int = 8000
    slots: int = _help("sequences decoded together (KV-cache slots)", 16)
    chunk: int = _help("tokens per compiled decode call between admissions", 8)
    max_queue: int = _help("sequences allowed to wait for a slot; a request whose sequences do not all fit gets 429", 64)
    api_key: str | None = _help("require 'Authorization: Bearer KEY' (default: $JAXGPT_API_KEY, else none)", None)
    model_name: str | None = _help("the model id the API reports (default: the checkpoint's folder or file name)", None)
    max_tokens: int | None = _help("largest max_tokens a request may ask for (default: the model's block_size)", None)
    max_prompt_tokens: int | None = _help("longest prompt in tokens (default: block_size; a longer one is cropped)", None)
    timeout: float = _help("seconds a request may take, streaming included", 300.0)
    max_connections: int = _help("open connections at once; more get 503", 256)
    header_timeout: float = _help("seconds a connection may take to send a request's headers", 10.0)
    body_timeout: float = _help("seconds a request's body may take to arrive", 30.0)
    no_ui: bool = _help("no playground page at GET /", False)
    shutdown_grace: float = _help("seconds SIGTERM waits for requests in flight", 10.0)

    def __post_init__(self) -> None:
        _require(bool(self.checkpoint), "--checkpoint is required: a run folder, ckpt.pt, .safetensors or HF folder")
        for name in ("slots", "chunk", "max_queue", "max_connections", "max_tokens", "max_prompt_tokens"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"--{name} must be >= 1, got {value}")
        for name in ("timeout", "header_timeout", "body_timeout"):
            _require(getattr(self, name) > 0, f"--{name} must be > 0 seconds, got {getattr(self, name)}")
        _require(self.shutdown_grace >= 0, f"--shutdown_grace must be >= 0 seconds, got {self.shutdown_grace}")
        _require(0 < self.port < 65536, f"--port must be in [1, 65535], got {self.port}")


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def int_or_auto(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


AUTO_FLAGS = ("batch_size",)  # also take 'auto' on the command line: chosen by the compiler (scripts/train.py, jaxgpt.plan.aot)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--field` flag per dataclass field, typed and with its default in --help."""
    hints = get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        hint = hints[f.name]
        what = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"default": None, "help": f"{what} (default: {f.default!r})" if what else f"(default: {f.default!r})"}
        if hint is bool:
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        elif bool in get_args(hint):  # bool | Literal[...]: true/false or one of the words
            words = [w for a in get_args(hint) if getattr(a, "__origin__", None) is Literal for w in get_args(a)]
            kwargs.update(type=lambda t, words=words: t.strip().lower() if t.strip().lower() in words else parse_bool(t),
                          nargs="?", const=True, metavar="BOOL|" + "|".join(words))
        elif getattr(hint, "__origin__", None) is Literal:
            kwargs.update(type=str, choices=get_args(hint))
        elif f.name in AUTO_FLAGS:
            kwargs.update(type=int_or_auto,
                          help=f"(default: {f.default!r}; auto: the largest that fits, chosen by the compiler)")
        else:  # int, float, str, or one of them | None
            kwargs.update(type=next((a for a in get_args(hint) if a is not type(None)), hint))
        group.add_argument(f"--{f.name}", **kwargs)


class CliParser(argparse.ArgumentParser):
    """argparse that raises UserError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def make_parser(description: str, *classes: type, presets: bool = False) -> argparse.ArgumentParser:
    parser = CliParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu",
                            help="base values; explicit flags override them (default: 'gpu' = the seed config; "
                                 "'cpu' = " + ", ".join(f"{k}={v}" for k, v in PRESETS["cpu"].items()) + ")")
        parser.epilog = "--recipe=modern sets, before explicit flags: " + ", ".join(
            f"{k}={v}" for k, v in RECIPES["modern"].items()) + "".join(
            f"; with --preset={preset} also " + ", ".join(f"{k}={v}" for k, v in values.items())
            for (recipe, preset), values in RECIPE_FOR_PRESET.items() if recipe == "modern")
    for cls in classes:
        add_dataclass_flags(parser, cls)
    return parser


def build(cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """Instantiate `cls` from parsed flags over `base` (a preset or a saved run's values)."""
    values = {f.name: f.default for f in fields(cls)}
    values.update({k: v for k, v in (base or {}).items() if k in values})
    values.update({f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})
    return cls(**values)


def explicit_flags(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` the user actually set on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
