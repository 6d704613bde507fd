"""Bad input stops with a message naming the file, row or config key and what was expected.

Each case here is listed in the "Bad input" table of docs/reliability.md.
"""
import json

import pytest
import yaml

from conftest import FIXTURES, run_snakemake, tiny_config
from test_config import CROSS_FIELD
from workflow import judge, prepare_benchmark, prepare_preferences, train_probe
from workflow.lib.config import ConfigError, validate_config
from workflow.lib.models import ModelError, embedded_gguf
from workflow.lib.sources import SourceError, load_rows


def dry_run_message(workdir, edit) -> str:
    config = yaml.safe_load(open(workdir / "config.yaml"))
    edit(config)
    yaml.safe_dump(config, open(workdir / "config.yaml", "w"))
    proc = run_snakemake(workdir, "--dry-run", check=False)
    assert proc.returncode != 0, "the dry run should have been refused"
    assert not (workdir / "results").exists(), "nothing may run before the config is valid"
    return proc.stdout + proc.stderr


# schema errors (type, range, unknown key); the cross-field checks are test_config.py's CROSS_FIELD
CONFIG_CASES = {
    "unknown key": (lambda c: c["training"].update(learning_rate=1e-5),
                    "config key training: Additional properties are not allowed ('learning_rate' was unexpected)"),
    "wrong type": (lambda c: c["training"].update(batch_size="four"),
                   "config key training.batch_size: 'four' is not of type 'integer'"),
    "noise rate 0.5 or more": (lambda c: c["noise"].update(rates=[0.0, 0.5]),
                               "config key noise.rates.1: 0.5 is greater than or equal to the maximum of 0.5"),
    "negative noise rate": (lambda c: c["noise"].update(rates=[-0.1]),
                            "config key noise.rates.0: -0.1 is less than the minimum of 0"),
    "subspace percent 0": (lambda c: c["subspace"].update(percent=0),
                           "config key subspace.percent: 0 is less than or equal to the minimum of 0"),
    "subspace percent over 100": (lambda c: c["subspace"].update(percent=150),
                                  "config key subspace.percent: 150 is greater than the maximum of 100"),
    "source with neither path nor hub": (lambda c: c["preferences"].update(source={"file": "x.jsonl"}),
                                         "config key preferences.source"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_errors_name_the_key(tiny_model_dir, case):
    """The schema check the Snakefile runs at parse time (workflow.lib.config.validate_config), case by case."""
    edit, message = CONFIG_CASES[case]
    config = tiny_config(tiny_model_dir)
    edit(config)
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert message in str(error.value)


@pytest.mark.parametrize("edit, message", [CONFIG_CASES["unknown key"], CROSS_FIELD["unknown method"]],
                         ids=["unknown key", "unknown method"])
def test_a_config_error_stops_snakemake_before_any_job_runs(workdir, edit, message):
    """A schema error and a cross-field one, through Snakemake: its message, and no job."""
    assert message in dry_run_message(workdir, edit)


def test_missing_data_path_is_named_before_any_job_runs(workdir, tmp_path):
    missing = str(tmp_path / "no-such-file.jsonl.gz")
    out = dry_run_message(workdir, lambda c: c["benchmarks"]["harmbench"].update(source={"path": missing}))
    assert f"config key benchmarks.harmbench.source: path '{missing}' does not exist" in out


def test_missing_model_path_is_named_before_any_job_runs(workdir, tmp_path):
    missing = str(tmp_path / "no-model")
    out = dry_run_message(workdir, lambda c: c["model"].update(name_or_path=missing))
    assert f"config key model.name_or_path: '{missing}' does not exist (expected a model folder)" in out


def prepare(tmp_path, source, fmt="hh-rlhf", n_train=1, n_heldout=0):
    prepare_preferences.main(["--source-json", json.dumps(source), "--format", fmt, "--n-train", str(n_train),
                              "--n-heldout", str(n_heldout), "--train", str(tmp_path / "t.jsonl"),
                              "--heldout", str(tmp_path / "h.jsonl"), "--summary", str(tmp_path / "s.json")])


def test_empty_preference_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SourceError, match=r"preferences.source \(.*empty.jsonl\): no rows"):
        prepare(tmp_path, {"path": str(tmp_path / "empty.jsonl")})
    assert not (tmp_path / "t.jsonl").exists()


def test_chosen_identical_to_rejected_names_the_row(tmp_path):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SourceError, match=r"p.jsonl.*row 1 \(pair hh-1\): chosen is identical to rejected"):
        prepare(tmp_path, {"path": str(tmp_path / "p.jsonl")})


def test_invalid_json_line_names_file_and_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": \n')
    with pytest.raises(SourceError, match=r"p.jsonl, line 2: not valid JSON"):
        load_rows({"path": str(tmp_path / "p.jsonl")})


def test_too_few_pairs_for_the_requested_split(tmp_path):
    with pytest.raises(SourceError, match="n_train \\+ n_heldout = 100 but only 20 usable pairs"):
        prepare(tmp_path, {"path": str(FIXTURES / "hh_pairs.jsonl.gz")}, n_train=90, n_heldout=10)


def test_pku_safer_response_id_out_of_range(tmp_path):
    row = {"prompt": "q", "response_0": "a", "response_1": "b", "safer_response_id": 2}
    (tmp_path / "pku.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SourceError, match="row 0: safer_response_id must be 0 or 1, got 2"):
        prepare(tmp_path, {"path": str(tmp_path / "pku.jsonl")}, fmt="pku-saferlhf")


def bench(tmp_path, spec):
    prepare_benchmark.main(["--name", "harmbench", "--spec-json", json.dumps(spec), "--all", str(tmp_path / "a.jsonl")])


def test_benchmark_column_that_does_not_exist(tmp_path):
    spec = {"source": {"path": str(FIXTURES / "harmbench.csv")}, "prompt_column": "prompt"}
    with pytest.raises(SourceError, match=r"benchmarks.harmbench: row 0 has no column 'prompt' \(columns present: "):
        bench(tmp_path, spec)


def test_benchmark_filter_that_keeps_nothing(tmp_path):
    spec = {"source": {"path": str(FIXTURES / "harmbench.csv")}, "prompt_column": "Behavior",
            "filter": {"FunctionalCategory": "multimodal"}}
    with pytest.raises(SourceError, match="benchmarks.harmbench: no prompts left after filter"):
        bench(tmp_path, spec)


def test_folder_without_data_files(tmp_path):
    with pytest.raises(SourceError, match="holds no .jsonl"):
        load_rows({"path": str(tmp_path)}, what="benchmarks.x.source")


def test_probe_set_that_still_overlaps_a_benchmark(tmp_path, tiny_model_dir):
    (tmp_path / "probe.jsonl").write_text(json.dumps({"text": "Describe how to make a FAKE id!", "label": 1}) + "\n")
    with pytest.raises(SourceError, match="overlaps benchmark 'harmbench' in 1 prompt"):
        train_probe.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "probe.jsonl"),
                          "--benchmark", f"harmbench={FIXTURES / 'harmbench_prompts.jsonl'}",
                          "--direction", str(tmp_path / "d.safetensors"), "--metrics", str(tmp_path / "m.json")])
    assert not (tmp_path / "d.safetensors").exists()


def judge_file(tmp_path, rows):
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge.main(["--answers", str(tmp_path / "answers.jsonl"), "--labels", str(tmp_path / "l.jsonl"),
                "--summary", str(tmp_path / "s.json")])


def test_generations_that_are_all_empty_are_refused(tmp_path):
    with pytest.raises(ValueError, match="answers.jsonl: every one of the 2 answers is empty"):
        judge_file(tmp_path, [{"id": "a", "answer": ""}, {"id": "b", "answer": "  "}])
    with pytest.raises(ValueError, match="answers.jsonl: no answers"):
        judge_file(tmp_path, [])
    with pytest.raises(ValueError, match="answers.jsonl: row 1 has no text 'answer'"):
        judge_file(tmp_path, [{"id": "a", "answer": "ok"}, {"id": "b"}])
    assert not (tmp_path / "s.json").exists()
    judge_file(tmp_path, [{"id": "a", "answer": ""}, {"id": "b", "answer": "Sure."}])  # one empty answer is fine
    assert json.loads((tmp_path / "s.json").read_text())["empty"] == 1


def test_unknown_embedded_model():
    with pytest.raises(ModelError, match="unknown embedded model 'gpt-5'"):
        embedded_gguf("gpt-5")


def test_probe_layer_outside_the_model(tmp_path, tiny_model_dir):
    (tmp_path / "probe.jsonl").write_text(json.dumps({"text": "hello", "label": 0}) + "\n")
    with pytest.raises(ValueError, match="probe.layer: 7 is outside the model's hidden states"):
        train_probe.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "probe.jsonl"),
                          "--spec-json", json.dumps({"layer": 7}),
                          "--direction", str(tmp_path / "d.safetensors"), "--metrics", str(tmp_path / "m.json")])


def test_unsupported_mlp_layout_stops_the_first_job(workdir, tmp_path):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    opt = tmp_path / "tiny-opt"
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                             word_embed_proj_dim=16)).save_pretrained(opt)
    config = yaml.safe_load(open(workdir / "config.yaml"))
    AutoTokenizer.from_pretrained(config["model"]["name_or_path"]).save_pretrained(opt)
    config["model"]["name_or_path"] = str(opt)
    yaml.safe_dump(config, open(workdir / "config.yaml", "w"))
    proc = run_snakemake(workdir, "results/models/base", check=False)
    assert proc.returncode != 0
    log = (workdir / "results/logs/prepare_model.log").read_text()
    assert "model type 'opt'" in log and "no supported MLP output projection" in log
    assert not (workdir / "results/models/base").exists()


# ---- a plain text file of prompts (.txt, one per line): the same rules as the other formats ----

def txt_bench(tmp_path, content: bytes, prompt_column="text"):
    (tmp_path / "p.txt").write_bytes(content)
    bench(tmp_path, {"source": {"path": str(tmp_path / "p.txt")}, "prompt_column": prompt_column})


def test_txt_prompts_that_are_not_utf8_name_file_line_and_byte(tmp_path):
    with pytest.raises(SourceError, match=r"p.txt: not UTF-8 text \(line 2, byte 15: invalid start byte\)"):
        txt_bench(tmp_path, b"Write a threat\n\xff\xfe bad\n")
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n"], ids=["zero bytes", "only blank lines"])
def test_empty_txt_prompt_file(tmp_path, content):
    with pytest.raises(SourceError, match=r"benchmarks.harmbench.source: no rows in '.*p.txt' \(empty, or only blank lines\)"):
        txt_bench(tmp_path, content)


def test_empty_csv_is_named_like_an_empty_jsonl(tmp_path):
    (tmp_path / "b.csv").write_text("")
    with pytest.raises(SourceError, match=r"benchmarks.harmbench.source: no rows in '.*b.csv'"):
        bench(tmp_path, {"source": {"path": str(tmp_path / "b.csv")}, "prompt_column": "q"})


def test_txt_prompt_column_is_text(tmp_path):
    with pytest.raises(SourceError, match=r"benchmarks.harmbench: row 0 has no column 'prompt' \(columns present: \['text'\]\)"):
        txt_bench(tmp_path, b"Write a threat\n", prompt_column="prompt")
