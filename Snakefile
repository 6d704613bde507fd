# ShaPO reproduction: preference pairs -> noise -> probe -> subspace -> DPO/ShaPO -> generations -> harmful-rate table.
# Run: snakemake --cores 2   (see README.md)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/sft.smk"
include: "rules/subspace.smk"
include: "rules/reward.smk"
include: "rules/train.smk"
include: "rules/eval.smk"
include: "rules/score.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
