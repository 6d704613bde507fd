"""The cost model of ``workflow.plan``: seconds, GPUs and the share spent starting and loading, per job.

Every job costs start-up (a Python process importing torch and transformers; a vLLM engine's own start-up),
loading (weight bytes ÷ a read rate; a download; GGUF dequantisation), compute and writes (checkpoints, saved
weights). Compute follows three rules (docs/cost.md):

- a training step: 6·N FLOPs per token (forward + backward), plus one more forward + backward on each
  sharpness-aware step (every ``interval`` steps), at ``mfu_train`` of the devices' peak;
- a forward pass (reference log-probs, scoring, probe features, prefill, judge inputs): 2·N per token at
  ``mfu_forward``;
- a decoding step: bandwidth-bound, the weight bytes ÷ (memory bandwidth × ``bandwidth_efficiency``), or the
  batch's 2·N FLOPs per sequence when that takes longer, plus a fixed per-step overhead of the backend. A
  transformers batch runs ``max_new_tokens`` × fill steps (it ends when its longest sequence does); vLLM keeps
  up to ``vllm_batch`` sequences in flight, so its steps are answers × tokens × fill ÷ ``vllm_batch``.

Token counts come from the config (pairs, batch sizes, max lengths, prompts per benchmark, samples,
max_new_tokens) times the fill assumptions; parameter counts from a table of known models or a local folder's
safetensors headers. Every assumption is a field of ``Assumptions`` (defaults for GPU nodes) or of a
``Device``; ``DEVICES["cpu-2core"]`` carries this machine's measured figures instead, which is how the model is
checked against a measured run (``bench/cost_vs_measured.py``).
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from workflow.lib.jobs import judge_backend
from workflow.lib.safety_judges import LLM_JUDGES

# --- devices -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One accelerator (or this machine's CPU): peak dense FLOP/s in the compute dtype (bf16 on GPUs, fp32 on the
    CPU), peak fp32 FLOP/s (stages that run in fp32: the probe), memory bandwidth, memory, the bytes per
    weight of inference (bf16 2, fp32 4), and CPU cores (0 for GPUs: threads do not change a GPU's speed)."""
    name: str
    flops: float
    fp32_flops: float
    bandwidth: float
    memory_gb: float
    weight_bytes: int = 2
    cores: int = 0
    note: str = ""


# Vendor datasheet figures, dense (no sparsity); bf16 on tensor cores, fp32 without TF32.
DEVICES = {d.name: d for d in (
    Device("h100-80gb", 989e12, 67e12, 3.35e12, 80, note="H100 SXM5 80 GB"),
    Device("h200-141gb", 989e12, 67e12, 4.8e12, 141, note="H200 SXM 141 GB"),
    Device("a100-80gb", 312e12, 19.5e12, 2.039e12, 80, note="A100 SXM4 80 GB"),
    Device("l40s-48gb", 362e12, 91.6e12, 0.864e12, 48, note="L40S 48 GB"),
    # This machine (docs/cost.md, ../shared/ENVIRONMENT.md): 2 AVX2 cores at 2.4 GHz, fp32 everywhere.
    Device("cpu-2core", 150e9, 150e9, 10e9, 24, weight_bytes=4, cores=2, note="this 2-core machine, fp32"),
)}


# --- assumptions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assumptions:
    """Every figure the projection assumes besides the device's; defaults for GPU nodes (docs/cost.md)."""
    mfu_train: float = 0.35             # training step FLOPs / (devices x peak): bf16 autocast, DDP or FSDP
    mfu_forward: float = 0.45           # forward-only passes and prefill
    bandwidth_efficiency: float = 0.7   # share of peak memory bandwidth a decoding step reaches
    step_overhead_transformers: float = 0.03  # s per decoding step of transformers' generate (Python, launches)
    step_overhead_vllm: float = 0.003   # s per decoding step of vLLM (CUDA graphs)
    vllm_batch: int = 256               # sequences vLLM keeps in flight (its max_num_seqs default)
    process_start_s: float = 20.0       # a model-loading job's Python process: imports, CUDA context
    torch_start_s: float = 10.0         # a job importing torch but loading no model
    vllm_start_s: float = 60.0          # vLLM engine: memory profiling, KV-cache allocation, CUDA graph capture
    # a job that loads no model, by what it imports: the standard library, pandas (data, refusal markers),
    # the statistics and plotting stack (tables, figures, the report page)
    light_job_s: dict = field(default_factory=lambda: {"stdlib": 3.0, "pandas": 5.0, "data": 10.0, "report": 10.0,
                                                       "figures": 15.0})
    read_rate: float = 2e9              # B/s reading weights from the shared file system
    write_rate: float = 1e9             # B/s writing weights and checkpoints
    download_rate: float = 0.1e9        # B/s from the Hugging Face hub (prepare_model, convert_score_model)
    gguf_load_s: float = 18.0           # dequantising the embedded GGUF (ENVIRONMENT.md)
    train_fill: float = 1.0             # padded sequence length / training.max_length (default data: 0.97)
    prompt_tokens: int = 64             # a benchmark prompt in its prompt format (default data: 46)
    # decoded tokens / max_new_tokens: under vLLM the mean answer, under transformers a batch's longest
    answer_fill: float = 1.0            # answers (also their length in judge inputs)
    judge_output_fill: float = 1.0      # a judge's verdicts
    # mean probe text in tokens, by probe.data.format: refusal-direction instructions (measured on the default
    # data: 12.6), a PKU-SafeRLHF prompt and response in the HH template (estimated; at most 255 are kept)
    probe_text_tokens: dict = field(default_factory=lambda: {"texts": 13, "pku-saferlhf": 150})
    probe_texts_all: int = 54000        # texts of probe.data.sample all (PKU-SafeRLHF-30K train: 27k rows x 2)
    sft_examples_fraction: float = 1.0  # SFT examples / training pairs (examples: unique_prompts gives fewer)
    # judge prompt text around the prompt and answer, in tokens (template characters / 4)
    judge_template_tokens: dict = field(default_factory=lambda: {
        "llama_guard_3": 350, "md_judge_v0_2": 800, "nemotron_safety_guard_v3": 400, "harmbench_cls": 350})
    # benchmark sizes (prompts a sample of n_prompts: 0 = all cannot exceed), when no sample file exists yet
    benchmark_sizes: dict = field(default_factory=lambda: {
        "harmbench": 200, "harmbench_contextual": 100, "harmbench_copyright": 100, "advbench": 520,
        "donotanswer": 939, "saladbench": 21318, "harmless": 6266})


# This machine's figures (docs/cost.md has where each comes from); the rest stay as for GPU nodes.
CPU_ASSUMPTIONS = dict(
    mfu_train=0.95,                     # 5.6 s per DPO step of 4 pairs x 124 padded tokens (ENVIRONMENT.md)
    mfu_forward=0.9,                    # 12 s forward + backward of 8 x 256 tokens (ENVIRONMENT.md)
    step_overhead_transformers=0.01,    # 0.04 s per decoding step at batch 16, idle (docs/bench.md)
    process_start_s=6.5,                # import torch + transformers + load a tiny model: 6.4-6.8 CPU s (docs/testing.md)
    torch_start_s=1.9,                  # import torch alone (docs/testing.md)
    # wall seconds per job of the idle default run (docs/cost.md, "Checked against a measured run")
    light_job_s={"stdlib": 0.2, "pandas": 0.6, "data": 1.5, "report": 1.5, "figures": 4.0},
    read_rate=1e9, write_rate=0.5e9,    # page cache / local disk
)


def device_with(device: Device, pairs: list[str]) -> Device:
    """``device`` with ``device.FIELD=VALUE`` overrides (``--set device.bandwidth=2.0e12``): its figures are
    assumptions like the others."""
    names = [f.name for f in fields(Device) if f.name not in ("name", "note")]
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        name = key.removeprefix("device.")
        if not sep or name not in names:
            raise SystemExit(f"--set {pair!r}: expected device.NAME=VALUE with NAME one of {', '.join(names)}")
        try:
            changes[name] = type(getattr(device, name))(float(value))
        except ValueError:
            raise SystemExit(f"--set {pair!r}: {value!r} is not a number") from None
    return replace(device, **changes)


def assumptions_for(device: Device, overrides: dict | None = None) -> Assumptions:
    """The defaults (this machine's figures for the CPU device), then ``overrides`` (``--set key=value``)."""
    base = Assumptions(**(CPU_ASSUMPTIONS if device.cores else {}))
    return replace(base, **(overrides or {}))


def parse_overrides(pairs: list[str]) -> dict:
    """``NAME=VALUE`` strings (``--set``) as Assumptions fields; a table's entry is ``NAME.KEY=VALUE``."""
    defaults = Assumptions()
    names = [f.name for f in fields(Assumptions)]
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        name, _, item = key.partition(".")
        if not sep or name not in names:
            raise SystemExit(f"--set {pair!r}: expected NAME=VALUE with NAME one of {', '.join(names)}")
        default = getattr(defaults, name)
        try:
            if isinstance(default, dict) != bool(item):
                raise ValueError(f"{name} is {'a table: set ' + name + '.<key>=<value>' if item == '' else 'a number'}")
            number = float(value)
        except ValueError as e:
            raise SystemExit(f"--set {pair!r}: {e}") from None
        if item:
            out[name] = {**out.get(name, default), item: number}
        else:
            out[name] = type(default)(number)
    return out


# --- parameter counts ----------------------------------------------------------------------------------

# Parameters of the models the configs name (model cards; the embedded model counted from its config).
MODEL_PARAMS = {
    "embedded:smollm2-135m-instruct": 134_515_008,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "EleutherAI/pythia-2.8b": 2_775_208_960,
    "OpenSafetyLab/MD-Judge-v0_2-internlm2_7b": 7_737_708_544,
    "nvidia/Llama-3.1-Nemotron-Safety-Guard-8B-v3": 8_030_261_248,
    "meta-llama/Llama-Guard-3-8B": 8_030_261_248,
    "meta-llama/Llama-Guard-3-1B": 1_498_482_688,
    "cais/HarmBench-Llama-2-13b-cls": 13_015_864_320,
    "cais/HarmBench-Mistral-7b-val-cls": 7_241_732_096,
    "PKU-Alignment/beaver-7b-v1.0-cost": 6_738_419_713,
}


def safetensors_parameters(folder: Path) -> int:
    """Parameters of a local safetensors model, counted from the files' headers (nothing loaded)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def parameters(name_or_path: str, known: dict, workdir: Path = Path(".")) -> int:
    """N of a model: ``known`` (MODEL_PARAMS plus ``--params``), else a local folder's safetensors."""
    if name_or_path in known:
        return known[name_or_path]
    folder = (workdir / name_or_path).expanduser()
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        return safetensors_parameters(folder)
    raise SystemExit(f"no parameter count for model {name_or_path!r}: give it with --params {name_or_path}=N "
                     "(or point the config at a local safetensors folder)")


# --- the rules' work -----------------------------------------------------------------------------------


@dataclass
class JobCost:
    """Seconds of one job by kind, and the GPUs it holds. ``parallel`` is the part that runs on every
    thread (compute); the rest runs on one (start-up, loading, writing), which matters for CPU seconds."""
    start: float = 0.0
    load: float = 0.0
    compute: float = 0.0
    write: float = 0.0
    gpus: int = 0

    @property
    def seconds(self) -> float:
        return self.start + self.load + self.compute + self.write

    @property
    def loading(self) -> float:
        """Start-up and weight loading: what a job pays before its first useful FLOP."""
        return self.start + self.load


class Model:
    """The cost arithmetic on one device with one set of assumptions."""

    def __init__(self, config: dict, device: Device, a: Assumptions, params: dict, workdir: Path = Path(".")):
        self.config, self.device, self.a, self.workdir = config, device, a, Path(workdir)
        self.params = {**MODEL_PARAMS, **params}

    # the arithmetic
    def n(self, name_or_path: str) -> int:
        return parameters(name_or_path, self.params, self.workdir)

    def flops(self, threads: int, fp32: bool = False) -> float:
        """Peak FLOP/s a job reaches: the device's, or on the CPU its share of the cores."""
        peak = self.device.fp32_flops if fp32 else self.device.flops
        return peak * min(threads, self.device.cores) / self.device.cores if self.device.cores else peak

    def forward(self, n: int, tokens: float, devices: int = 1, threads: int = 1, fp32: bool = False) -> float:
        return 2 * n * tokens / (self.flops(threads, fp32) * self.a.mfu_forward * devices)

    def training(self, n: int, tokens: float, devices: int = 1, threads: int = 1) -> float:
        return 6 * n * tokens / (self.flops(threads) * self.a.mfu_train * devices)

    def decode_step(self, n: int, batch: int, backend: str, threads: int = 1) -> float:
        weights = n * self.device.weight_bytes / (self.device.bandwidth * self.a.bandwidth_efficiency)
        compute = 2 * n * batch / (self.flops(threads) * self.a.mfu_forward)
        overhead = self.a.step_overhead_vllm if backend == "vllm" else self.a.step_overhead_transformers
        return max(weights, compute) + overhead

    def decode(self, n: int, sequences: int, max_new_tokens: int, batch_size: int, backend: str, fill: float,
               threads: int = 1) -> float:
        """Seconds to decode ``sequences`` continuations of up to ``max_new_tokens``."""
        if not sequences:
            return 0.0
        if backend == "vllm":
            batch = min(self.a.vllm_batch, sequences)
            steps = math.ceil(sequences * max_new_tokens * fill / batch)
            return steps * self.decode_step(n, batch, backend, threads)
        batches = math.ceil(sequences / batch_size)  # a batch runs until its longest sequence ends
        steps = math.ceil(max_new_tokens * fill)
        return batches * steps * self.decode_step(n, min(batch_size, sequences), backend, threads)

    def load(self, n: int, bytes_per_weight: float) -> float:
        return n * bytes_per_weight / self.a.read_rate

    def start(self, backend: str = "transformers") -> float:
        return self.a.process_start_s + (self.a.vllm_start_s if backend == "vllm" else 0.0)

    # config facts
    @property
    def base(self) -> str:
        return self.config["model"]["name_or_path"]

    def seq_tokens(self, max_length: int | None = None) -> float:
        return (max_length or self.config["training"]["max_length"]) * self.a.train_fill

    def prompts(self, benchmark: str) -> int:
        """Prompts a benchmark's sample holds: its sample file when it exists, else n_prompts capped by the
        benchmark's size (jailbreak sets: the base benchmark's size x templates)."""
        counted = self.count_rows(f"results/data/benchmarks/{benchmark}/sample.jsonl")
        if counted is not None:
            return counted
        spec = self.config["benchmarks"][benchmark]
        n = spec.get("n_prompts", self.config["evaluation"]["n_prompts"])
        size = self.a.benchmark_sizes.get(benchmark)
        if "jailbreak" in spec:
            base = self.a.benchmark_sizes.get(spec["jailbreak"]["benchmark"])
            size = base * spec["jailbreak"]["n_templates"] if base else None
        if n == 0:
            if size is None:
                raise SystemExit(f"benchmark {benchmark!r}: n_prompts 0 (all) and no known size: give it with "
                                 f"--set benchmark_sizes.{benchmark}=N")
            return size
        return min(n, size) if size else n

    def count_rows(self, path: str) -> int | None:
        """Rows of a JSON-lines file the run has written already (None before): counts replace assumptions."""
        file = self.workdir / path
        if not file.exists():
            return None
        with open(file) as f:
            return sum(1 for line in f if line.strip())

    def answers(self, benchmark: str) -> int:
        return self.prompts(benchmark) * self.config["evaluation"]["samples"]

    def generation_backend(self) -> str:
        return self.config["evaluation"]["backend"]

    def judge_backend(self, judge: str) -> str:
        return judge_backend(self.config, judge)  # as the rules decide it


def job_gpus(resources: dict) -> int:
    """GPUs a job holds: ``gpu``, or across nodes ``gres: gpu:N`` per node times ``nodes``."""
    if "gres" in resources:
        m = re.search(r"gpu(?::\w+)?:(\d+)", str(resources["gres"]))
        return int(m[1]) * int(resources.get("nodes", 1)) if m else 0
    return int(resources.get("gpu", 0))


def answer_file(path: str) -> tuple[str, str]:
    """(model, benchmark) of results/generations/{model}/{benchmark}.jsonl."""
    m = re.fullmatch(r"results/generations/(.+)/([^/]+)\.jsonl", path)
    if not m:
        raise ValueError(f"{path}: not an answers file")
    return m[1], m[2]


def _light(m: Model, job: dict) -> JobCost:
    return JobCost(start=m.a.light_job_s[LIGHT.get(job["rule"], "pandas")])


def _prepare_model(m: Model, job: dict) -> JobCost:
    n, name = m.n(m.base), m.base
    if name.startswith("embedded:"):
        load = m.a.gguf_load_s
    elif (m.workdir / name).expanduser().is_dir():
        load = m.load(n, 4)
    else:
        load = n * 2 / m.a.download_rate  # hub checkpoints are bf16 (or fp16)
    return JobCost(start=m.a.process_start_s, load=load, write=n * 4 / m.a.write_rate)


def _convert_score_model(m: Model, job: dict) -> JobCost:
    n = m.n(m.config["reward_model"]["name_or_path"])
    return JobCost(start=m.a.process_start_s, load=n * 2 / m.a.download_rate, write=n * 2 / m.a.write_rate)


def _train_probe(m: Model, job: dict) -> JobCost:
    data = m.config["probe"]["data"]
    texts = m.count_rows("results/probe/data.jsonl")  # what probe_data kept, once it has run
    if texts is None:
        texts = m.a.probe_texts_all if data.get("sample") == "all" else 2 * data["n_per_class"]
    tokens = texts * m.a.probe_text_tokens[data.get("format", "texts")]
    n = m.n(m.base)
    # the probe's forward runs in fp32 (the saved base model's dtype): the fp32 peak on a GPU
    return JobCost(start=m.a.process_start_s, load=m.load(n, 4),
                   compute=m.forward(n, tokens, threads=job["threads"], fp32=True), gpus=job_gpus(job["resources"]))


def _select_subspace(m: Model, job: dict) -> JobCost:
    return JobCost(start=m.a.process_start_s, load=m.load(m.n(m.base), 4), gpus=job_gpus(job["resources"]))


def _sft(m: Model, job: dict) -> JobCost:
    sft, n, gpus = m.config["sft"], m.n(m.base), max(job_gpus(job["resources"]), 1)
    tokens = m.config["preferences"]["n_train"] * m.a.sft_examples_fraction * sft["epochs"] * m.seq_tokens()
    return JobCost(start=m.a.process_start_s, load=m.load(n, 4),
                   compute=m.training(n, tokens, gpus, job["threads"]), write=n * 4 / m.a.write_rate,
                   gpus=job_gpus(job["resources"]))


def _reference_logps(m: Model, job: dict) -> JobCost:
    p = m.config["preferences"]
    pairs = p["n_heldout"] if job["rule"] == "reference_logps_heldout" else p["n_train"]
    n = m.n(m.base)
    return JobCost(start=m.a.process_start_s, load=m.load(n, 4),
                   compute=m.forward(n, 2 * pairs * m.seq_tokens(), threads=job["threads"]),
                   gpus=job_gpus(job["resources"]))


def _score_preferences(m: Model, job: dict) -> JobCost:
    """A model's held-out margins; the reference model itself (the base model without SFT) needs no pass."""
    if not any(f.startswith(("results/models/", "results/policies/")) for f in job["input"]):
        return JobCost(start=m.a.torch_start_s)
    n = m.n(m.base)
    return JobCost(start=m.a.process_start_s, load=m.load(n, 4),
                   compute=m.forward(n, 2 * m.config["preferences"]["n_heldout"] * m.seq_tokens(), threads=job["threads"]),
                   gpus=job_gpus(job["resources"]))


def _train_reward_model(m: Model, job: dict) -> JobCost:
    r, p = m.config["reward_model"], m.config["preferences"]
    sequences = 2 * (p["n_train"] + p["n_heldout"])
    if r["kind"] == "bt_head":
        n, weight = m.n(m.base), 4
    else:
        n, weight = m.n(r["name_or_path"]), 2
    return JobCost(start=m.a.process_start_s, load=m.load(n, weight),
                   compute=m.forward(n, sequences * m.seq_tokens(), threads=job["threads"]),
                   gpus=job_gpus(job["resources"]))


def sharpness_interval(preset: dict) -> int | None:
    s = preset.get("sharpness")
    return s["interval"] if s else None


def _train_policy(m: Model, job: dict) -> JobCost:
    t, n = m.config["training"], m.n(m.base)
    preset = m.config["presets"][job["wildcards"]["method"]]
    gpus = max(job_gpus(job["resources"]), 1)
    steps = math.ceil(m.config["preferences"]["n_train"] / t["batch_size"]) * t["epochs"]
    interval = sharpness_interval(preset)
    passes = steps + (steps // interval if interval else 0)  # a sharpness-aware step is a second forward + backward
    tokens = passes * t["batch_size"] * 2 * m.seq_tokens()
    state = 4 + (8 if t["optimizer"] == "adamw" else 4)  # fp32 weights + optimizer state, bytes per weight
    every = t["checkpoint_every"]
    checkpoints = (steps - 1) // every if every else 0
    saved = {"fp32": 4, "fp16": 2, "bf16": 2}[t.get("save_dtype", "fp32")]
    return JobCost(start=m.a.process_start_s, load=m.load(n, 4),
                   compute=m.training(n, tokens, gpus, job["threads"]),
                   write=(checkpoints * n * state + n * saved) / m.a.write_rate, gpus=job_gpus(job["resources"]))


def _generate(m: Model, job: dict) -> JobCost:
    e, n, threads = m.config["evaluation"], m.n(m.base), job["threads"]
    backend = m.generation_backend()
    prompts = m.prompts(job["wildcards"]["benchmark"])
    sequences = prompts * e["samples"]
    prefill = m.forward(n, sequences * m.a.prompt_tokens, threads=threads)
    decode = m.decode(n, sequences, e["max_new_tokens"], e["batch_size"], backend, m.a.answer_fill, threads)
    return JobCost(start=m.start(backend), load=m.load(n, 4), compute=prefill + decode,
                   gpus=job_gpus(job["resources"]))


def _judge(m: Model, job: dict) -> JobCost:
    """A judge job: rule-based judges cost a light job; an LLM judge loads its model once and judges every
    answers file of the job (one file before the job shaping, several after)."""
    name = job["wildcards"]["judge"]
    spec = m.config["judges"][name]
    if spec["type"] == "refusal_markers":
        return _light(m, job)
    kind = LLM_JUDGES[spec["type"]]
    n, threads, backend = m.n(spec["model"]), job["threads"], m.judge_backend(name)
    new_tokens = spec.get("max_new_tokens") or kind.max_new_tokens
    max_answer = m.config["evaluation"]["max_new_tokens"]
    compute = 0.0
    for path in job["input"]:
        if not path.startswith("results/generations/"):
            continue
        answers = m.answers(answer_file(path)[1])
        prompt = m.a.judge_template_tokens[spec["type"]] + m.a.prompt_tokens + max_answer * m.a.answer_fill
        compute += m.forward(n, answers * prompt, threads=threads)
        compute += m.decode(n, answers, new_tokens, spec["batch_size"], backend, m.a.judge_output_fill, threads)
    return JobCost(start=m.start(backend), load=m.load(n, 2), compute=compute, gpus=job_gpus(job["resources"]))


RULES = {
    "prepare_model": _prepare_model, "convert_score_model": _convert_score_model,
    "train_probe": _train_probe, "select_subspace": _select_subspace, "sft": _sft,
    "reference_logps": _reference_logps, "reference_logps_heldout": _reference_logps,
    "train_reward_model": _train_reward_model, "train_policy": _train_policy,
    "score_preferences": _score_preferences, "generate": _generate, "judge": _judge, "llm_judge": _judge,
}
# rules that load no model: seconds each, by what they import (data preparation, refusal markers, report)
# (data: reads and de-duplicates a whole probe source; figures: matplotlib, drawing every figure)
LIGHT = {"inject_noise": "stdlib", "sample_benchmark": "stdlib", "prepare_preferences": "stdlib",
         "prepare_benchmark": "stdlib", "probe_data": "data", "judge": "pandas", "judge_agreement": "pandas",
         "plot_soft_labels": "pandas", "report_tables": "report", "report_figures": "figures",
         "perturbation_summary": "report", "report": "report"}


def job_cost(m: Model, job: dict) -> JobCost | None:
    """The cost of one job from ``workflow.lib.dag``; None for a job that runs no command (``all``)."""
    rule = job["rule"]
    if rule in RULES:
        return RULES[rule](m, job)
    if rule in LIGHT:
        return _light(m, job)
    if rule == "all":
        return None
    raise SystemExit(f"rule {rule!r} has no cost model: add it to workflow/lib/cost.py RULES or LIGHT")


# --- the projection ------------------------------------------------------------------------------------


@dataclass
class RuleRow:
    rule: str
    jobs: int = 0
    gpus: set = field(default_factory=set)
    seconds: float = 0.0
    gpu_seconds: float = 0.0
    loading: float = 0.0
    writing: float = 0.0
    cpu_seconds: float = 0.0
    submitted: int = 0   # submissions of its own (not local, not grouped)
    local: int = 0
    grouped: int = 0


def cpu_seconds(m: Model, cost: JobCost, threads: int) -> float:
    """CPU seconds of a job on the CPU device: compute on every thread the job has, the rest on one."""
    used = min(threads, m.device.cores) if m.device.cores else 1
    return cost.start + cost.load + cost.write + cost.compute * used


def project(m: Model, jobs: list[dict]) -> tuple[list[RuleRow], dict]:
    """Per-rule rows (sorted by GPU-hours, then hours) and totals, including submissions: a job is one Slurm
    submission unless it is local (localrules) or in a group; each group instance is one submission, and
    it holds the most GPUs any of its jobs needs for the time of all of them (they run one after another)."""
    rows: dict[str, RuleRow] = {}
    groups: dict[str, list] = {}
    for job in jobs:
        cost = job_cost(m, job)
        if cost is None:
            continue
        row = rows.setdefault(job["rule"], RuleRow(job["rule"]))
        row.jobs += 1
        row.gpus.add(cost.gpus)
        row.seconds += cost.seconds
        row.loading += cost.loading
        row.writing += cost.write
        row.cpu_seconds += cpu_seconds(m, cost, job["threads"])
        if job["group"]:
            row.grouped += 1
            groups.setdefault(job["group"], []).append((row, cost))
        else:
            row.gpu_seconds += cost.seconds * cost.gpus
            if job["local"]:
                row.local += 1
            else:
                row.submitted += 1
    for members in groups.values():
        held = max(c.gpus for _, c in members)
        for row, cost in members:
            row.gpu_seconds += cost.seconds * held
    ordered = sorted(rows.values(), key=lambda r: (-r.gpu_seconds, -r.seconds, r.rule))
    totals = {
        "jobs": sum(r.jobs for r in ordered),
        "submissions": sum(r.submitted for r in ordered) + len(groups),
        "groups": len(groups),
        "local": sum(r.local for r in ordered),
        "hours": sum(r.seconds for r in ordered) / 3600,
        "gpu_hours": sum(r.gpu_seconds for r in ordered) / 3600,
        "loading_share": sum(r.loading for r in ordered) / max(sum(r.seconds for r in ordered), 1e-9),
    }
    return ordered, totals


def group_submissions(jobs: list[dict]) -> dict[str, int]:
    """Submissions per group name (the part of a group label before its instance number)."""
    names: dict[str, set] = {}
    for job in jobs:
        if job["group"]:
            names.setdefault(job["group"].rsplit("#", 1)[0], set()).add(job["group"])
    return {k: len(v) for k, v in sorted(names.items())}
